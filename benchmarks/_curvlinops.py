"""A thin contract wrapper around curvlinops' ``KFACLinearOperator``.

Used only when ``kfac_oracle.adapters.curvlinops`` does not exist; otherwise the
suite benchmarks that adapter.
"""

from __future__ import annotations

from kfac_oracle.contract import KFACRequest, KroneckerFactors


def available() -> str | None:
    """``None`` if curvlinops imports, else the reason."""
    try:
        import curvlinops  # noqa: F401
    except ImportError as error:
        return f"curvlinops is not installed ({error})"
    return None


def kfac_operator(request: KFACRequest, separate: bool = False):
    """``(operator, layer names)``: a curvlinops KFAC operator for the request."""
    import torch
    from curvlinops import KFACLinearOperator

    model = request.model
    layers = list(request.layers) or [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]
    params = [
        p for n in layers for p in model.get_submodule(n).parameters(recurse=False)
    ]
    op = KFACLinearOperator(
        model,
        request.loss_func,
        params,
        request.data,
        fisher_type=request.fisher_type,
        kfac_approx=request.kfac_approx,
        mc_samples=request.mc_samples,
        seed=request.seed,
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )
    return op, layers


class CurvlinopsKFACWrapper:
    """curvlinops' KFAC factors through the public contract (joint bias)."""

    name = "curvlinops-kfac"
    capabilities = {
        "fisher_type": {"type-2", "mc", "empirical", "forward-only"},
        "kfac_approx": {"expand", "reduce"},
        "layers": {"Linear", "Conv2d"},
        "losses": {"MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"},
        "reductions": {"mean", "sum"},
    }

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """Compute the factors (``compute_kronecker_factors``) and read them."""
        op, layers = kfac_operator(request)
        op.compute_kronecker_factors()
        out = {}
        for name in layers:
            has_bias = request.model.get_submodule(name).bias is not None
            out[name] = KroneckerFactors(
                input_covariance=op._input_covariances[name],
                gradient_covariance=op._gradient_covariances[name],
                bias="joint" if has_bias else "none",
            )
        return out
