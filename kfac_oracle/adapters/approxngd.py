"""Adapter for approxngd (PyPI ``approxngd``): the covariances of its KFAC optimizer.

approxngd packages Nicholas Gao's PyTorch port of tensorflow/kfac
(``approxngd.KFAC``; the code is that of github.com/n-gao/pytorch-kfac, whose
README documents the usage). Conventions, from that README, the docstrings and the
source (``approxngd/kfac_optimizer.py``, ``approxngd/layers/*.py``):

- Usage: ``with kfac.track_forward(): loss = ...``, ``with kfac.track_backward():
  loss.backward()``; only tracked passes are recorded. README: "the optimizer
  assumes that the output is reduced by `mean`, other reductions are not supported
  yet" (``reductions = {"mean"}``); supported layers ``nn.Linear``, ``nn.Conv1d``,
  ``nn.Conv2d``, ``nn.Conv3d``; "Add support for shared layers (e.g., RNNs)" is a
  TODO, so ``Linear`` layers whose input is not ``(N, D)`` are refused.
- ``update_cov_manually`` (``KFAC.__init__`` docstring): covariances are then updated
  only by ``update_cov()``, "useful ... when you want your covariances w.r.t. the
  model distribution rather than the loss function": the default is the empirical
  Fisher (the tracked loss's gradient), and backpropagating a loss with labels
  sampled from the model gives the MC Fisher. Samples: ``Categorical(softmax f)``
  (CE), ``Bernoulli(σ(f))`` (BCE), ``N(f, ½ I)`` (MSE: the distribution whose
  negative log-likelihood is PyTorch's ``MSELoss`` up to a constant).
- Covariances (``compute_cov``, "the empirical second moment of the rows"):
  ``A = (1/rows) Σ ã ãᵀ`` with a trailing 1 for the bias (``append_homog``: joint,
  bias last); ``G = (1/rows) Σ s sᵀ``. ``FullyConnectedFisherBlock.backward_hook``
  multiplies the output gradient by the batch size (the mean loss's ``1/B`` undone,
  as in tensorflow/kfac). ``ConvFisherBlock``: rows are the ``N·S`` patches/positions
  and its curvature carries ``renorm_coeff = S``: ``multiply_preconditioner`` returns
  ``(G + ·)⁻¹ ∇W (A + ·)⁻¹ / renorm_coeff``, i.e. it inverts ``renorm_coeff · G ⊗ A``
  on the ``(out, in [+1])`` gradient matrix (rvec).
- Steps are averaged by ``MovingAverageVariable`` with ``cov_ema_decay`` (each
  ``update_cov()`` call has weight 1); the hooks keep only the last tracked pass, so
  micro-batches cannot be accumulated into one update. The adapter therefore passes
  the request's whole data set as one batch (one update; for MC, ``M`` updates of
  the same batch, one per sampled label set, with ``cov_ema_decay = 1``: their plain
  mean).

Conversion to the canonical target ``L = R Σ_n ℓ_n`` (``R = 1/(N·T)``, mean): the
library's matrix is ``renorm_coeff · G ⊗ A``; for a ``Linear`` layer its ``G`` is
``N R² Σ ∇ℓ_n ∇ℓ_nᵀ`` (the per-example loss being the datum's term of the batch mean,
``ℓ_n / T``), so the canonical ``G = renorm_coeff · G_lib / (N R)``
``= T · renorm_coeff · G_lib``. Conv blocks get the same documented conversion
(their missing batch-size factor is reported, not corrected).

The optimizer (``learning_rate = 0``) runs on a deep copy; its hooks are removed
afterwards; MC sampling uses the global RNG, forked and seeded with ``request.seed``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
from torch import nn

from kfac_oracle.adapters._common import Expectation, Finding, Library, check_request
from kfac_oracle.contract import KFACRequest, KroneckerFactors

LIBRARY = Library("approxngd", "approxngd", extra="approxngd")


def _sample_labels(loss_name: str, f: torch.Tensor) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution for ``loss_name``."""
    if loss_name == "CrossEntropyLoss":
        probs = torch.softmax(f.movedim(1, -1), dim=-1)
        flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)
        return flat.reshape(probs.shape[:-1])
    if loss_name == "MSELoss":
        return torch.normal(f, std=math.sqrt(0.5))
    return torch.bernoulli(torch.sigmoid(f))


class ApproxngdKFAC:
    """approxngd ``KFAC``: ``KroneckerFactors(A, T·renorm_coeff·G, bias="joint")``."""

    name = "approxngd-kfac"
    capabilities: ClassVar[dict[str, Any]] = {
        "bias": {"joint"},
        "fisher_type": {"empirical", "mc"},
        "kfac_approx": {"expand"},
        "layers": {"Linear", "Conv2d"},
        "losses": {"CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"},
        "reductions": {"mean"},
    }

    def _check_shared_linear(self, request: KFACRequest, names: list[str]) -> None:
        """Refuse Linear layers applied to more than one position (README TODO)."""
        probe = copy.deepcopy(request.model)
        ndims: dict[str, int] = {}
        handles = [
            probe.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, name=name: ndims.__setitem__(name, args[0].ndim)
            )
            for name in names
            if isinstance(probe.get_submodule(name), nn.Linear)
        ]
        with torch.no_grad():
            probe(request.data[0][0][:1])
        for handle in handles:
            handle.remove()
        shared = sorted(name for name, ndim in ndims.items() if ndim != 2)
        if shared:
            raise NotImplementedError(
                f"{self.name}: Linear {shared} with weight sharing (shared layers "
                "are not supported yet, README)"
            )

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """Record one update of the covariances on the whole data set.

        Args:
            request: The harness's request.

        Returns:
            Module name → ``KroneckerFactors`` (joint bias, or none).

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        approxngd = LIBRARY.load()
        check_request(self.name, self.capabilities, request)
        names = list(request.modules())
        if not names:
            raise NotImplementedError(f"{self.name}: no Linear/Conv2d module requested")
        self._check_shared_linear(request, names)
        model = copy.deepcopy(request.model)
        loss_func = copy.deepcopy(request.loss_func)
        X = torch.cat([X for X, _ in request.data]).detach().clone()
        y = torch.cat([y for _, y in request.data]).detach().clone()
        kfac = approxngd.KFAC(
            model,
            learning_rate=0.0,
            damping=1e-3,
            cov_ema_decay=1.0,
            update_cov_manually=True,
        )
        blocks = {block.module: block for block in kfac.blocks if not block.is_static}
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(request.seed)
                with kfac.track_forward():
                    output = model(X)
                if request.fisher_type == "mc":
                    for m in range(request.mc_samples):
                        labels = _sample_labels(request.loss_name, output.detach())
                        with kfac.track_backward():
                            loss_func(output, labels).backward(
                                retain_graph=m < request.mc_samples - 1
                            )
                        kfac.update_cov()
                else:
                    with kfac.track_backward():
                        loss_func(output, y).backward()
                    kfac.update_cov()
        finally:
            for block in blocks.values():
                block.forward_hook_handle.remove()
                block.backward_hook_handle.remove()

        T = max(request.data[0][1][0].numel(), 1)
        result = {}
        for name in names:
            mod = model.get_submodule(name)
            block = blocks[mod]
            G = T * block.renorm_coeff * block.sensitivity_covariance
            result[name] = KroneckerFactors(
                input_covariance=block.activation_covariance.detach().clone(),
                gradient_covariance=G.detach().clone(),
                bias="joint" if mod.bias is not None else "none",
            )
        return result


ADAPTERS: dict[str, type[ApproxngdKFAC]] = {ApproxngdKFAC.name: ApproxngdKFAC}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "A1",
        "known",
        "Conv2d blocks lack the batch-size factor of Linear blocks: 1/N²",
        "source comment \"in the original code they scale by the batch_size, I don't "
        'quite understand this"',
        adapters=("approxngd-kfac",),
    ),
    Finding(
        "A2",
        "new",
        "Conv2d patch extraction ignores the dilation",
        "ConvFisherBlock.extract_patches",
        adapters=("approxngd-kfac",),
    ),
    Finding(
        "A3",
        "new",
        "FisherBlock.full_fisher_block() raises AttributeError (_renorm_coeff)",
        "unchanged on main",
    ),
    Finding(
        "A4",
        "documented limitation",
        "mean reduction only; weight-shared Linear layers unsupported; the moving "
        "average weights steps equally",
        "README",
        adapters=("approxngd-kfac",),
    ),
]


# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation(
        "approxngd-kfac",
        "deep_linear_d2_bias_mse_mean",
        "agree_empirical_*,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "approxngd-kfac",
        "one_datum_bce_soft_mean",
        "exact_*_empirical_*,agree_empirical_*",
    ),
    Expectation("approxngd-kfac", "mlp_tanh_cro_mean", "mc_*,agree_empirical_*"),
    Expectation(
        "approxngd-kfac",
        "conv_pixel_k3_pad1_mse_mean",
        "agree_empirical_expand",
        "failed",
        error=0.8888888888888888,
        finding="A1",
    ),
    Expectation(
        "approxngd-kfac",
        "conv_pool_k3_dilation2_pad1_mse_mean",
        "agree_empirical_expand",
        "failed",
        text="no known pitfall",
        finding="A2",
    ),
]
