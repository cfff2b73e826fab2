"""Adapters exposing curvlinops' KFAC and EKFAC (``curvlinops-for-pytorch`` 3.0.1).

Documented conventions (``curvlinops/kfac.py``, ``KFACLinearOperator.__init__`` and
``compute_kronecker_factors``; the curvlinops KFAC tutorial):

- The loss is the loss module's over the whole data set, with ``reduction`` mean or
  sum; for MSE/BCE the mean also runs over output entries (``num_per_example_loss_
  terms``), as in the README's Conventions.
- After ``compute_kronecker_factors()``, ``_input_covariances[module]`` is ``A``
  (``(1/N) Σ a aᵀ``, expand: ``1/(N·S)``; with ``separate_weight_and_bias=False`` the
  input carries a trailing 1, i.e. bias as the last column) and
  ``_gradient_covariances[module]`` is ``G``; the operator multiplies ``G M A`` on the
  weight viewed ``(out, in)``, i.e. ``G ⊗ A`` in rvec (``_left_and_right_multiply``).
- Separate bias: the bias block is ``G`` (``_separate_left_and_right_multiply``).
- EKFAC (``curvlinops/ekfac.py``) supports 2-D outputs only; the adapter returns the
  operator's dense per-layer block (``DenseBlock``, rvec).

The model is deep-copied; curvlinops' hooks never touch the caller's model.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from kfac_oracle.adapters._common import Expectation, Finding, Library
from kfac_oracle.contract import (
    DenseBlock,
    KFACRequest,
    KroneckerFactors,
    LayerOperations,
)

LIBRARY = Library("curvlinops-for-pytorch", "curvlinops")


def operator(
    request: KFACRequest, cls_name: str = "KFACLinearOperator", copy_model: bool = True
):
    """``(model, layers, operator, separate)``: a curvlinops operator for a request.

    The model is deep-copied unless ``copy_model`` is false (benchmarks time the
    library alone).
    """
    curvlinops = LIBRARY.load()
    model = copy.deepcopy(request.model) if copy_model else request.model
    layers = list(request.layers) or [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]
    params: list[torch.nn.Parameter] = []
    for name in layers:
        params.extend(model.get_submodule(name).parameters(recurse=False))
    separate = request.bias == "separate"
    op = getattr(curvlinops, cls_name)(
        model,
        request.loss_func,
        params,
        request.data,
        fisher_type=str(request.fisher_type),
        kfac_approx=request.kfac_approx,
        mc_samples=request.mc_samples,
        seed=request.seed,
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )
    return model, layers, op, separate


class CurvlinopsKFAC:
    """curvlinops' ``KFACLinearOperator`` factors (``G ⊗ A``, rvec)."""

    name = "curvlinops-kfac"
    # curvlinops' FisherType and KFACType enums, its supported layers and losses
    # (kfac.py: _SUPPORTED_MODULES, _SUPPORTED_LOSSES), separate_weight_and_bias.
    capabilities = {
        "fisher_type": {"type-2", "mc", "empirical", "forward-only"},
        "kfac_approx": {"expand", "reduce"},
        "layers": {"Linear", "Conv2d"},
        "losses": {"MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"},
        "reductions": {"mean", "sum"},
        "bias": {"joint", "separate"},
    }

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """Compute the factors and read them per module."""
        model, layers, op, separate = operator(request, "KFACLinearOperator")
        op.compute_kronecker_factors()
        out = {}
        for name in layers:
            has_bias = model.get_submodule(name).bias is not None
            out[name] = KroneckerFactors(
                input_covariance=op._input_covariances[name],
                gradient_covariance=op._gradient_covariances[name],
                bias=("separate" if separate else "joint") if has_bias else "none",
            )
        return out


class CurvlinopsEKFAC:
    """curvlinops' ``EKFACLinearOperator``, as dense per-layer blocks (rvec)."""

    name = "curvlinops-ekfac"
    capabilities = {
        **CurvlinopsKFAC.capabilities,
        "fisher_type": {"type-2", "mc", "empirical"},
        "bias": {"joint"},
        "output_ndim": {2},
        "approximation": {"ekfac"},
    }

    def compute(self, request: KFACRequest) -> dict[str, DenseBlock]:
        """Densify the operator and cut out each module's diagonal block."""
        model, layers, op, _ = operator(request, "EKFACLinearOperator")
        P = op.shape[0]
        ref = next(model.parameters())
        dense = op @ torch.eye(P, dtype=ref.dtype, device=ref.device)
        out, offset = {}, 0
        for name in layers:
            k = sum(
                p.numel() for p in model.get_submodule(name).parameters(recurse=False)
            )
            out[name] = DenseBlock(dense[offset : offset + k, offset : offset + k])
            offset += k
        return out


class CurvlinopsKFACInverse(CurvlinopsKFAC):
    """curvlinops' ``KFACInverseLinearOperator``: damped KFAC inverse-vector products.

    Its documented damping options (``curvlinops/inverse.py``,
    ``KFACInverseLinearOperator.__init__``), as conventions of docs/theory.md §10:

    - ``damping=δ``: ``A + δI`` and ``G + δI``, i.e. ``per_factor`` at ``λ = δ²``
      (the adapter passes ``δ = √λ``);
    - ``use_heuristic_damping=True``: Martens & Grosse's π-damping with
      ``√damping``, clamped below by ``min_damping`` (passed as 0): ``pi`` at
      ``λ = δ``;
    - ``use_exact_damping=True``: ``(A ⊗ G) + δI``, i.e. ``product`` at ``λ = δ``.

    The operator acts on every requested layer's parameters; a layer's product is
    read from a vector that is zero outside the layer (KFAC is block diagonal). The
    trace is ``KFACLinearOperator.trace`` of an operator on the layer's parameters
    alone (``tr G · tr A``, documented in ``kfac.py``).
    Curvature requests return the factors, as ``curvlinops-kfac``.
    """

    name = "curvlinops-kfac-inverse"
    capabilities = {
        **CurvlinopsKFAC.capabilities,
        "bias": {"joint"},
        "operations": {"inverse", "trace"},
        "damping": {"product", "per_factor", "pi"},
    }

    def compute(self, request: KFACRequest):
        """Factors, or ``LayerOperations`` with the inverse for operations."""
        if request.operations is None:
            return super().compute(request)
        curvlinops = LIBRARY.load()
        model, layers, op, _ = operator(request, "KFACLinearOperator")
        op.compute_kronecker_factors()
        convention = request.operations.convention
        if convention == "per_factor":
            options = {}
        elif convention == "pi":
            options = {"use_heuristic_damping": True, "min_damping": 0.0}
        elif convention == "product":
            options = {"use_exact_damping": True}
        else:
            raise NotImplementedError(f"curvlinops offers no {convention} damping")
        total = op.shape[0]
        out, offset = {}, 0
        for name in layers:
            size = sum(
                p.numel() for p in model.get_submodule(name).parameters(recurse=False)
            )

            def inverse_product(V, lam, start=offset, size=size):
                damping = math.sqrt(lam) if convention == "per_factor" else lam
                inverse = curvlinops.KFACInverseLinearOperator(
                    op, damping=damping, **options
                )
                X = V.new_zeros(total, V.shape[1])
                X[start : start + size] = V
                return (inverse @ X)[start : start + size]

            def trace(name=name):
                layer = dataclasses.replace(request, layers=(name,))
                return operator(layer, "KFACLinearOperator")[2].trace

            out[name] = LayerOperations(inverse_product=inverse_product, trace=trace)
            offset += size
        return out


ADAPTERS = {
    "curvlinops-kfac": CurvlinopsKFAC,
    "curvlinops-ekfac": CurvlinopsEKFAC,
    "curvlinops-kfac-inverse": CurvlinopsKFACInverse,
}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "C1",
        "new",
        "type-2 KFAC of outputs with more than two dimensions backpropagates each "
        "Hessian-square-root column over all positions at once (cross-position terms)",
        "still on main (63fd690); no upstream issue",
        adapters=(
            "curvlinops-kfac",
            "curvlinops-kfac-inverse",
            "laplace-kron-curvlinops",
            "laplace-kron-operations",
        ),
    ),
    Finding(
        "C2",
        "documented convention",
        "the dense EF of >2-D outputs is per position, its EF-KFAC per datum",
        "utils.py: make_functional_flattened_model_and_loss docstring",
    ),
    Finding(
        "C3",
        "fixed upstream, unreleased",
        "type-2 KFAC and the MC Fisher reject soft BCE targets",
        "PR #257, commit e81f6bb",
        adapters=("curvlinops-kfac", "curvlinops-kfac-inverse"),
    ),
    Finding(
        "C4",
        "fixed upstream, unreleased",
        "the MC Fisher draws MSE labels with a float32 standard deviation",
        "PR #235 (commit 8b96b36), PR #255",
    ),
    Finding(
        "C6",
        "new",
        "KFAC leaves its hooks on the model after an exception",
        "main: computers/kfac_hooks.py removes hooks outside try/finally",
        adapters=("curvlinops-kfac",),
    ),
]


# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation(
        "curvlinops-kfac",
        "deep_linear_d2_bias_mse_mean",
        "exact_*,agree_*,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "curvlinops-kfac", "mlp_tanh_bce_mean", "agree_*,bias_modes,mean_vs_sum"
    ),
    Expectation("curvlinops-kfac", "conv_flat_k3_pad1_mse_mean", "exact_E5_*_expand"),
    Expectation("curvlinops-ekfac", "one_datum_mse_mean", "exact_*"),
    Expectation(
        "curvlinops-ekfac",
        "deep_linear_d2_bias_mse_mean",
        "exact_*,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "curvlinops-ekfac", "mlp_tanh_bce_mean", "agree_type-2_*,agree_empirical_*"
    ),
    Expectation(
        "curvlinops-kfac-inverse",
        "deep_linear_d2_bias_mse_mean",
        "op_inverse,op_spd,op_exact_*",
    ),
    Expectation(
        "curvlinops-kfac",
        "conv_pixel_k3_pad1_mse_mean",
        "agree_type-2_reduce",
        "failed",
        text="too large by S",
        finding="C1",
    ),
]
