"""Monte-Carlo: MC-KFAC is unbiased for type-2 KFAC (E6) and as random as it should be.

The candidate is called with ``K = 16`` seeds at each ``M`` of
:data:`kfac_oracle.statistics.PLAN` (``M = 1, 2, 3, 100``: small ``M`` exposes
``M``-dependent normalisations such as ``1/(M−1)``, large ``M`` small scale errors).
It is compared with the distribution of the oracle's *own* MC-KFAC, from 400 reference
draws per ``M`` with seeds disjoint from the candidate's — never with the candidate's
own spread, which a noisier or wrongly scaled candidate would widen.

- ``mc_converges``: the mean of the candidate's blocks is type-2 KFAC — a scale test
  along the type-2 block at every ``M`` and a Frobenius test at the largest;
- ``mc_variance``: the seed-to-seed spread matches the reference's (catches samplers
  capped at a few samples, one sample reused, noise shared across data, an ignored
  seed);
- ``mc_exact``: where sampling has no variance, every MC result equals type-2 KFAC.

Blocks too large to densify (:mod:`kfac_oracle.operators`) enter the same statistics
through inner products of their Kronecker factors, ``⟨G₁ ⊗ A₁, G₂ ⊗ A₂⟩ =
⟨G₁, G₂⟩⟨A₁, A₂⟩`` (:mod:`kfac_oracle.kronecker_statistics`), against null models
from the reference's own draws, also kept as factors: the same verdicts, never a
dense block. A candidate that gives such blocks only as products (``MatVecBlock``)
or dense is not tested there: inner products between its blocks would need probe
estimates, whose noise the calibration does not include.

Each statistical check's probability of failing a correct implementation is at most
1e-6 (derivation: :mod:`kfac_oracle.statistics`, docs/monte-carlo.md); for fixed seeds
the verdict is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any
from weakref import WeakKeyDictionary

import torch

from kfac_oracle import kronecker_statistics as ks
from kfac_oracle import statistics as st
from kfac_oracle.catalogue import Case
from kfac_oracle.checks.compare import compare_blocks
from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.diagnose import diagnose_layer
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.checks.registry import Target, check, family
from kfac_oracle.conventions import weight_shape_2d
from kfac_oracle.diagnosis import name_scalar, named_scales, shared_positions
from kfac_oracle.errors import Unsupported
from kfac_oracle.flavours import FisherType, Flavour
from kfac_oracle.operators import KroneckerOperator, block_size, too_large

family(rank=3)

MEAN_TESTS = ("scale", "frobenius", "exact", "finite", "shape")
SPREAD_TESTS = (
    "spread_scale",
    "spread_total",
    "spread_pooled",
    "exact",
    "finite",
    "shape",
)


def convergence_claims(case: Case, prefix: str) -> Iterator[Target]:
    """One target per layer with an ``mc_convergence`` claim."""
    for layer in case.layers:
        for claim in case.claims_for(layer):
            if claim.statement == "mc_convergence":
                yield Target(
                    f"{prefix}_{claim.kfac_approx}",
                    layer,
                    str(FisherType.MC),
                    claim.kfac_approx,
                )


def _require_convergence(ctx: CheckContext) -> None:
    if not ctx.approximation.mc_convergence:
        raise Unsupported(
            f"MC convergence is defined for KFAC, not {ctx.approximation.name.upper()}"
        )


#: Numbers of Kronecker factors held at once when the seeds of several large layers
#: are swept together (each sweep calls the candidate ``Σ K`` = 64 times).
SWEEP_NUMBERS = 2**26

# Verdicts of large layers, per candidate caller: ``{(case, layer, approx): ...}``.
_LARGE_VERDICTS: WeakKeyDictionary[object, dict[tuple[str, str, str], Any]] = (
    WeakKeyDictionary()
)


def _blocks(
    ctx: CheckContext, kfac_approx: str, layers: list[str] | None = None
) -> tuple[dict[str, dict[int, Any]], dict[str, str]]:
    """The candidate's blocks ``{layer: {M: (K, P, P)}}`` and bias modes.

    ``layers`` defaults to the check's layer. Blocks too large to densify stay
    Kronecker operators (``{M: [K operators]}``).
    """
    assert ctx.layer is not None
    layers = [ctx.layer] if layers is None else layers
    out: dict[str, dict[int, Any]] = {layer: {} for layer in layers}
    bias: dict[str, str] = {}
    for M, K in st.PLAN:
        results = [
            ctx.candidate(ctx.key(FisherType.MC, kfac_approx, M, seed))
            for seed in st.candidate_seeds(K)
        ]
        for layer in layers:
            bias.setdefault(layer, results[0].bias[layer])
            blocks = [r.blocks[layer] for r in results]
            if too_large(block_size(ctx.module(layer))):
                out[layer][M] = blocks
            else:
                out[layer][M] = torch.stack(blocks)
    return out, bias


def _unsupported_blocks(
    ctx: CheckContext, layer: str, blocks: dict[int, Any]
) -> Unsupported | None:
    """Blocks too large to densify must be Kronecker factors for the statistics."""
    kinds = {
        type(b).__name__
        for by_m in blocks.values()
        for b in by_m
        if not isinstance(b, KroneckerOperator)
    }
    if not kinds:
        return None
    return Unsupported(
        f"layer {layer!r} is too large to densify ({block_size(ctx.module(layer))} "
        f"parameters) and the candidate's MC blocks are not Kronecker factors "
        f"({', '.join(sorted(kinds))}): the statistics need inner products between "
        "blocks, exact from factors only (probe estimates would add noise the "
        "calibration does not include)"
    )


def _sweep_group(ctx: CheckContext, kfac_approx: str) -> list[str]:
    """The check's large layer and the next ones with an MC claim, within budget."""
    assert ctx.layer is not None
    claimed = [
        t.layer
        for t in convergence_claims(ctx.case, "")
        if t.kfac_approx == kfac_approx
        and t.layer is not None
        and too_large(block_size(ctx.module(t.layer)))
    ]
    done = _LARGE_VERDICTS.get(ctx.caller, {})
    start = claimed.index(ctx.layer) if ctx.layer in claimed else 0
    group: list[str] = []
    numbers = 0
    calls = sum(K for _, K in st.PLAN)
    for layer in [ctx.layer] + claimed[start + 1 :]:
        if (ctx.case.id, layer, kfac_approx) in done:
            continue
        module = ctx.module(layer)
        cost = calls * _factor_numbers(module)
        if group and numbers + cost > SWEEP_NUMBERS:
            break
        group.append(layer)
        numbers += cost
    return group


def _factor_numbers(module: Any) -> int:
    """Entries of ``A`` (with a bias column), ``G`` and a separate bias block."""
    d_out, d_in = weight_shape_2d(module)
    return (d_in + 1) ** 2 + 2 * d_out**2


def _verdict(
    ctx: CheckContext, kfac_approx: str
) -> tuple[st.Verdict, dict | None, dict]:
    """The statistical verdict of the layer, with the blocks and null models.

    For a layer too large to densify the candidate's seeds are swept once for it
    and the next large layers with an MC claim (:data:`SWEEP_NUMBERS`), and the
    verdicts are kept for the run (``mc_converges`` and ``mc_variance`` share one);
    the blocks are then not returned (``None``).

    Raises:
        Unsupported: If a large layer's MC blocks are not Kronecker factors.
    """
    assert ctx.layer is not None
    if not too_large(block_size(ctx.module())):
        blocks, bias = _blocks(ctx, kfac_approx)
        nulls = ctx.references.mc_nulls(
            ctx.case, kfac_approx, ctx.reference_bias(bias[ctx.layer])
        )
        layer_nulls = nulls[ctx.layer]
        mine = blocks[ctx.layer]
        return st.mc_verdict(mine, layer_nulls), mine, layer_nulls
    key = (ctx.case.id, ctx.layer, kfac_approx)
    done = _LARGE_VERDICTS.setdefault(ctx.caller, {})
    if key not in done:
        group = _sweep_group(ctx, kfac_approx)
        blocks, bias = _blocks(ctx, kfac_approx, group)
        for layer in group:
            problem = _unsupported_blocks(ctx, layer, blocks[layer])
            if problem is not None:
                done[(ctx.case.id, layer, kfac_approx)] = problem
                continue
            nulls = ctx.references.mc_nulls(
                ctx.case, kfac_approx, ctx.reference_bias(bias[layer])
            )
            done[(ctx.case.id, layer, kfac_approx)] = (
                st.mc_verdict(blocks[layer], nulls[layer]),
                nulls[layer],
            )
        del blocks
    found = done[key]
    if isinstance(found, Unsupported):
        raise found
    verdict, layer_nulls = found
    return verdict, None, layer_nulls


def _outcome(verdict: st.Verdict, names: tuple[str, ...], what: str) -> Outcome:
    tests = [t for t in verdict.tests if t.name in names]
    failed = [t for t in tests if not t.passed]
    statistical = [t for t in tests if t.alpha > 0]
    closest = max(statistical, key=st.closeness, default=None)
    error = None if closest is None else st.closeness(closest)
    message = (
        "; ".join(t.detail for t in failed)
        if failed
        else f"{len(tests)} tests passed ({what}); closest to its bound: "
        + (closest.detail if closest is not None else "none")
    )
    note = f" [false-alarm probability <= {verdict.false_alarm:g} per check]"
    return Outcome(
        "failed" if failed else "passed",
        error,
        1.0 if statistical else None,
        message + note,
    )


def _diagnose_converges(
    ctx: CheckContext, outcome: Outcome, *, fisher_type: str, kfac_approx: str
) -> str:
    """Name a scale (constant, or depending on ``M``) or true labels.

    Each hypothesis is tested with the verdict's own mean tests at the same levels.
    """
    verdict, blocks, nulls = _verdict(ctx, kfac_approx)
    if blocks is None:  # a large layer: the blocks again, for this layer only
        assert ctx.layer is not None
        blocks = _blocks(ctx, kfac_approx)[0][ctx.layer]
    failed = {t.name for t in verdict.failures}
    if failed & {"finite", "shape"}:
        return "ill-formed MC results (shape or NaN/inf)"
    B = {M: nulls[M].mean for M in blocks}
    scales = {M: st.fit_scale(blocks[M], B[M]) for M in blocks}
    if all(math.isfinite(c) for c in scales.values()):
        hypothesis = {M: st.scaled(B[M], scales[M]) for M in blocks}
        if st.mean_consistent(blocks, hypothesis, nulls, scales).passed:
            return _name_scales(ctx, scales)
    assert ctx.layer is not None
    bias = next(iter(ctx.candidate(ctx.key("mc", kfac_approx, 1, 0)).bias.values()))
    flavour = Flavour("empirical", kfac_approx, ctx.reference_bias(bias))
    ef = ctx.references.kfac_blocks(ctx.case, flavour)[ctx.layer]
    c = {M: st.fit_scale(blocks[M], ef) for M in blocks}
    alternative = {M: st.scaled(ef, c[M]) for M in blocks}
    if st.mean_consistent(blocks, alternative, nulls, c).passed:
        why = "true labels used instead of sampled ones (empirical Fisher)"
        if all(abs(x - 1) < 1e-3 for x in c.values()):
            return why
        return f"{why}, with {_name_scales(ctx, c)}"
    return "no known pitfall explains this (the tests: " + verdict.message + ")"


def _name_scales(ctx: CheckContext, scales: dict[int, float]) -> str:
    """Describe per-``M`` factors: one constant, ``M``, ``1/M``, ``M/(M−1)``."""
    assert ctx.layer is not None
    Ms = sorted(scales)
    for how, f in (
        ("a missing 1/M (the factor equals M)", lambda M: float(M)),
        ("1/M applied twice (the factor equals 1/M)", lambda M: 1.0 / M),
    ):
        if all(abs(scales[M] / f(M) - 1) < 0.05 for M in Ms):
            return f"MC-KFAC off by {how}"
    if all(M > 1 for M in Ms) or len(Ms) > 1:
        ratio = [M / (M - 1) for M in Ms if M > 1]
        if ratio and all(
            abs(scales[M] / (M / (M - 1)) - 1) < 0.05 for M in Ms if M > 1
        ):
            return "MC-KFAC normalised by 1/(M-1) instead of 1/M"
    c = sum(scales.values()) / len(scales)
    if all(abs(scales[M] / c - 1) < 0.02 for M in Ms):
        if abs(c - 1) < 1e-3:
            return "consistent with type-2 KFAC in the mean (see the spread tests)"
        problem = ctx.problem()
        named = named_scales(problem, shared_positions(problem, ctx.layer), 1)
        return f"MC-KFAC off by {name_scalar(c, named, rtol=0.02)}"
    listed = ", ".join(f"M={M}: {scales[M]:.4g}" for M in Ms)
    return f"MC-KFAC scaled by a factor that depends on M ({listed})"


@check(
    targets=lambda case: convergence_claims(case, "mc_converges"),
    diagnose=_diagnose_converges,
    matrix_free=True,
    float32=True,
)
def mc_converges(ctx: CheckContext, *, fisher_type: str, kfac_approx: str) -> Outcome:
    """The mean of MC-KFAC over seeds is type-2 KFAC, at every M (E6).

    Scale test along the type-2 block at M = 1, 2, 3, 100 and a Frobenius test at
    M = 100, against the distribution of the reference's own MC-KFAC.
    """
    _require_convergence(ctx)
    verdict, _, _ = _verdict(ctx, kfac_approx)
    return _outcome(verdict, MEAN_TESTS, "mean is type-2 KFAC")


def _diagnose_variance(ctx: CheckContext, outcome: Outcome, **_: object) -> str:
    if "too noisy" in outcome.message:
        return (
            "MC samples not independent or fewer than M (capped, reused, or noise "
            "shared across data): docs/theory.md §7, pitfall 9"
        )
    if "too little variation" in outcome.message:
        return (
            "MC results vary too little (seed ignored, no sampling, or more samples "
            "than M): docs/theory.md §7, pitfall 9"
        )
    return "MC spread differs from the reference's: docs/theory.md §7, pitfall 9"


@check(
    targets=lambda case: convergence_claims(case, "mc_variance"),
    diagnose=_diagnose_variance,
    matrix_free=True,
    float32=True,
)
def mc_variance(ctx: CheckContext, *, fisher_type: str, kfac_approx: str) -> Outcome:
    """The spread of MC-KFAC over seeds is that of M independent samples per datum.

    Along the type-2 block and in total at M = 100, pooled over every M, against the
    reference's own spread (two-sided).
    """
    _require_convergence(ctx)
    verdict, _, _ = _verdict(ctx, kfac_approx)
    return _outcome(verdict, SPREAD_TESTS, "spread is the reference's")


def zero_variance_claims(case: Case) -> Iterator[Target]:
    """One target per layer with an ``mc_exact`` claim."""
    for layer in case.layers:
        for claim in case.claims_for(layer):
            if claim.statement == "mc_exact":
                yield Target(
                    f"mc_exact_{claim.kfac_approx}",
                    layer,
                    str(FisherType.MC),
                    claim.kfac_approx,
                )


# (M, seed) of the zero-variance check: M = 1 and 2 expose M-dependent
# normalisations (1/(M-1), 1/M², a missing 1/M) as clearly as large M.
ZERO_VARIANCE_CALLS = ((1, 0), (2, 1), (7, 2))


@check(
    targets=zero_variance_claims,
    diagnose=diagnose_layer,
    matrix_free=True,
    float32=True,
)
def mc_exact(ctx: CheckContext, *, fisher_type: str, kfac_approx: str) -> Outcome:
    """Where sampling has no variance, MC-KFAC equals type-2 KFAC for any M and seed.

    With two-class cross-entropy at equal logits (p = ½) or BCE at logit 0 (σ = ½)
    every sampled gradient outer product equals the loss Hessian, so each MC result
    must equal the type-2 block to a relative error of 1e-10 (docs/theory.md E6;
    float32: the measured rounding tolerance of the type-2 block): every error in
    the MC normalisation or sampling scale shows exactly. Blocks too large to
    densify are compared matrix-free (factor level or probes).
    """
    assert ctx.layer is not None
    worst: Outcome | None = None
    for M, seed in ZERO_VARIANCE_CALLS:
        result = ctx.candidate(ctx.key(fisher_type, kfac_approx, M, seed))
        bias = ctx.reference_bias(result.bias[ctx.layer])
        type2 = Flavour(FisherType.TYPE2, kfac_approx, bias)
        reference = ctx.reference(type2)
        rtol, basis = ctx.block_tolerance(type2)
        what = (
            f"layer {ctx.layer}, MC with M={M}, seed {seed} vs type-2 "
            f"{ctx.approximation.title.removeprefix('reference ')} (zero variance)"
        )
        outcome = compare_blocks(
            result.blocks[ctx.layer],
            reference[ctx.layer],
            result.bias[ctx.layer],
            ctx.module(),
            what,
            rtol,
            basis,
        )
        if worst is None or (outcome.error or 0.0) > (worst.error or 0.0):
            worst = outcome
        if not outcome.passed:
            outcome.diagnosis = _zero_variance_diagnosis(
                ctx, outcome, result.blocks[ctx.layer], reference[ctx.layer], M
            )
            return outcome
    assert worst is not None
    return worst


def _zero_variance_diagnosis(
    ctx: CheckContext, outcome: Outcome, C: torch.Tensor, B: torch.Tensor, M: int
) -> str | None:
    """Name a constant factor between the MC and the type-2 block, if there is one."""
    from kfac_oracle.diagnosis import fit_scalar
    from kfac_oracle.diagnosis.fit import FIT_RTOL

    if isinstance(C, KroneckerOperator) and isinstance(B, KroneckerOperator):
        c = ks.fit_scalar(C, B, FIT_RTOL)
    elif isinstance(C, torch.Tensor) and isinstance(B, torch.Tensor):
        c = fit_scalar(C, B)
    else:
        return None
    if c is None:
        return None
    problem = ctx.problem()
    assert ctx.layer is not None
    scales = named_scales(problem, shared_positions(problem, ctx.layer), M)
    if M > 1:
        scales[f"M/(M-1) = {M}/{M - 1} (1/(M-1) normalisation)"] = M / (M - 1)
    return f"MC-KFAC off by {name_scalar(c, scales)} (M = {M})"
