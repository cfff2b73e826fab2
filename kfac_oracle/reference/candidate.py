"""The reference KFAC as a candidate of the public contract (built-in ``reference``)."""

from __future__ import annotations

from kfac_oracle.contract import FULL_CAPABILITIES, KFACRequest, KroneckerFactors
from kfac_oracle.distributed.reference import DataParallelSteps
from kfac_oracle.flavours import Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.kfac import KFACSteps


class ReferenceKFAC:
    """kfac_oracle's own KFAC as a candidate: passes every applicable check.

    In a data-parallel request (``world_size > 1``) it runs
    :class:`~kfac_oracle.distributed.reference.DataParallelSteps`.

    Args:
        bias: ``"joint"`` or ``"separate"``, used when the request states none.
    """

    name = "reference"
    capabilities = FULL_CAPABILITIES
    steps_class: type[KFACSteps] = KFACSteps
    distributed_steps_class: type[KFACSteps] = DataParallelSteps

    def __init__(self, bias: str = "joint"):
        self.bias = bias

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """KFAC factors of every requested layer (:func:`~.kfac.kfac`)."""
        # outputs are validated batch by batch during the KFAC forward passes
        problem = Problem(
            request.model, request.loss_func, request.data, check_outputs=False
        )
        bias = request.bias or self.bias
        flavour = Flavour(
            request.fisher_type,
            request.kfac_approx,
            bias,
            request.mc_samples,
            request.seed,
        )
        steps_class = (
            self.distributed_steps_class if request.world_size > 1 else self.steps_class
        )
        return steps_class().factors(problem, flavour, list(request.layers) or None)
