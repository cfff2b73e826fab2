"""Adapter for SINGD (PyPI ``singd``): its Kronecker factors before the first step.

``singd.optim.optimizer.SINGD`` is a structured, inverse-free KFAC-like optimizer.
It never stores ``A`` and ``G`` themselves: backward passes accumulate
``H_K = structure(Kᵀ a aᵀ K)`` and ``H_C = structure(Cᵀ g gᵀ C)`` per layer, and
``step()`` folds them into the pre-conditioner factors ``K, C``. Before the first
step ``K = C = I`` (``_initialize_buffers``), so with the ``"dense"`` structures
``H_K`` and ``H_C`` *are* the Kronecker factors of the KFAC approximation SINGD's
pre-conditioner tracks (the library's own KFAC test, ``test/optim/test_kfac.py``,
forms its block as ``kron(gᵀg, aᵀa)`` from exactly these processed quantities). The
adapter reads them from ``SINGD.state_dict()["H_Ks"]``/``["H_Cs"]`` (both are listed
in ``SINGD.STATE_ATTRIBUTES``) after the backward passes, never calling ``step()``.

Conventions, from the docstrings and source (``singd/optim/optimizer.py``,
``singd/optim/utils.py``):

- ``SINGD`` docstring: "Uses the empirical Fisher" (the gradient of the loss that is
  backpropagated, with the data set's labels).
- ``kfac_approx``: ``"expand"`` or ``"reduce"`` for weight-sharing ``Linear`` and
  ``Conv2d`` layers (Eschenhagen et al., 2023). ``process_input``: inputs (Conv2d:
  unfolded patches; reduce: averaged over positions) with a trailing 1 for the bias
  (joint, bias last), divided by ``√rows``, so ``H_K = (1/rows) Σ ã ãᵀ``.
  ``process_grad_output``: expand flattens positions into rows, reduce sums them.
- ``loss_average``: ``"batch"`` if "the loss function is a mean over as many terms as
  the size of the mini-batch", ``None`` if it "is a sum"; the output gradients are
  multiplied by ``√B`` (``B`` the batch size) for ``"batch"``, so
  ``H_C = B Σ g gᵀ``.
- Multiple batches: the README lists "Gradient accumulation (multiple
  forward-backwards, then take a step)" following PyTorch's recipe, which the
  library's ``test/optim/test_gradient_accumulation.py`` implements as: each
  micro-batch's mean loss is multiplied by ``B_b / N``; ``H_K`` and ``H_C`` are
  summed over the backward passes. The adapter does exactly that with the request's
  batches.

Conversion to the canonical target ``L = R Σ_n ℓ_n``: with ``"batch"`` and the
request's mean loss scaled as above every datum's output gradient is ``R ∇ℓ_n``, so
one batch of all ``N`` data gives ``H_C = N R² Σ ∇ℓ_n ∇ℓ_nᵀ`` and the canonical
``G = H_C / (N R)`` (``= T · H_C``: SINGD's per-sample loss is the datum's term of
the batch mean, ``ℓ_n / T``); with ``None`` (sum) ``G = H_C``. ``A = H_K``.

The optimizer runs on a deep copy of the model with ``T=1`` and dense structures;
its hooks are removed afterwards (``SINGD.hook_handles``).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from kfac_oracle.adapters._common import Expectation, Finding, Library, check_request
from kfac_oracle.contract import KFACRequest, KroneckerFactors

LIBRARY = Library("singd", "singd", extra="singd")


class SingdKFAC:
    """SINGD's ``H_K``, ``H_C`` before the first step: ``KroneckerFactors(A, G)``.

    ``A = H_K``; ``G = H_C / (N·R)`` for mean losses (``loss_average="batch"``) and
    ``G = H_C`` for sums (``loss_average=None``); joint bias.
    """

    name = "singd-kfac"
    capabilities: ClassVar[dict[str, Any]] = {
        "bias": {"joint"},
        "fisher_type": {"empirical"},
        "kfac_approx": {"expand", "reduce"},
        "layers": {"Linear", "Conv2d"},
        "losses": {"CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"},
        "reductions": {"mean", "sum"},
    }

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """Accumulate ``H_K``, ``H_C`` over the request's batches and convert them.

        Args:
            request: The harness's request.

        Returns:
            Module name → ``KroneckerFactors`` (joint bias, or none).

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        optimizer_module = LIBRARY.load("optim.optimizer").optim.optimizer
        check_request(self.name, self.capabilities, request)
        model = copy.deepcopy(request.model)
        loss_func = copy.deepcopy(request.loss_func)
        modules = request.modules(model)
        if not modules:
            raise NotImplementedError(f"{self.name}: no Linear/Conv2d module requested")
        params = [p for mod in modules.values() for p in mod.parameters(recurse=False)]
        mean = request.reduction == "mean"
        optimizer = optimizer_module.SINGD(
            model,
            params=params,
            loss_average="batch" if mean else None,
            kfac_approx=request.kfac_approx,
            structures=("dense", "dense"),
            T=1,
            warn_unsupported=False,
        )
        N = request.num_data
        try:
            for X, y in request.data:
                loss = loss_func(model(X), y)
                if mean:  # PyTorch's gradient-accumulation recipe (see docstring)
                    loss = loss * (len(X) / N)
                loss.backward()
            state = optimizer.state_dict()
        finally:
            for handle in optimizer.hook_handles:
                handle.remove()

        if mean:
            T = max(request.data[0][1][0].numel(), 1)
            R = 1.0 / (N * T)
            scale = 1.0 / (N * R)
        else:
            scale = 1.0
        result = {}
        for name, mod in modules.items():
            H_K = state["H_Ks"][name].to_dense()
            H_C = state["H_Cs"][name].to_dense()
            result[name] = KroneckerFactors(
                input_covariance=H_K.detach().clone(),
                gradient_covariance=(scale * H_C).detach().clone(),
                bias="joint" if mod.bias is not None else "none",
            )
        return result


ADAPTERS: dict[str, type[SingdKFAC]] = {SingdKFAC.name: SingdKFAC}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "S1",
        "new",
        "gradient accumulation with unequal micro-batches depends on the split (mean "
        "reduction)",
        "unchanged on main",
        adapters=("singd-kfac",),
    ),
    Finding(
        "S2",
        "known",
        "with sum reduction, k micro-batches give k times the factors",
        "f-dangel/singd#43 (cited by its own test)",
        adapters=("singd-kfac",),
    ),
]


# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation(
        "singd-kfac",
        "one_datum_mse_mean",
        "exact_*_empirical_*,agree_empirical_*,mean_vs_sum,wellformed",
    ),
    Expectation(
        "singd-kfac", "one_datum_bce_soft_sum", "exact_*_empirical_*,agree_empirical_*"
    ),
    Expectation(
        "singd-kfac", "conv_pixel_then_1x1_mse_mean", "agree_empirical_*,wellformed"
    ),
    Expectation("singd-kfac", "seq_mixing_mse_mean", "agree_empirical_*"),
    Expectation("singd-kfac", "conv_stack_pool_mse_mean", "agree_empirical_*"),
    Expectation(
        "singd-kfac",
        "identical_data_ce_mean",
        "exact_E1_empirical_expand",
        "failed",
        error=0.04,
        finding="S1",
    ),
]
