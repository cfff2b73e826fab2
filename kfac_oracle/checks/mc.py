"""Monte-Carlo: MC-KFAC converges to type-2 KFAC (E6), with a stated failure rate.

The candidate is called with ``K = 10`` seeds and ``M = 100`` samples per datum.
With ``C_k`` the K blocks (iid, mean ``B`` = the reference type-2 KFAC block for a
correct implementation), Chebyshev's inequality for their mean ``C̄`` gives
``P(‖C̄ − B‖_F ≥ t) ≤ σ² / (K t²)`` with ``σ² = E‖C_k − B‖²_F``. We estimate ``σ²`` by
the sample variance ``s²`` of the ``C_k`` and take ``t = s / √(K δ)`` with
``δ = 0.01``: a correct implementation fails with probability about 1% per layer and
seed set (deterministically reproducible for fixed seeds). A constant-factor error
shows as a bias much larger than ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from kfac_oracle.catalogue import Case
from kfac_oracle.checks.compare import compare_blocks, masked_reference, rel_error
from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.diagnose import diagnose_layer
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.checks.registry import Target, check, family
from kfac_oracle.diagnosis import name_scalar, named_scales, shared_positions
from kfac_oracle.errors import Unsupported
from kfac_oracle.flavours import FisherType, Flavour

family(rank=3)

NUM_SEEDS = 10
MC_SAMPLES = 100
DELTA = 0.01
VARIANCE_RATIO_MIN = 10.0


def convergence_claims(case: Case, prefix: str) -> Iterator[Target]:
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


def _blocks(ctx: CheckContext, kfac_approx: str, M: int):
    keys = [ctx.key(FisherType.MC, kfac_approx, M, seed) for seed in range(NUM_SEEDS)]
    results = [ctx.candidate(k) for k in keys]
    return results, torch.stack([r.blocks[ctx.layer] for r in results])


def _converges(ctx: CheckContext, kfac_approx: str):
    results, blocks = _blocks(ctx, kfac_approx, MC_SAMPLES)
    bias = results[0].bias[ctx.layer]
    reference = ctx.reference(
        Flavour(FisherType.TYPE2, kfac_approx, ctx.reference_bias(bias))
    )[ctx.layer]
    reference = masked_reference(reference, bias, ctx.module())
    return results, blocks, bias, reference


def _diagnose_converges(
    ctx: CheckContext, outcome: Outcome, *, fisher_type: str, kfac_approx: str
) -> str:
    results, blocks, bias, _ = _converges(ctx, kfac_approx)
    mean = blocks.mean(0)
    s2 = ((blocks - mean) ** 2).sum((1, 2)).sum().item() / (NUM_SEEDS - 1)
    t = math.sqrt(s2 / (NUM_SEEDS * DELTA))
    problem = ctx.problem()
    scales = named_scales(problem, shared_positions(problem, ctx.layer), MC_SAMPLES)
    for flavour, why in (
        (FisherType.TYPE2, ""),
        (
            FisherType.EMPIRICAL,
            "true labels used instead of sampled ones (empirical Fisher)",
        ),
    ):
        B = ctx.reference(Flavour(flavour, kfac_approx, ctx.reference_bias(bias)))[
            ctx.layer
        ]
        B = masked_reference(B, bias, ctx.module())
        tol = max(t, 1e-10 * B.norm().item())
        c = ((mean * B).sum() / (B * B).sum()).item()
        if (mean - c * B).norm().item() <= tol:
            if abs(c - 1) * B.norm().item() <= tol:
                return why or "within the statistical bound of type-2 KFAC"
            named = name_scalar(c, scales, rtol=3 * tol / (abs(c) * B.norm().item()))
            return f"{why}, with {named}" if why else f"MC-KFAC off by {named}"
    return "no known pitfall explains this"


@check(
    targets=lambda case: convergence_claims(case, "mc_converges"),
    diagnose=_diagnose_converges,
)
def mc_converges(ctx: CheckContext, *, fisher_type: str, kfac_approx: str) -> Outcome:
    """MC-KFAC with M samples converges to type-2 KFAC as M grows (E6)."""
    _require_convergence(ctx)
    results, blocks, bias, reference = _converges(ctx, kfac_approx)
    layer = ctx.layer
    if blocks.shape[1:] != reference.shape:
        return Outcome("failed", None, None, f"block shape {tuple(blocks.shape[1:])}")
    mean = blocks.mean(0)
    s2 = ((blocks - mean) ** 2).sum((1, 2)).sum() / (NUM_SEEDS - 1)
    t = math.sqrt(s2.item() / (NUM_SEEDS * DELTA))
    err = (mean - reference).norm().item()
    scale = reference.norm().item()
    rel, rel_t = err / scale, t / scale
    if s2.item() == 0:
        return Outcome(
            "failed",
            rel,
            rel_t,
            f"layer {layer}: the {NUM_SEEDS} seeds gave identical MC results "
            "(seed ignored, or no sampling)",
        )
    return Outcome(
        "passed" if err <= t else "failed",
        rel,
        rel_t,
        f"layer {layer}: mean of {NUM_SEEDS} MC runs (M={MC_SAMPLES}) is "
        f"{rel:.3e} from type-2 KFAC (relative); bound {rel_t:.3e} at failure "
        f"probability ~{DELTA:g}; single run {rel_error(blocks[0], reference):.3e}",
    )


def _spread(ctx: CheckContext, kfac_approx: str, M: int) -> float:
    _, blocks = _blocks(ctx, kfac_approx, M)
    return ((blocks - blocks.mean(0)) ** 2).sum().item() / (NUM_SEEDS - 1)


def _diagnose_variance(ctx: CheckContext, outcome: Outcome, **_: object) -> str:
    return (
        "MC samples not independent (one sample reused?): docs/theory.md §7, pitfall 9"
    )


@check(
    targets=lambda case: convergence_claims(case, "mc_variance"),
    diagnose=_diagnose_variance,
)
def mc_variance(ctx: CheckContext, *, fisher_type: str, kfac_approx: str) -> Outcome:
    """The spread over seeds shrinks like 1/M: ``s²(M=1) / s²(M=100) ≈ 100``."""
    _require_convergence(ctx)
    s1, sM = _spread(ctx, kfac_approx, 1), _spread(ctx, kfac_approx, MC_SAMPLES)
    if sM == 0:
        return Outcome(
            "failed", None, VARIANCE_RATIO_MIN, "no spread over seeds at all"
        )
    ratio = s1 / sM
    return Outcome(
        "passed" if ratio >= VARIANCE_RATIO_MIN else "failed",
        ratio,
        VARIANCE_RATIO_MIN,
        f"layer {ctx.layer}: variance over seeds with M=1 / with M={MC_SAMPLES} = "
        f"{ratio:.3g} (expected ~{MC_SAMPLES}, required >= {VARIANCE_RATIO_MIN:g})",
    )


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


@check(targets=zero_variance_claims, diagnose=diagnose_layer)
def mc_exact(ctx: CheckContext, *, fisher_type: str, kfac_approx: str) -> Outcome:
    """Where sampling has no variance, MC-KFAC equals type-2 KFAC for any M and seed.

    With two-class cross-entropy at equal logits (p = ½) or BCE at logit 0 (σ = ½)
    every sampled gradient outer product equals the loss Hessian, so each MC result
    must equal the type-2 block to a relative error of 1e-10 (docs/theory.md E6):
    every error in the MC normalisation or sampling scale shows exactly.
    """
    assert ctx.layer is not None
    worst: Outcome | None = None
    for M, seed in ZERO_VARIANCE_CALLS:
        result = ctx.candidate(ctx.key(fisher_type, kfac_approx, M, seed))
        bias = ctx.reference_bias(result.bias[ctx.layer])
        reference = ctx.reference(Flavour(FisherType.TYPE2, kfac_approx, bias))
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

    c = fit_scalar(C, B)
    if c is None:
        return None
    problem = ctx.problem()
    assert ctx.layer is not None
    scales = named_scales(problem, shared_positions(problem, ctx.layer), M)
    if M > 1:
        scales[f"M/(M-1) = {M}/{M - 1} (1/(M-1) normalisation)"] = M / (M - 1)
    return f"MC-KFAC off by {name_scalar(c, scales)} (M = {M})"
