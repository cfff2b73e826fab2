r"""Comparing blocks too large to densify: factor level, or Gaussian probes.

Both sides are operators (:mod:`kfac_oracle.operators`) and the quantity compared is,
as for dense blocks, the relative Frobenius error ``‖ΔK‖_F / ‖K‖_F`` with
``ΔK = K_candidate − K_reference``.

**Factor level (exact).** Where both sides are Kronecker products with the same bias
treatment, with ``Â = A/‖A‖``, ``Ĝ = G/‖G‖`` and ``s = ‖G‖ ‖A‖ = ‖G ⊗ A‖``::

    ‖G₁⊗A₁ − G₂⊗A₂‖² = ‖G₁‖²‖A₁‖² − 2 tr(G₁ᵀG₂) tr(A₁ᵀA₂) + ‖G₂‖²‖A₂‖²
                     = (s₁ − s₂)² + 2 s₁ s₂ (d_G + d_A − d_G d_A),
    d_G = ‖Ĝ₁ − Ĝ₂‖²/2,  d_A = ‖Â₁ − Â₂‖²/2,

the second form free of cancellation (``⟨Ĝ₁, Ĝ₂⟩ = 1 − d_G`` for unit vectors) and
invariant under a positive scalar moved between the factors. Joint bias permutes rows
and columns alike (the norm is unchanged); separate bias adds ``‖G_b₁ − G_b₂‖²``.

**Probes (statistical).** Otherwise, ``k`` probes ``z ~ N(0, I_P)``:
``est = (1/k) Σ_j ‖ΔK z_j‖²`` is an unbiased estimator of ``‖ΔK‖_F²``
(``E zzᵀ = I``), and likewise for ``‖K‖_F²`` where the reference is not a Kronecker
product (whose norm is exact). ``k·est/‖ΔK‖²`` is a weighted sum of ``χ²₁`` variables
with weights ``λ_i²/‖ΔK‖²`` (``λ`` the eigenvalues of the symmetric ``ΔK``), each at
most 1, repeated ``k`` times; by convexity its Chernoff bound is largest when one
eigenvalue carries everything, i.e. for ``χ²_k``:

    P(est ≤ t ‖ΔK‖²) ≤ (t e^{1−t})^{k/2}  (t < 1),
    P(est ≥ t ‖ΔK‖²) ≤ (t e^{1−t})^{k/2}  (t > 1).

The record states ``k`` and :func:`miss_probability`: the probability that a block
whose true relative error exceeds ``factor`` times the tolerance passes (a correct
block, ``ΔK`` at rounding level, fails only if an estimate exceeds the truth by the
ratio of tolerance to rounding, about ``10⁵``: never in practice). In an exact family
``ΔK = 0``, so a few probes decide.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kfac_oracle import kronecker_statistics
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.conventions import weight_shape_2d
from kfac_oracle.flavours import BiasMode
from kfac_oracle.operators import (
    PROBES,
    DenseOperator,
    KroneckerOperator,
    MaskedOperator,
    ProbedOperator,
    gaussian_probes,
)

#: The miss probability is stated for blocks this many times beyond the tolerance.
MISS_FACTOR = 10.0


def chernoff_chi2(t: float, k: int) -> float:
    """``(t e^{1−t})^{k/2}``: bounds ``P(χ²_k/k ≤ t)`` for t<1, ``P(≥ t)`` for t>1."""
    if t <= 0:
        return 0.0
    return math.exp(0.5 * k * (math.log(t) + 1 - t))


def miss_probability(k: int, factor: float, reference_estimated: bool) -> float:
    """Bound on ``P(pass)`` for a block with relative error ``> factor · tol``.

    Passing needs ``est(‖ΔK‖²) ≤ tol² est(‖K‖²)``. With ``‖K‖`` exact this needs
    ``est ≤ ‖ΔK‖²/factor²``; with ``‖K‖`` estimated too, ``est(‖ΔK‖²)`` below
    ``1/factor`` of the truth or ``est(‖K‖²)`` above ``factor`` times it.
    """
    if not reference_estimated:
        return chernoff_chi2(1 / factor**2, k)
    return min(1.0, chernoff_chi2(1 / factor, k) + chernoff_chi2(factor, k))


def kronecker_distance(
    c: KroneckerOperator, r: KroneckerOperator
) -> tuple[float, float]:
    """``(‖K_c − K_r‖_F, ‖K_r‖_F)`` exactly, from the factors (module docstring)."""

    def parts(op: KroneckerOperator) -> tuple[float, Tensor, Tensor]:
        A, G = op.factors.input_covariance, op.factors.gradient_covariance
        a, g = A.norm(), G.norm()
        Ahat = A / a if a > 0 else A
        Ghat = G / g if g > 0 else G
        return float(a * g), Ahat, Ghat

    s1, A1, G1 = parts(c)
    s2, A2, G2 = parts(r)
    d_A = float((A1 - A2).norm() ** 2) / 2
    d_G = float((G1 - G2).norm() ** 2) / 2
    diff_sq = (s1 - s2) ** 2 + 2 * s1 * s2 * max(d_G + d_A - d_G * d_A, 0.0)
    ref_sq = s2**2
    if c.factors.bias == "separate":
        diff_sq += float((c.bias_block - r.bias_block).norm() ** 2)
        ref_sq += float(r.bias_block.norm() ** 2)
    return math.sqrt(diff_sq), math.sqrt(ref_sq)


def _factor_level(c: Any, r: Any) -> bool:
    return (
        isinstance(c, KroneckerOperator)
        and isinstance(r, KroneckerOperator)
        and c.factors.bias == r.factors.bias
        and (c.d_out, c.d_in) == (r.d_out, r.d_in)
    )


def as_operator(block: Any) -> Any:
    """Tensors become :class:`DenseOperator` s; operators stay."""
    return DenseOperator(block) if isinstance(block, Tensor) else block


def compare_operators(
    candidate: Any,
    reference: Any,
    bias_mode: str,
    module: nn.Module,
    what: str,
    rtol: float,
    probes: int = PROBES,
    relative_to: float | None = None,
) -> Outcome:
    """Compare two blocks as operators at relative Frobenius error ``rtol``.

    Factor level where both are Kronecker products with one bias treatment, else
    ``probes`` Gaussian probes (the candidate's own probes when it is known only by
    them). The outcome's message names the method, the probe count and the bound.
    ``relative_to``, when given, replaces ``‖K_reference‖_F`` as the norm the
    error is relative to.
    """
    candidate, reference = as_operator(candidate), as_operator(reference)
    d_out, d_in = weight_shape_2d(module)
    n_w = d_out * d_in
    has_bias = getattr(module, "bias", None) is not None
    if has_bias and bias_mode == BiasMode.NONE:
        return Outcome(
            "failed",
            None,
            rtol,
            f"{what}: the module has a bias but the result has no bias block",
            diagnosis="the bias block is missing",
        )
    if bias_mode == BiasMode.SEPARATE and not (
        isinstance(reference, KroneckerOperator)
        and reference.factors.bias == "separate"
    ):
        reference = MaskedOperator(reference, n_w)
    scale: float | None = None
    if _factor_level(candidate, reference):
        diff, ref = kronecker_distance(candidate, reference)
        err = diff / ref if ref > 0 else diff
        how = "exact, from the Kronecker factors"
        scale = _factor_scale(candidate, reference, rtol)
    else:
        if isinstance(candidate, ProbedOperator):
            Z = candidate.probes
        else:
            size = candidate.size
            Z = gaussian_probes(size, probes, *probe_format(reference))
        k = Z.shape[1]
        KZ_ref = reference.matmat(Z)
        KZ = candidate.matmat(Z)
        diff_sq = float(((KZ - KZ_ref) ** 2).sum()) / k
        scale = _probed_scale(KZ, KZ_ref, rtol)
        exact_norm = isinstance(reference, KroneckerOperator)
        if exact_norm:
            ref_sq = kronecker_norm_sq(reference)
        else:
            ref_sq = float((KZ_ref**2).sum()) / k
        ref, diff = math.sqrt(ref_sq), math.sqrt(diff_sq)
        err = diff / ref if ref > 0 else diff
        p = miss_probability(k, MISS_FACTOR, not exact_norm)
        how = (
            f"estimated with {k} Gaussian probes (unbiased for ‖ΔK‖_F²); a block "
            f"with true relative error above {MISS_FACTOR:g}× the tolerance passes "
            f"with probability ≤ {p:.1e}"
        )
    if relative_to is not None:
        err = diff / relative_to
    message = f"{what}: relative Frobenius error {err:.3e} ({how})"
    if err <= rtol:
        return Outcome("passed", err, rtol, message)
    return Outcome(
        "failed",
        err,
        rtol,
        f"{message} > {rtol:.0e}; block of {n_w} weights"
        + (f" + {d_out} biases" if has_bias else "")
        + ", compared matrix-free",
        diagnosis=(
            f"a constant factor {scale:.6g}: the block is {scale:.6g} × the reference"
            if scale is not None
            else factor_localisation(candidate, reference, rtol)
            if _factor_level(candidate, reference)
            else "no diagnosis: the block is compared matrix-free"
        ),
    )


def factor_localisation(c: KroneckerOperator, r: KroneckerOperator, rtol: float) -> str:
    """Which Kronecker factor differs, up to a scalar moved between the factors.

    With unit-norm factors ``X̂ = X/‖X‖``: ``‖Â_c − Â_r‖`` and ``‖Ĝ_c − Ĝ_r‖``; a
    factor within ``rtol`` agrees. Not a named pitfall, but where to look.
    """
    parts = []
    for name, X1, X2 in (
        ("input factor A", c.factors.input_covariance, r.factors.input_covariance),
        (
            "gradient factor G",
            c.factors.gradient_covariance,
            r.factors.gradient_covariance,
        ),
    ):
        n1, n2 = X1.norm(), X2.norm()
        if n1 == 0 or n2 == 0 or X1.shape != X2.shape:
            return "no diagnosis: a Kronecker factor is zero or of another shape"
        parts.append((name, float((X1 / n1 - X2.to(X1.dtype) / n2).norm())))
    differ = [f"{name} (‖X̂_c − X̂_r‖ = {d:.2e})" for name, d in parts if d > rtol]
    agree = [name for name, d in parts if d <= rtol]
    if not differ:
        return "no diagnosis: the unit-norm factors agree; the bias blocks differ"
    where = " and ".join(differ)
    if agree:
        return f"no named cause; the {agree[0]} agrees up to scale, the {where} differs"
    return f"no named cause; both factors differ: {where}"


def scaled_operator(block: Any, c: float) -> Any:
    """``c · K`` of a candidate's block: tensor, Kronecker, dense or probed operator.

    A Kronecker operator stays one (``c`` on ``G`` and on the bias block); a probed
    operator keeps its probes (``c · K Z``).
    """
    if isinstance(block, Tensor):
        return c * block
    if isinstance(block, KroneckerOperator):
        return kronecker_statistics.scaled(block, c)
    if isinstance(block, ProbedOperator):
        return ProbedOperator(block.probes, c * block.products)
    if isinstance(block, DenseOperator):
        return DenseOperator(c * block.matrix)
    if isinstance(block, MaskedOperator):
        return MaskedOperator(scaled_operator(block.operator, c), block.n_weight)
    raise TypeError(f"cannot scale a {type(block).__name__}")


def block_size_of(block: Any) -> int:
    """``P`` of a block: a square tensor's rows or an operator's ``size``."""
    return int(block.shape[0]) if isinstance(block, Tensor) else int(block.size)


def frobenius_norm(block: Any) -> float:
    """``‖K‖_F`` of a block: exact for tensors and Kronecker factors, else estimated.

    A probed operator's ``√((1/k) Σ_j ‖K z_j‖²)`` (unbiased for ``‖K‖_F²``); other
    operators the same with :data:`~kfac_oracle.operators.PROBES` seeded probes.
    """
    if isinstance(block, Tensor):
        return float(block.norm())
    if isinstance(block, KroneckerOperator):
        return kronecker_statistics.norm(block)
    if isinstance(block, DenseOperator):
        return float(block.matrix.norm())
    if isinstance(block, ProbedOperator):
        k = block.products.shape[1]
        return math.sqrt(float((block.products**2).sum()) / k)
    # exact or masked operators: estimated with seeded Gaussian probes
    Z = gaussian_probes(block.size, PROBES, *probe_format(block))
    return math.sqrt(float((block.matmat(Z) ** 2).sum()) / Z.shape[1])


def operator_error(
    candidate: Any,
    reference: Any,
    bias_mode: str,
    module: nn.Module,
    rtol: float,
    probes: int = PROBES,
) -> float:
    """``‖K_c − K_r‖_F / ‖K_r‖_F`` of two blocks, matrix-free.

    :func:`compare_operators`'s error: exact from the factors where both are
    Kronecker products (:func:`kronecker_distance`; identical factors give exactly
    0), else estimated with ``probes`` Gaussian probes (identical products give
    exactly 0). ``inf`` where the module has a bias and the result no bias block.
    """
    outcome = compare_operators(
        candidate, reference, bias_mode, module, "matrix-free comparison", rtol, probes
    )
    return math.inf if outcome.error is None else outcome.error


def _factor_scale(
    c: KroneckerOperator, r: KroneckerOperator, rtol: float
) -> float | None:
    """``s₁/s₂`` when the unit-norm factors agree (a pure scale error), else None."""
    if c.factors.bias == "separate":
        return None
    A1, G1 = c.factors.input_covariance, c.factors.gradient_covariance
    A2, G2 = r.factors.input_covariance, r.factors.gradient_covariance
    if min(A1.norm(), G1.norm(), A2.norm(), G2.norm()) == 0:
        return None
    dA = float((A1 / A1.norm() - A2 / A2.norm()).norm())
    dG = float((G1 / G1.norm() - G2 / G2.norm()).norm())
    if dA + dG > rtol:
        return None
    return float(G1.norm() * A1.norm() / (G2.norm() * A2.norm()))


def _probed_scale(KZ: Tensor, KZ_ref: Tensor, rtol: float) -> float | None:
    """The least-squares ``c`` with ``K Z ≈ c K_ref Z``, if it fits to ``rtol``."""
    denom = float((KZ_ref**2).sum())
    if denom == 0:
        return None
    c = float((KZ * KZ_ref).sum()) / denom
    residual = float((KZ - c * KZ_ref).norm()) / (abs(c) * denom**0.5 or 1.0)
    return c if residual <= rtol else None


def kronecker_norm_sq(op: KroneckerOperator) -> float:
    """``‖K‖_F²`` of a Kronecker operator, exactly, from its factors."""
    f = op.factors
    sq = float(f.gradient_covariance.norm() ** 2 * f.input_covariance.norm() ** 2)
    if f.bias == "separate":
        sq += float(op.bias_block.norm() ** 2)
    return sq


def probe_format(op: Any) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of an operator's numbers (probes are drawn in them)."""
    if isinstance(op, KroneckerOperator):
        A = op.factors.input_covariance
        return A.dtype, A.device
    if isinstance(op, DenseOperator):
        return op.matrix.dtype, op.matrix.device
    if isinstance(op, MaskedOperator):
        return probe_format(op.operator)
    problem = getattr(getattr(op, "operator", None), "problem", None)
    if problem is not None:
        return problem.dtype, problem.device
    return torch.float64, torch.device("cpu")


__all__ = [
    "MISS_FACTOR",
    "as_operator",
    "block_size_of",
    "chernoff_chi2",
    "compare_operators",
    "frobenius_norm",
    "kronecker_distance",
    "kronecker_norm_sq",
    "miss_probability",
    "probe_format",
    "operator_error",
    "scaled_operator",
]
