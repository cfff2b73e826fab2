r"""Statistical verdicts for Monte-Carlo KFAC, calibrated on the reference sampler.

Tensors in, verdicts out: this module knows nothing about models, candidates or checks.

**Setting.** For one layer, MC-KFAC with ``M`` samples per datum returns a random
canonical block ``C`` (``G_M ⊗ A`` up to the joint-bias permutation; only ``G_M`` is
random). Its mean is exactly the type-2 KFAC block ``B``: labels ``ỹ ~ p(y | f_n)``
drawn independently per datum, position and sample satisfy ``E[∇_f ℓ ∇_f ℓᵀ] = H_n``
(CE, BCE; MSE with ``N(f, ½ I)``), and cross-position terms have mean zero. The check
calls the candidate with ``K`` seeds at each ``M`` of a plan (blocks ``C_1 … C_K``) and
draws ``R`` blocks ``D_1 … D_R`` from the reference sampler at the same ``M`` with
seeds disjoint from the candidate's. Notation: ``⟨X, Y⟩ = Σ_ij X_ij Y_ij``,
``Y_r = D_r − B``, ``C̄ = (1/K) Σ_k C_k``; ``Σ = Cov(vec C)`` with eigenvalues ``λ_i``.

**Null hypothesis and false alarm.** H0: the ``C_k`` are independent with the
distribution of the ``D_r``. Every correct implementation satisfies H0, whatever its
code: the block is a fixed function of labels drawn independently from fixed
distributions. A *false alarm* is a failed verdict under H0; its probability is over the
seeds (the verdict is deterministic for fixed seeds, and the seeds are treated as
arbitrary). H0 excludes variance-reduced samplers (antithetic, stratified,
quasi-random): they fail the spread test, by design.

**1. Scale** (every ``M``). ``u(X) = ⟨X, B⟩ / ⟨B, B⟩``, so ``E u(C) = 1`` and a constant
factor ``c`` on every sample gives ``E u = c``. ``T_s = (ū − 1) / (σ̂ / √K)`` with ``ū``
the mean of ``u(C_k)`` and ``σ̂² = (1/R) Σ_r (u(D_r) − 1)²`` (known mean).
``ū − 1`` is a mean of ``K`` iid terms of variance ``σ²``, skewness ``γ`` and kurtosis
``κ``; it is approximated by a standardised Pearson type III (gamma) variable with
skewness ``γ/√K``, the three-moment approximation (Pearson 1959; Imhof 1961, §3;
Liu, Tang & Zhang 2009), which reduces to the normal for ``γ → 0``. A Gaussian
approximation is not good enough: for MSE, ``u`` is a Gaussian quadratic form with a
heavy right tail; resampling 16-means from 20,000 reference draws at ``M = 1, 2, 3``,
the normal quantile of level ``1e-6`` is exceeded up to 17 times too often, the
Pearson type III quantile at most 1.7 times (``benchmarks/mc_calibration.py
--tails``). ``σ̂² / σ² ≈ χ²_ν / ν`` with ``ν = 2R / (κ − 1)`` (the variance
of a mean of ``R`` squared deviations, Satterthwaite 1946), independent of ``ū``, so
``T_s ≈ X / √(χ²_ν / ν)`` (Student's t for ``γ = 0``); its quantiles are found by
one-dimensional numerical integration over ``χ²_ν``. ``γ`` and ``κ`` are estimated
from the reference draws; ``γ`` is moved by one standard error ``√(6/R)`` towards the
heavier tail on each side and ``κ`` is floored at 3.

**2. Frobenius deviation** (largest ``M``). ``T_F = K ‖C̄ − B‖²_F / tr Σ̂`` with
``Σ̂ = (1/R) Σ_r vec(Y_r) vec(Y_r)ᵀ``. Gaussian approximation of ``C̄``:
``K ‖C̄ − B‖²_F = Σ_i λ_i Z_i²``. Two bounds hold for any ``λ ≥ 0``:
Laurent & Massart (2000, Lemma 1),
``P(Σ λ_i Z_i² ≥ tr Σ + 2 √(x tr Σ²) + 2 x λ_max) ≤ e^{−x}``, and Székely & Bakirov
(2003), ``P(Σ λ_i Z_i² ≥ tr Σ · q_1(α)) ≤ α`` for ``α ≤ 0.215`` (``q_1`` the upper
quantile of ``χ²_1``). The numerator threshold is the smaller of the two in units of
``tr Σ``, with ``tr Σ² / (tr Σ)²`` and ``λ_max / tr Σ`` taken from ``Σ̂`` (both biased
upwards by sampling noise). The denominator: ``tr Σ̂ / tr Σ ≥ b``, ``b`` the lower
quantile of ``χ²_f / f`` with ``f = 2 R (tr Σ̂)² / V̂`` and ``V̂`` the sample variance of
``‖Y_r‖²_F`` (floored at its Gaussian value ``2 ‖Σ̂‖²_F``). The level splits equally
between numerator and denominator. The candidate's deviation is bounded with the
*reference's* spread: a noisier candidate cannot widen its own bound.

**3. Spread** (catches capped samplers, reused samples, noise shared across data, an
ignored seed or ``M``). (a) Scale direction, largest ``M``: ``s_u² / σ̂²`` with ``s_u²``
the sample variance of the ``u(C_k)``; ``s_u² / σ² ≈ χ²_{f_c} / f_c`` with
``f_c = 2 / (2/(K−1) + (κ−3)/K)`` (the variance of a sample variance, Box 1953), so the
ratio is ``F(f_c, ν)``. (b) Total, largest ``M``: ``r = s² / tr Σ̂`` with
``s² = Σ_k ‖C_k − C̄‖²_F / (K−1)``; ``Var(s²) = (V − 2 tr Σ²)/K + 2 tr Σ²/(K−1)``
(``V = Var ‖Y‖²_F``), so ``f_c = 2 (tr Σ)² / Var(s²)`` and ``r ≈ F(f_c, f)``.
(c) Pooled over every ``M``: ``P = Σ_M w_M r_M``, ``w_M ∝ f_c,M``, ``P ≈ F(Σ_M f_c,M,
b)`` with ``1/b = Σ_M w_M² / f_M`` (Satterthwaite): a spread wrong by a similar factor
at every ``M`` is seen with all the seeds' degrees of freedom. All are two-sided: the
candidate's spread must lie in ``[F⁻¹(α/2), F⁻¹(1 − α/2)]`` times the reference's.

**4. Exact parts.** Blocks must be finite and of ``B``'s shape; one seed called twice
must give the same block (relative Frobenius ``1e-10``); where the reference draws do
not vary (``√tr Σ̂ ≤ 1e-12 ‖B‖``, e.g. two-class CE at equal logits, BCE at logit 0)
every block must equal ``B`` to ``1e-10``.

**Budget.** With ``n`` statistical tests (one scale test per ``M``, one Frobenius and
two spread tests at the largest ``M``, one pooled spread test), each gets
``α_i = α_design / n`` and Boole's inequality bounds the false-alarm probability of
the whole check by ``α_design = 1e-8`` under the approximations above. The stated
bound is ``FALSE_ALARM = 1e-6 = 100 α_design``: a factor 100 of slack for the error of
the approximations in the far tails (relative errors of Edgeworth type,
``≈ z γ_K (z² − 1)/6`` at ``z ≈ 6`` and skewness ``γ_K`` of the ``K``-mean; the
resampling check above measured at most 1.7 for the scale statistic) and for the
plug-in of ``γ``, ``κ`` and the eigenvalue ratios. Verdicts flag ``gaussian_warning``
when the skewness of the ``K``-mean at the largest ``M`` exceeds ``0.1`` (tests 2 and 3
then rest on a weaker approximation: raise ``M``).

**Diagnosis.** :func:`mean_consistent` applies the *same* mean tests (scale at every
``M``, Frobenius at the largest) with the same levels to a hypothesis ``H_M`` in place
of ``B`` (e.g. ``c · B_alt``; the null spread is scaled by ``|c|``). With ``H_M = B`` it
reproduces the verdict's mean tests exactly, so a failed verdict is never diagnosed as
"within the statistical bound".

**Blocks too large to densify.** Every statistic above is a function of inner
products ``⟨X, Y⟩`` between blocks: ``u``, ``‖C̄ − H‖²_F``, ``s²``, and from the Gram
matrix ``Γ_rs = ⟨Y_r, Y_s⟩`` of the draws ``tr Σ̂ = tr Γ / R``, ``V̂`` (the variance
of ``Γ_rr``), ``‖Σ̂‖²_F`` and ``λ_max`` (``Σ̂ = (1/R) Σ_r vec Y_r vec Y_rᵀ`` and
``Γ/R`` share their nonzero eigenvalues). For Kronecker blocks each comes from the
factors, ``⟨G₁ ⊗ A₁, G₂ ⊗ A₂⟩ = ⟨G₁, G₂⟩⟨A₁, A₂⟩``, with differences written without
cancellation (:mod:`kfac_oracle.kronecker_statistics`); the tests, levels and null
model are the same (:func:`kronecker_null_model`).

References: E. S. Pearson, Biometrika 46 (1959) 364; J. P. Imhof, Biometrika 48 (1961)
419-426; H. Liu, Y. Tang, H. H. Zhang, Comput. Stat. Data Anal. 53 (2009) 853-856;
F. E. Satterthwaite, Biometrics Bull. 2 (1946) 110-114; G. E. P. Box, Biometrika 40
(1953) 318-335; B. Laurent, P. Massart, Ann. Statist. 28 (2000) 1302-1338;
G. J. Székely, N. K. Bakirov, Probab. Theory Relat. Fields 126 (2003) 184-202;
P. Hall, The Bootstrap and Edgeworth Expansion, Springer 1992, §2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from scipy import optimize, stats
from torch import Tensor

from kfac_oracle import kronecker_statistics as ks
from kfac_oracle.kronecker_statistics import KroneckerBlocks
from kfac_oracle.operators import KroneckerOperator

#: Nodes of the quadrature over ``χ²_ν`` in :func:`_ratio_quantile`.
QUADRATURE_NODES = 400
#: ``(M, K)``: the candidate is called with seeds ``0 … K−1`` at each ``M``.
PLAN: tuple[tuple[int, int], ...] = ((1, 16), (2, 16), (3, 16), (100, 16))
#: Reference draws per ``M``.
REFERENCE_DRAWS = 400
#: Reference seeds are ``REFERENCE_SEED_OFFSET + r``, disjoint from the candidate's.
REFERENCE_SEED_OFFSET = 1_000_000
#: The stated bound on the false-alarm probability of one verdict.
FALSE_ALARM = 1e-6
#: Slack between the stated bound and the level the thresholds are computed at.
SAFETY = 100.0
#: Relative Frobenius tolerance of the exact parts (reproducibility, zero spread).
EXACT_RTOL = 1e-10
#: Reference spread below this (relative to ``‖B‖``) counts as none at all.
ZERO_SPREAD_RTOL = 1e-12
#: Skewness of the K-mean at the largest M above which a verdict carries a warning.
SKEW_WARNING = 0.1


def candidate_seeds(num_seeds: int) -> list[int]:
    """The candidate's seeds at every ``M``: ``0 … K−1``."""
    return list(range(num_seeds))


def reference_seeds(num_draws: int = REFERENCE_DRAWS) -> list[int]:
    """The reference's seeds, disjoint from :func:`candidate_seeds`."""
    return [REFERENCE_SEED_OFFSET + r for r in range(num_draws)]


@dataclass(frozen=True)
class NullModel:
    """What the reference draws at one ``M`` say about a correct candidate.

    Attributes:
        mc_samples: ``M``.
        mean: ``B``, the type-2 KFAC block (the exact mean of every draw): a tensor,
            or a :class:`~kfac_oracle.operators.KroneckerOperator` for a block too
            large to densify (:func:`kronecker_null_model`).
        num_draws: ``R``.
        scale_var: ``σ̂²`` of ``u = ⟨D, B⟩/⟨B, B⟩`` about its known mean 1.
        scale_skew: Sample skewness of ``u``.
        scale_kurt: Sample kurtosis of ``u`` (3 for a normal).
        total_var: ``tr Σ̂ = (1/R) Σ ‖D_r − B‖²_F``.
        total_var_var: ``V̂``, sample variance of ``‖D_r − B‖²_F``.
        frob_sq: ``‖Σ̂‖²_F = tr Σ̂²``.
        lambda_max: Largest eigenvalue of ``Σ̂``.
        zero_spread: The draws do not vary at all (every draw equals ``B``).
    """

    mc_samples: int
    mean: Tensor | KroneckerOperator
    num_draws: int
    scale_var: float
    scale_skew: float
    scale_kurt: float
    total_var: float
    total_var_var: float
    frob_sq: float
    lambda_max: float
    zero_spread: bool

    @property
    def scale_dof(self) -> float:
        """``ν = 2R/(κ − 1)`` (κ floored at 3): degrees of freedom of ``σ̂²``."""
        return 2 * self.num_draws / (max(self.scale_kurt, 3.0) - 1)

    @property
    def total_dof(self) -> float:
        """``f = 2R (tr Σ̂)² / V̂`` (``V̂`` floored at ``2 ‖Σ̂‖²_F``)."""
        V = max(self.total_var_var, 2 * self.frob_sq)
        return 2 * self.num_draws * self.total_var**2 / V


def null_model(
    draws: Tensor | Sequence[Tensor], mean: Tensor, mc_samples: int = 0
) -> NullModel:
    """Summarise ``R`` reference blocks drawn at one ``M``.

    Args:
        draws: ``(R, P, P)`` canonical blocks of the reference MC-KFAC, seeds disjoint
            from the candidate's (:func:`reference_seeds`).
        mean: ``B``, the reference type-2 KFAC block, in the same layout (for
            ``bias="separate"`` with the weight-bias cross terms zeroed).
        mc_samples: ``M`` (recorded only).

    Returns:
        The :class:`NullModel`.
    """
    B = mean.detach().to("cpu", torch.float64)
    D = torch.stack(list(draws)) if not isinstance(draws, Tensor) else draws
    D = D.detach().to("cpu", torch.float64)
    R = D.shape[0]
    if R < 20:
        raise ValueError(f"need at least 20 reference draws, got {R}")
    if D.shape[1:] != B.shape:
        raise ValueError(f"draws of shape {tuple(D.shape[1:])}, mean {tuple(B.shape)}")
    Y = (D - B).reshape(R, -1)
    bb = float((B * B).sum())
    sq = (Y * Y).sum(1)
    gram = Y @ Y.T / R  # nonzero eigenvalues of Σ̂
    v = Y @ B.reshape(-1) / bb if bb > 0 else None
    return _summarise(B, mc_samples, bb, sq, gram, v)


def kronecker_null_model(
    draws: Tensor,
    input_covariance: Tensor,
    mean: KroneckerOperator,
    mc_samples: int = 0,
    bias_draws: Tensor | None = None,
) -> NullModel:
    """:func:`null_model` of draws ``D_r = G_r ⊗ A`` too large to densify.

    The same statistics from the inner products of the factors
    (:func:`kfac_oracle.kronecker_statistics.draw_moments`): ``‖Y_r‖²_F = Γ_rr``,
    ``Σ̂``'s nonzero eigenvalues those of ``Γ/R``, ``u(D_r) − 1 = ⟨Y_r, B⟩/⟨B, B⟩``,
    with ``Γ_rs = ⟨Y_r, Y_s⟩`` and ``Y_r = D_r − B``; equal to :func:`null_model` of
    the dense blocks up to rounding.

    Args:
        draws: ``(R, d_out, d_out)`` gradient factors of the draws (overwritten).
        input_covariance: ``A``, shared by every draw.
        mean: ``B``, the reference type-2 KFAC block as a Kronecker operator.
        mc_samples: ``M`` (recorded only).
        bias_draws: Separate bias only: the draws' bias blocks (default ``G_r``).
    """
    R = draws.shape[0]
    if R < 20:
        raise ValueError(f"need at least 20 reference draws, got {R}")
    m = ks.draw_moments(draws, input_covariance, mean, bias_draws)
    bb = m.mean_sq
    v = m.along / bb if bb > 0 else None
    return _summarise(mean, mc_samples, bb, m.gram.diagonal(), m.gram / R, v)


def _summarise(
    B: Tensor | KroneckerOperator,
    mc_samples: int,
    bb: float,
    sq: Tensor,
    gram: Tensor,
    v: Tensor | None,
) -> NullModel:
    """The :class:`NullModel` from ``‖Y_r‖²``, ``Γ/R`` and ``⟨Y_r, B⟩/⟨B, B⟩``."""
    R = sq.shape[0]
    total = float(sq.mean())
    zero = math.sqrt(total) <= ZERO_SPREAD_RTOL * math.sqrt(bb) or total == 0.0
    eig = torch.linalg.eigvalsh(gram)
    if v is not None:
        var = float((v * v).mean())  # about the known mean: R degrees of freedom
        # shape about the sample mean: standard error √(6/R) of the skewness (about
        # the known mean it would be √(15/R))
        c = v - v.mean()
        m2 = float((c * c).mean())
        sd = math.sqrt(m2) if m2 > 0 else 1.0
        skew = float((c**3).mean()) / sd**3
        kurt = float((c**4).mean()) / sd**4
    else:
        var, skew, kurt = 0.0, 0.0, 3.0
    return NullModel(
        mc_samples=mc_samples,
        mean=B,
        num_draws=R,
        scale_var=var,
        scale_skew=skew,
        scale_kurt=kurt,
        total_var=total,
        total_var_var=float(sq.var()),
        frob_sq=float((eig**2).sum()),
        lambda_max=float(eig.max()),
        zero_spread=zero,
    )


@dataclass(frozen=True)
class StatResult:
    """One test of a verdict.

    Attributes:
        name: ``"scale"``, ``"frobenius"``, ``"spread_scale"``, ``"spread_total"``,
            ``"exact"``, ``"finite"``, ``"shape"`` or ``"reproducible"``.
        mc_samples: ``M`` the test ran at (``None`` for reproducibility).
        value: The statistic.
        low: Lower end of the acceptance interval (``None``: one-sided).
        high: Upper end of the acceptance interval.
        alpha: Its share of the false-alarm budget (0 for exact parts).
        passed: ``low <= value <= high``.
        detail: A readable line with the numbers.
    """

    name: str
    mc_samples: int | None
    value: float
    low: float | None
    high: float
    alpha: float
    passed: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    """All tests of one check (one layer).

    Attributes:
        passed: Every test passed.
        tests: The individual results.
        false_alarm: The stated bound on the probability of a failed verdict for a
            correct implementation.
        gaussian_warning: The skewness of the K-mean at the largest ``M`` exceeds
            ``SKEW_WARNING``: the Frobenius and spread tests rest on a weak
            approximation.
    """

    passed: bool
    tests: list[StatResult] = field(default_factory=list)
    false_alarm: float = FALSE_ALARM
    gaussian_warning: bool = False

    @property
    def failures(self) -> list[StatResult]:
        """The failed tests."""
        return [t for t in self.tests if not t.passed]

    @property
    def message(self) -> str:
        """The failed tests' details, or a summary of the passed ones."""
        if self.failures:
            return "; ".join(t.detail for t in self.failures)
        worst = max(
            (t for t in self.tests if t.alpha > 0),
            key=lambda t: closeness(t),
            default=None,
        )
        tail = f"; closest: {worst.detail}" if worst else ""
        return (
            f"{len(self.tests)} tests passed (false-alarm probability <= "
            f"{self.false_alarm:g}){tail}"
        )


def closeness(t: StatResult) -> float:
    """How close a passed test came to its bound (1 = at the bound)."""
    if t.low is not None and t.value < 1 and t.low > 0:
        return math.log(t.value) / math.log(t.low) if t.value > 0 else math.inf
    return abs(t.value) / t.high if t.high > 0 else 0.0


def allocate(mc_samples: Sequence[int], false_alarm: float = FALSE_ALARM):
    """Per-test levels: ``{("scale", M): α_i, …, ("frobenius", M_max): α_i, …}``.

    One scale test per ``M``; a Frobenius and two spread tests at the largest ``M``; a
    pooled spread test over every ``M`` (with two or more); ``α_i = false_alarm /
    (SAFETY · n)``.
    """
    ms = sorted(set(mc_samples))
    top = ms[-1]
    names: list[tuple[str, int | None]] = [("scale", M) for M in ms]
    names += [("frobenius", top), ("spread_scale", top), ("spread_total", top)]
    if len(ms) > 1:
        names.append(("spread_pooled", None))
    a = false_alarm / SAFETY / len(names)
    return dict.fromkeys(names, a)


Blocks = Tensor | KroneckerBlocks
Block = Tensor | KroneckerOperator


def _stack(blocks) -> Blocks:
    """``(K, P, P)`` dense blocks, or :class:`KroneckerBlocks` for Kronecker operators.

    Every statistic below is computed from inner products of blocks: entrywise for
    dense blocks, from the factors for Kronecker ones
    (:mod:`kfac_oracle.kronecker_statistics`).
    """
    if isinstance(blocks, KroneckerBlocks):
        return blocks
    if not isinstance(blocks, Tensor):
        items = list(blocks)
        if items and all(isinstance(b, KroneckerOperator) for b in items):
            return KroneckerBlocks(tuple(items))
        blocks = torch.stack(items)
    return blocks.detach().to("cpu", torch.float64)


def _center(block: Block) -> Block:
    if isinstance(block, KroneckerOperator):
        return block
    return block.detach().to("cpu", torch.float64)


def _count(C: Blocks) -> int:
    return len(C) if isinstance(C, KroneckerBlocks) else C.shape[0]


def _inner(X: Block, Y: Block) -> float:
    """``⟨X, Y⟩ = Σ_ij X_ij Y_ij`` (Kronecker: ``⟨G₁, G₂⟩⟨A₁, A₂⟩`` …)."""
    if isinstance(X, KroneckerOperator) and isinstance(Y, KroneckerOperator):
        ks.require_same_layout(X, Y)
        return ks.inner(ks.terms(X), ks.terms(Y))
    assert isinstance(X, Tensor) and isinstance(Y, Tensor)
    return float((X * Y).sum())


def _norm(X: Block) -> float:
    return ks.norm(X) if isinstance(X, KroneckerOperator) else float(X.norm())


def _along(C: Blocks, B: Block) -> Tensor:
    """``(⟨C_k, B⟩)_k``."""
    if isinstance(C, KroneckerBlocks):
        assert isinstance(B, KroneckerOperator)
        return C.along(B)
    assert isinstance(B, Tensor)
    return (C * B).sum((1, 2))


def _mean_deviation_sq(C: Blocks, H: Block) -> float:
    """``‖C̄ − H‖²_F``."""
    if isinstance(C, KroneckerBlocks):
        assert isinstance(H, KroneckerOperator)
        return C.mean_deviation_sq(H)
    assert isinstance(H, Tensor)
    return float(((C.mean(0) - H) ** 2).sum())


def _spread_sq(C: Blocks) -> float:
    """``Σ_k ‖C_k − C̄‖²_F``."""
    if isinstance(C, KroneckerBlocks):
        return C.spread_sq()
    return float(((C - C.mean(0)) ** 2).sum())


def _layouts(blocks: Blocks, mean: Block) -> tuple[object, object]:
    """What must agree between the blocks and the mean: shapes, or Kronecker layouts."""
    got = blocks.layout() if isinstance(blocks, KroneckerBlocks) else blocks.shape[1:]
    want = ks.layout(mean) if isinstance(mean, KroneckerOperator) else mean.shape
    return tuple(got) if got is not None else None, tuple(want)


def _sanity(blocks: Blocks, null: NullModel, M: int) -> list[StatResult]:
    """Shape and finiteness; empty when both hold."""
    got, want = _layouts(blocks, null.mean)
    if got != want:
        d = f"M={M}: block shape {got}, expected " + str(want)
        return [StatResult("shape", M, math.nan, None, 0.0, 0.0, False, d)]
    if isinstance(blocks, KroneckerBlocks):
        bad = blocks.nonfinite()
    elif not torch.isfinite(blocks).all():
        bad = int((~torch.isfinite(blocks)).flatten(1).any(1).sum())
    else:
        bad = 0
    if bad:
        d = f"M={M}: {bad} of {_count(blocks)} blocks contain NaN or inf"
        return [StatResult("finite", M, math.nan, None, 0.0, 0.0, False, d)]
    return []


def _exact(blocks: Blocks, center: Block, M: int, what: str) -> StatResult:
    """Every block equals ``center`` (zero reference spread)."""
    if isinstance(blocks, KroneckerBlocks):
        assert isinstance(center, KroneckerOperator)
        scale = max(ks.norm(center), float(blocks.norms().max()))
        err = float(blocks.deviations(center).max()) / max(scale, 1e-300)
    else:
        assert isinstance(center, Tensor)
        scale = max(float(center.norm()), float(blocks.flatten(1).norm(dim=1).max()))
        err = float((blocks - center).flatten(1).norm(dim=1).max()) / max(scale, 1e-300)
    ok = err <= EXACT_RTOL
    d = (
        f"M={M}: the reference MC-KFAC does not vary here, so every block must "
        f"equal {what}: largest relative error {err:.3e} (tolerance {EXACT_RTOL:g})"
    )
    return StatResult("exact", M, err, None, EXACT_RTOL, 0.0, ok, d)


def mean_tests(
    blocks,
    center: Block,
    null: NullModel,
    alpha_scale: float,
    alpha_frobenius: float | None = None,
    spread_scale: float = 1.0,
    what: str = "type-2 KFAC",
) -> list[StatResult]:
    """Is the mean of the ``K`` blocks consistent with ``center``?

    Args:
        blocks: ``(K, P, P)`` candidate blocks at one ``M``.
        center: The hypothesised mean (``B`` for the verdict).
        null: The reference at this ``M``.
        alpha_scale: Level of the scale test.
        alpha_frobenius: Level of the Frobenius test (``None``: not run).
        spread_scale: The null spread is multiplied by ``|spread_scale|`` (use ``c``
            for a hypothesis ``c · B_alt``).
        what: Name of ``center`` for the messages.

    Returns:
        The scale result, and the Frobenius result if requested (or one exact result
        where the reference does not vary; or a shape/finiteness failure).
    """
    C = _stack(blocks)
    M = null.mc_samples
    bad = _sanity(C, null, M)
    if bad:
        return bad
    H = _center(center)
    if null.zero_spread:
        return [_exact(C, H, M, what)]
    K = _count(C)
    s = abs(spread_scale)
    out = []
    B = null.mean
    bb = _inner(B, B)
    u = _along(C, B) / bb
    u0 = _inner(H, B) / bb
    sigma = s * math.sqrt(null.scale_var)
    diff = float(u.mean()) - u0
    if sigma > 0:
        T = diff / (sigma / math.sqrt(K))
    else:  # the scale does not vary at all: compare it exactly
        T = 0.0 if abs(diff) <= EXACT_RTOL * abs(u0) else math.copysign(math.inf, diff)
    lo, hi = _scale_interval(alpha_scale, null, K)
    ok = lo <= T <= hi
    out.append(
        StatResult(
            "scale",
            M,
            T,
            lo,
            hi,
            alpha_scale,
            ok,
            f"M={M}: scale of the mean of {K} blocks along {what}: "
            f"{float(u.mean()):.6g} (expected {u0:.6g}); {T:+.2f} reference standard "
            f"errors, accepted [{lo:.2f}, {hi:.2f}] (level {alpha_scale:.1e})",
        )
    )
    if alpha_frobenius is not None:
        dev = _mean_deviation_sq(C, H)
        tr = s**2 * null.total_var
        TF = K * dev / tr if tr > 0 else math.inf
        thr = _frobenius_threshold(alpha_frobenius, null)
        rel = math.sqrt(dev) / max(_norm(H), 1e-300)
        rel_bound = math.sqrt(thr * tr / K) / max(_norm(H), 1e-300)
        out.append(
            StatResult(
                "frobenius",
                M,
                TF,
                None,
                thr,
                alpha_frobenius,
                TF <= thr,
                f"M={M}: mean of {K} blocks is {rel:.3e} from {what} (relative "
                f"Frobenius); bound {rel_bound:.3e} from the reference's spread "
                f"(K·dev²/trΣ = {TF:.3g} <= {thr:.3g}, level {alpha_frobenius:.1e})",
            )
        )
    return out


def spread_tests(blocks, null: NullModel, alpha: float) -> list[StatResult]:
    """Does the candidate's seed-to-seed spread match the reference's?

    Two two-sided tests at level ``alpha`` each: along the scale direction
    (``s_u² / σ̂² ~ F(f_c, ν)``) and in total (``s² / tr Σ̂ ~ F(f_c, f)``).
    """
    C = _stack(blocks)
    M = null.mc_samples
    bad = _sanity(C, null, M)
    if bad:
        return bad
    if null.zero_spread:
        return [_exact(C, null.mean, M, "type-2 KFAC")]
    K = _count(C)
    if K < 2:
        raise ValueError("the spread tests need at least two seeds")
    B = null.mean
    u = _along(C, B) / _inner(B, B)
    kurt = max(null.scale_kurt, 3.0)
    f_u = 2 / (2 / (K - 1) + (kurt - 3) / K)
    ratio_u = float(u.var()) / null.scale_var if null.scale_var > 0 else math.inf
    lo_u, hi_u = _f_interval(alpha, f_u, null.scale_dof)
    ratio_t, f_t = _total_spread(C, null)
    lo_t, hi_t = _f_interval(alpha, f_t, null.total_dof)
    results = []
    for name, ratio, lo, hi, what in (
        ("spread_scale", ratio_u, lo_u, hi_u, "along type-2 KFAC"),
        ("spread_total", ratio_t, lo_t, hi_t, "in Frobenius norm"),
    ):
        if name == "spread_scale" and null.scale_var == 0:
            continue  # no spread along B at all; the total spread test remains
        results.append(
            StatResult(
                name,
                M,
                ratio,
                lo,
                hi,
                alpha,
                lo <= ratio <= hi,
                f"M={M}: variance over {K} seeds {what} is {ratio:.3g} times the "
                f"reference's (accepted [{lo:.3g}, {hi:.3g}], level {alpha:.1e})"
                + _spread_hint(ratio, lo, hi),
            )
        )
    return results


def _total_spread(C: Blocks, null: NullModel) -> tuple[float, float]:
    """``s² / tr Σ̂`` and the degrees of freedom ``f_c`` of ``s²``."""
    K = _count(C)
    tr, tr2 = null.total_var, null.frob_sq
    V = max(null.total_var_var, 2 * tr2)
    var_s2 = (V - 2 * tr2) / K + 2 * tr2 / (K - 1)
    s2 = _spread_sq(C) / (K - 1)
    return s2 / tr, 2 * tr**2 / var_s2


def pooled_spread_test(
    candidate: Mapping[int, Tensor | Sequence[Tensor]],
    nulls: Mapping[int, NullModel],
    alpha: float,
) -> list[StatResult]:
    """The total spread ratio pooled over every ``M`` (two-sided).

    ``P = Σ_M w_M r_M`` with ``r_M = s²_M / tr Σ̂_M`` and ``w_M ∝ f_c,M``. Each ``r_M``
    is ``≈ F(f_c,M, f_M)`` and independent of the others, so ``P ≈ F(a, b)`` with
    ``a = Σ_M f_c,M`` and ``1/b = Σ_M w_M² / f_M`` (Satterthwaite). A spread that is
    wrong by a similar factor at every ``M`` (noise shared across data) is seen with
    ``|plan|`` times the degrees of freedom of one ``M``; an ``M`` that is ignored
    (the spread does not change with ``M``) also shows.
    """
    ratios, dofs, ref_dofs = [], [], []
    for M in sorted(candidate):
        null = nulls[M]
        C = _stack(candidate[M])
        if null.zero_spread or _sanity(C, null, M) or _count(C) < 2:
            continue
        r, f = _total_spread(C, null)
        ratios.append(r)
        dofs.append(f)
        ref_dofs.append(null.total_dof)
    if len(ratios) < 2:
        return []
    w = [f / sum(dofs) for f in dofs]
    P = sum(wi * r for wi, r in zip(w, ratios))
    a = sum(dofs)
    b = 1 / sum(wi**2 / fr for wi, fr in zip(w, ref_dofs))
    lo, hi = _f_interval(alpha, a, b)
    each = ", ".join(f"M={M}: {r:.3g}" for M, r in zip(sorted(candidate), ratios))
    return [
        StatResult(
            "spread_pooled",
            None,
            P,
            lo,
            hi,
            alpha,
            lo <= P <= hi,
            f"variance over seeds in Frobenius norm, pooled over M, is {P:.3g} times "
            f"the reference's (accepted [{lo:.3g}, {hi:.3g}], level {alpha:.1e}; "
            f"{each})" + _spread_hint(P, lo, hi),
        )
    ]


def _spread_hint(ratio: float, lo: float, hi: float) -> str:
    if ratio > hi:
        return (
            ": too noisy (too few independent samples: capped, reused, or noise "
            "shared across data?)"
        )
    if ratio < lo:
        return (
            ": too little variation (seed ignored, no sampling, more samples than M?)"
        )
    return ""


def reproducibility_test(first: Tensor, repeat: Tensor) -> StatResult:
    """One seed called twice gives the same block (relative Frobenius ``1e-10``)."""
    a = first.detach().to("cpu", torch.float64)
    b = repeat.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        err = math.inf
    else:
        scale = max(float(a.norm()), float(b.norm()), 1e-300)
        err = float((a - b).norm()) / scale
    ok = err <= EXACT_RTOL
    d = (
        f"the same seed gave blocks {err:.3e} apart (relative; tolerance "
        f"{EXACT_RTOL:g})" + ("" if ok else ": the seed is ignored?")
    )
    return StatResult("reproducible", None, err, None, EXACT_RTOL, 0.0, ok, d)


def mc_verdict(
    candidate: Mapping[int, Tensor | Sequence[Tensor]],
    nulls: Mapping[int, NullModel],
    repeat: tuple[Tensor, Tensor] | None = None,
    false_alarm: float = FALSE_ALARM,
) -> Verdict:
    """The verdict of one MC check on one layer.

    Args:
        candidate: ``{M: (K, P, P) blocks}`` for the seeds :func:`candidate_seeds`.
        nulls: ``{M: NullModel}`` for the same ``M``.
        repeat: Optionally ``(block, block again)`` for one seed called twice.
        false_alarm: Stated bound on the probability that a correct implementation
            fails (the tests run at ``false_alarm / SAFETY`` in total).

    Returns:
        The :class:`Verdict`: scale tests at every ``M``; Frobenius and spread tests
        at the largest ``M``; the reproducibility test if ``repeat`` is given.
    """
    if set(candidate) != set(nulls):
        raise ValueError(f"M values differ: {sorted(candidate)} vs {sorted(nulls)}")
    alphas = allocate(list(candidate), false_alarm)
    top = max(candidate)
    tests: list[StatResult] = []
    for M in sorted(candidate):
        a_f = alphas[("frobenius", M)] if M == top else None
        tests += mean_tests(
            candidate[M], nulls[M].mean, nulls[M], alphas[("scale", M)], a_f
        )
    tests += spread_tests(candidate[top], nulls[top], alphas[("spread_total", top)])
    if ("spread_pooled", None) in alphas:
        tests += pooled_spread_test(candidate, nulls, alphas[("spread_pooled", None)])
    if repeat is not None:
        tests.append(reproducibility_test(*repeat))
    tests = _dedupe(tests)
    return Verdict(
        passed=all(t.passed for t in tests),
        tests=tests,
        false_alarm=false_alarm,
        gaussian_warning=_skew_warning(nulls[top], _num(candidate[top])),
    )


def mean_consistent(
    candidate: Mapping[int, Tensor | Sequence[Tensor]],
    hypothesis: Mapping[int, Block],
    nulls: Mapping[int, NullModel],
    spread_scale: Mapping[int, float] | float = 1.0,
    false_alarm: float = FALSE_ALARM,
    what: str = "the hypothesis",
) -> Verdict:
    """Is the candidate's mean consistent with ``hypothesis[M]`` at every ``M``?

    The same mean tests, at the same levels, as :func:`mc_verdict`: with
    ``hypothesis[M] = nulls[M].mean`` and ``spread_scale = 1`` the results equal the
    verdict's mean tests. For a hypothesis ``c · B_alt`` pass ``spread_scale = c``
    (:func:`fit_scale` gives ``c``).
    """
    if set(candidate) != set(nulls) or set(hypothesis) != set(nulls):
        raise ValueError("candidate, hypothesis and nulls need the same M values")
    alphas = allocate(list(candidate), false_alarm)
    top = max(candidate)
    tests: list[StatResult] = []
    for M in sorted(candidate):
        s = spread_scale[M] if isinstance(spread_scale, Mapping) else spread_scale
        a_f = alphas[("frobenius", M)] if M == top else None
        tests += mean_tests(
            candidate[M], hypothesis[M], nulls[M], alphas[("scale", M)], a_f, s, what
        )
    return Verdict(
        passed=all(t.passed for t in tests),
        tests=tests,
        false_alarm=false_alarm,
        gaussian_warning=_skew_warning(nulls[top], _num(candidate[top])),
    )


def fit_scale(blocks, hypothesis: Block) -> float:
    """Least-squares ``c`` with ``mean(blocks) ≈ c · hypothesis``: ``⟨C̄, H⟩/⟨H, H⟩``."""
    stacked = _stack(blocks)
    if isinstance(stacked, KroneckerBlocks):
        assert isinstance(hypothesis, KroneckerOperator)
        hh = _inner(hypothesis, hypothesis)
        return float(stacked.along(hypothesis).mean()) / hh if hh > 0 else math.nan
    assert isinstance(hypothesis, Tensor)
    C = stacked.mean(0)
    H = hypothesis.detach().to("cpu", torch.float64)
    hh = float((H * H).sum())
    return float((C * H).sum()) / hh if hh > 0 else math.nan


def scaled(block: Block, c: float) -> Block:
    """``c · block`` (a Kronecker operator stays one: ``c`` on ``G``)."""
    if isinstance(block, KroneckerOperator):
        return ks.scaled(block, c)
    return c * block


def _num(blocks) -> int:
    return blocks.shape[0] if isinstance(blocks, Tensor) else len(blocks)


def _dedupe(tests: list[StatResult]) -> list[StatResult]:
    """Drop repeated exact results (zero-spread nulls report once per M)."""
    seen, out = set(), []
    for t in tests:
        key = (t.name, t.mc_samples) if t.name in ("exact", "shape", "finite") else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def _skew_warning(null: NullModel, K: int) -> bool:
    return not null.zero_spread and abs(null.scale_skew) / math.sqrt(K) > SKEW_WARNING


# Thresholds -------------------------------------------------------------------------


def _scale_interval(alpha: float, null: NullModel, K: int) -> tuple[float, float]:
    """Acceptance interval of ``T_s`` (two-sided, ``alpha/2`` per side)."""
    se = math.sqrt(6 / null.num_draws)
    g = null.scale_skew
    nu = null.scale_dof
    hi = _ratio_quantile(alpha / 2, (g + se) / math.sqrt(K), nu)
    lo = -_ratio_quantile(alpha / 2, (se - g) / math.sqrt(K), nu)
    return lo, hi


@lru_cache(maxsize=4096)
def _ratio_quantile(alpha: float, skew: float, nu: float) -> float:
    """``t`` with ``P(X / √(χ²_ν/ν) > t) = alpha`` (``nu = inf``: ``P(X > t)``).

    ``X`` is a standardised Pearson type III variable with skewness ``skew``
    (``(G − k)/√k`` with ``G ~ Gamma(k)``, ``k = 4/skew²``; mirrored for negative
    skew; normal for ``|skew| < 1e-6``).
    """

    def tail_x(x: np.ndarray) -> np.ndarray:
        if abs(skew) < 1e-6:
            return stats.norm.sf(x)
        k = 4 / skew**2
        if skew > 0:
            return stats.gamma.sf(k + x * math.sqrt(k), k)
        return stats.gamma.cdf(k - x * math.sqrt(k), k)

    if math.isfinite(nu):
        # E_W[P(X > t √(W/ν))], W ~ χ²_ν, by Gauss-Legendre quadrature in log W
        # (a smooth, bell-shaped integrand) over [F⁻¹(α·1e-4), F⁻¹(1 − 1e-15)]
        lo = math.log(float(stats.chi2.ppf(alpha * 1e-4, nu)))
        hi = math.log(float(stats.chi2.isf(1e-15, nu)))
        nodes, weights = np.polynomial.legendre.leggauss(QUADRATURE_NODES)
        s_ = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
        w = np.exp(s_)
        mass = 0.5 * (hi - lo) * weights * stats.chi2.pdf(w, nu) * w
        root = np.sqrt(w / nu)

    def tail(t: float) -> float:
        if not math.isfinite(nu):  # σ known
            return float(tail_x(np.asarray(t)))
        # P(W < lower limit) is at most alpha·1e-4: counted as a full tail
        return alpha * 1e-4 + float((mass * tail_x(t * root)).sum())

    f = lambda t: math.log(max(tail(t), 1e-300)) - math.log(alpha)  # noqa: E731
    hi = 10.0
    while f(hi) > 0:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-6))


@lru_cache(maxsize=4096)
def _f_interval(alpha: float, dfn: float, dfd: float) -> tuple[float, float]:
    """``[F⁻¹(α/2), F⁻¹(1 − α/2)]`` of ``F(dfn, dfd)``."""
    return (
        float(stats.f.ppf(alpha / 2, dfn, dfd)),
        float(stats.f.isf(alpha / 2, dfn, dfd)),
    )


def _frobenius_threshold(alpha: float, null: NullModel) -> float:
    """Bound on ``K ‖C̄ − B‖² / tr Σ̂`` at level ``alpha`` (half each to both parts)."""
    a1 = a2 = alpha / 2
    x = math.log(1 / a1)
    rho2 = null.frob_sq / null.total_var**2
    rho_inf = null.lambda_max / null.total_var
    laurent_massart = 1 + 2 * math.sqrt(x * rho2) + 2 * x * rho_inf
    szekely_bakirov = float(stats.chi2.isf(a1, 1)) if a1 <= 0.215 else math.inf
    f = null.total_dof
    b = float(stats.chi2.ppf(a2, f)) / f
    return min(laurent_massart, szekely_bakirov) / b
