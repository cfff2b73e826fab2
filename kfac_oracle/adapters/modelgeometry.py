"""Adapter for modelgeometry (PyPI ``modelgeometry``): ``kfac_factors``.

``modelgeometry.kfac.kfac_factors(model, dataloader, n_samples, loss_fn, adapter,
include_bias)`` returns ``{"<module>.weight": {"A": A, "G": G}}`` for the projection
modules a ``modelgeometry.ModelAdapter`` lists (``qkv_modules``; made for attention
layers, "a single adapter abstraction" for "arbitrary custom architectures"). The
adapter passes a ``ModelAdapter`` subclass whose layers are the requested
``nn.Linear`` modules. Conventions, from ``modelgeometry/kfac.py``:

- Module docstring: for ``y = Wx`` "K-FAC approximates the Fisher/curvature block
  for ``W`` as a Kronecker product ``A (x) G``" with ``A = E[a aᵀ]`` over the input
  (plus "a constant 1" when ``include_bias`` and the module has a bias: joint, bias
  last) and ``G = E[g gᵀ]`` the covariance "of the loss gradient with respect to the
  layer's output"; "the captured activation and output-gradient tensors retain their
  individual per-token values throughout an ordinary backward pass". The code
  flattens every leading dimension into rows and divides both sums by the row count
  (tokens are rows: expand-like).
- ``loss_fn(predictions, target) -> scalar loss``, "the task the curvature is
  computed with respect to", with the data set's targets: an empirical Fisher.
  For the captured gradients to be the individual per-datum values the loss must be
  a sum over the batch; the adapter passes the request's loss with
  ``reduction="sum"``. (The library's own tests and demo pass a mean cross-entropy,
  which scales every row by ``1/B``: see ``docs/adapters/modelgeometry.md``.)
- ``n_samples``: "total number of individual (batch) samples to accumulate"; the
  adapter passes ``N`` and the request's batches as the data loader.
- Layers: the docstrings speak of linear layers (``nn.Linear``, HuggingFace's
  ``Conv1D``); ``nn.Conv2d`` inputs are not unfolded, so only ``Linear`` is declared.

Conversion to the canonical target ``L = R Σ_n ℓ_n``: with the summed loss,
``G = (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ``, so ``G`` is multiplied by ``R · N``; ``A`` is kept.

``kfac_factors`` calls ``model.zero_grad`` and ``backward`` (parameter gradients
change) and installs hooks that it removes itself; it runs on a deep copy.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from torch import nn

from kfac_oracle.adapters._common import Expectation, Finding, Library, check_request
from kfac_oracle.contract import KFACRequest, KroneckerFactors

LIBRARY = Library("modelgeometry", "modelgeometry", extra="modelgeometry")


def _linear_adapter(mg: Any, model: nn.Module, modules: list[nn.Module]) -> Any:
    """A ``ModelAdapter`` whose layer ``i`` has the one projection ``modules[i]``."""

    class _LinearLayers(mg.adapters.ModelAdapter):
        def qkv_modules(self, layer_idx: int) -> dict[str, nn.Module]:
            return {"qkv": self._layers[layer_idx]}

        def qkv_weights(self, layer_idx: int) -> Any:
            raise NotImplementedError("kfac_factors only uses qkv_modules")

    return _LinearLayers(model, modules, attn_name="")


class ModelgeometryKFAC:
    """modelgeometry ``kfac_factors``: ``KroneckerFactors(A, R·N·G, bias="joint")``."""

    name = "modelgeometry-kfac"
    capabilities: ClassVar[dict[str, Any]] = {
        "bias": {"joint"},
        "fisher_type": {"empirical"},
        "kfac_approx": {"expand"},
        "layers": {"Linear"},
        "losses": {"CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"},
        "reductions": {"mean", "sum"},
    }

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """Run ``kfac_factors`` on a deep copy and convert the factors.

        Args:
            request: The harness's request.

        Returns:
            Module name → ``KroneckerFactors`` (joint bias, or none).

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        mg = LIBRARY.load("adapters", "kfac")
        check_request(self.name, self.capabilities, request)
        model = copy.deepcopy(request.model)
        modules = request.modules(model, kinds=(nn.Linear,))
        if not modules:
            raise NotImplementedError(f"{self.name}: no Linear module requested")
        sum_loss = getattr(nn, request.loss_name)(reduction="sum")
        data = [(X.detach().clone(), y.detach().clone()) for X, y in request.data]
        N = request.num_data
        factors = mg.kfac.kfac_factors(
            model,
            data,
            n_samples=N,
            loss_fn=sum_loss,
            adapter=_linear_adapter(mg, model, list(modules.values())),
            include_bias=True,
        )
        R = request.reduction_factor
        result = {}
        for name, mod in modules.items():
            f = factors[f"{name}.weight"]
            result[name] = KroneckerFactors(
                input_covariance=f["A"].detach().clone(),
                gradient_covariance=(R * N * f["G"]).detach().clone(),
                bias="joint" if mod.bias is not None else "none",
            )
        return result


ADAPTERS: dict[str, type[ModelgeometryKFAC]] = {
    ModelgeometryKFAC.name: ModelgeometryKFAC,
}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "M1",
        "documented convention",
        "tokens are rows: with weight sharing G is averaged over tokens (KFAC-expand "
        "/ S)",
        "kfac module docstring",
        adapters=("modelgeometry-kfac",),
    ),
    Finding(
        "M2",
        "new",
        "with the mean loss of its own tests and demo, G carries 1/B² against its "
        "diagonal_fisher",
        "kfac_factors; not visible in the matrix (the adapter passes a sum loss)",
    ),
    Finding(
        "M3",
        "new",
        "an in-place activation after a hooked Linear layer crashes (full backward "
        "hook)",
        "unchanged on main",
        adapters=("modelgeometry-kfac",),
    ),
]


# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation(
        "modelgeometry-kfac",
        "deep_linear_d2_bias_mse_mean",
        "agree_empirical_*,batch_split,shuffle,current_parameters,wellformed,mean_vs_sum",
    ),
    Expectation(
        "modelgeometry-kfac",
        "one_datum_cro_sum",
        "exact_*_empirical_*,agree_empirical_*",
    ),
    Expectation(
        "modelgeometry-kfac",
        "mlp_tanh_bce_mean",
        "agree_empirical_*,mean_vs_sum",
    ),
    Expectation(
        "modelgeometry-kfac",
        "seq_expand_linear_mse_mean",
        "agree_empirical_expand",
        "failed",
        text="too small by S",
        error=0.6666666666666666,
        finding="M1",
    ),
    Expectation(
        "modelgeometry-kfac",
        "mlp_relu_inplace_mse_mean",
        "wellformed",
        "error",
        text="BackwardHookFunction",
        finding="M3",
    ),
]
