"""The reference KFAC as a candidate of the public contract (built-in ``reference``)."""

from __future__ import annotations

from kfac_oracle.contract import (
    FULL_CAPABILITIES,
    OPERATION_CAPABILITIES,
    KFACRequest,
    KroneckerFactors,
    LayerOperations,
)
from kfac_oracle.damping import DampingConvention
from kfac_oracle.distributed.reference import DataParallelSteps
from kfac_oracle.flavours import BiasMode, Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.exact import per_datum_gradients
from kfac_oracle.reference.kfac import KFACSteps
from kfac_oracle.reference.operations import (
    KroneckerOperations,
    SeparateBiasOperations,
    with_data_scores,
)


class ReferenceKFAC:
    """kfac_oracle's own KFAC as a candidate: passes every applicable check.

    In a data-parallel request (``world_size > 1``) it runs
    :class:`~kfac_oracle.distributed.reference.DataParallelSteps`.

    Args:
        bias: ``"joint"`` or ``"separate"``, used when the request states none.
        operations: Also declare every operation and damping convention
            (:data:`~kfac_oracle.contract.OPERATION_CAPABILITIES`; the built-in
            ``reference`` does). Off by default, so that a subclass that post-processes
            the factors of :meth:`compute` is never asked for operations.
        dtype: Declare this precision only (``"float32"``: the built-in
            ``reference-float32``, which computes in the problem's float32).
    """

    name = "reference"
    capabilities = FULL_CAPABILITIES
    steps_class: type[KFACSteps] = KFACSteps
    operations_class = KroneckerOperations
    distributed_steps_class: type[KFACSteps] = DataParallelSteps

    def __init__(
        self, bias: str = "joint", operations: bool = False, dtype: str | None = None
    ):
        self.bias = bias
        if operations:
            self.capabilities = {**self.capabilities, **OPERATION_CAPABILITIES}
        if dtype is not None:
            self.capabilities = {**self.capabilities, "dtype": {dtype}}
            self.name = f"reference ({dtype})"

    def compute(
        self, request: KFACRequest
    ) -> dict[str, KroneckerFactors] | dict[str, LayerOperations]:
        """KFAC factors of every requested layer (:func:`~.kfac.kfac`).

        For a request of operations, :class:`~.operations.KroneckerOperations` of the
        joint-bias factors under the requested damping convention (with the data
        scores of :func:`~.exact.per_datum_gradients`, if asked for).
        """
        # outputs are validated batch by batch during the KFAC forward passes
        problem = Problem(
            request.model, request.loss_func, request.data, check_outputs=False
        )
        bias = request.bias or self.bias
        if request.operations is not None:
            bias = BiasMode.parse(request.operations.bias)
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
        factors = steps_class().factors(problem, flavour, list(request.layers) or None)
        if request.operations is None:
            return factors
        convention = request.operations.convention
        if bias == BiasMode.SEPARATE:
            if DampingConvention.parse(convention, "convention").needs_factors:
                raise NotImplementedError(
                    f"{convention} damping is defined on the joint-bias block only"
                )
            out = {
                name: SeparateBiasOperations(f, convention).layer_operations()
                if f.bias == BiasMode.SEPARATE
                else self.operations_class(f, convention).layer_operations()
                for name, f in factors.items()
            }
        else:
            out = {
                name: self.operations_class(f, convention).layer_operations()
                for name, f in factors.items()
            }
        if "data_scores" in request.operations.operations:
            out = {
                name: with_data_scores(ops, per_datum_gradients(problem, name))
                for name, ops in out.items()
            }
        return out
