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

import torch

from kfac_oracle.catalogue import Case
from kfac_oracle.checks.base import (
    CheckItem,
    CheckSession,
    RequestKey,
    Unsupported,
    rel_error,
)
from kfac_oracle.checks.compare import masked_reference
from kfac_oracle.checks.diagnose import supported_or_raise
from kfac_oracle.diagnosis import name_scalar, named_scales, shared_positions

NUM_SEEDS = 10
MC_SAMPLES = 100
DELTA = 0.01


def items(impl, case: Case) -> list[CheckItem]:
    """Per layer carrying an E6 claim: convergence, and the variance's 1/M decay."""
    out = []
    for layer in case.layers:
        for claim in case.claims_for(layer):
            if claim.statement == "mc_convergence":
                out.append(_item(case, layer, claim.kfac_approx))
                out.append(_variance_item(case, layer, claim.kfac_approx))
    return out


VARIANCE_RATIO_MIN = 10.0


def _variance_item(case: Case, layer: str, approx: str) -> CheckItem:
    """The spread over seeds must shrink like 1/M: ``s²(M=1) / s²(M=100) ≈ 100``.

    A ratio below 10 (a tenth of the expected value) means the M samples are not
    independent (e.g. one sample reused): with K = 10 seeds the estimated variances
    have relative spread ~0.5, so a correct implementation falls below 10 with
    negligible probability.
    """

    def spread(session, M):
        keys = [RequestKey(case.id, "mc", approx, M, seed) for seed in range(NUM_SEEDS)]
        blocks = torch.stack([session.candidate(case, k).blocks[layer] for k in keys])
        return ((blocks - blocks.mean(0)) ** 2).sum().item() / (NUM_SEEDS - 1)

    def run(session: CheckSession):
        supported_or_raise(session.impl, case, "mc", approx)
        if session.approximation == "ekfac":
            raise Unsupported("MC convergence is defined for KFAC, not EKFAC")
        s1, sM = spread(session, 1), spread(session, MC_SAMPLES)
        if sM == 0:
            return "failed", None, VARIANCE_RATIO_MIN, "no spread over seeds at all"
        ratio = s1 / sM
        status = "passed" if ratio >= VARIANCE_RATIO_MIN else "failed"
        return (
            status,
            ratio,
            VARIANCE_RATIO_MIN,
            f"layer {layer}: variance over seeds with M=1 / with M={MC_SAMPLES} = "
            f"{ratio:.3g} (expected ~{MC_SAMPLES}, required >= {VARIANCE_RATIO_MIN:g})",
        )

    def diagnose(session):
        return "MC samples not independent (one sample reused?): notes §7, pitfall 9"

    return CheckItem(f"mc_variance_{approx}", "mc", case, layer, run, diagnose)


def _item(case: Case, layer: str, approx: str) -> CheckItem:
    keys = [
        RequestKey(case.id, "mc", approx, MC_SAMPLES, seed) for seed in range(NUM_SEEDS)
    ]

    def run(session: CheckSession):
        supported_or_raise(session.impl, case, "mc", approx)
        if session.approximation == "ekfac":
            raise Unsupported("MC convergence is defined for KFAC, not EKFAC")
        results = [session.candidate(case, key) for key in keys]
        bias = results[0].bias[layer]
        blocks = torch.stack([r.blocks[layer] for r in results])
        ref_bias = bias if bias != "none" else "joint"
        reference = session.reference_blocks(case, "type-2", approx, ref_bias)[layer]
        module = session.problem(case).model.get_submodule(layer)
        reference = masked_reference(reference, bias, module)
        if blocks.shape[1:] != reference.shape:
            return "failed", None, None, f"block shape {tuple(blocks.shape[1:])}"
        mean = blocks.mean(0)
        s2 = ((blocks - mean) ** 2).sum((1, 2)).sum() / (NUM_SEEDS - 1)
        t = math.sqrt(s2.item() / (NUM_SEEDS * DELTA))
        err = (mean - reference).norm().item()
        scale = reference.norm().item()
        rel, rel_t = err / scale, t / scale
        if s2.item() == 0:
            return (
                "failed",
                rel,
                rel_t,
                f"layer {layer}: the {NUM_SEEDS} seeds gave identical MC results "
                "(seed ignored, or no sampling)",
            )
        status = "passed" if err <= t else "failed"
        return (
            status,
            rel,
            rel_t,
            f"layer {layer}: mean of {NUM_SEEDS} MC runs (M={MC_SAMPLES}) is "
            f"{rel:.3e} from type-2 KFAC (relative); bound {rel_t:.3e} at failure "
            f"probability ~{DELTA:g}; single run {rel_error(blocks[0], reference):.3e}",
        )

    def diagnose(session: CheckSession) -> str:
        results = [session.candidate(case, key) for key in keys]
        bias = results[0].bias[layer]
        blocks = torch.stack([r.blocks[layer] for r in results])
        mean = blocks.mean(0)
        s2 = ((blocks - mean) ** 2).sum((1, 2)).sum().item() / (NUM_SEEDS - 1)
        t = math.sqrt(s2 / (NUM_SEEDS * DELTA))
        ref_bias = bias if bias != "none" else "joint"
        module = session.problem(case).model.get_submodule(layer)
        problem = session.problem(case)
        scales = named_scales(problem, shared_positions(problem, layer), MC_SAMPLES)
        for flavour, why in (
            ("type-2", ""),
            (
                "empirical",
                "true labels used instead of sampled ones (empirical Fisher)",
            ),
        ):
            B = session.reference_blocks(case, flavour, approx, ref_bias)[layer]
            B = masked_reference(B, bias, module)
            tol = max(t, 1e-10 * B.norm().item())
            c = ((mean * B).sum() / (B * B).sum()).item()
            if (mean - c * B).norm().item() <= tol:
                if abs(c - 1) * B.norm().item() <= tol:
                    return why or "within the statistical bound of type-2 KFAC"
                named = name_scalar(
                    c, scales, rtol=3 * tol / (abs(c) * B.norm().item())
                )
                return f"{why}, with {named}" if why else f"MC-KFAC off by {named}"
        return "no known pitfall explains this"

    return CheckItem(f"mc_converges_{approx}", "mc", case, layer, run, diagnose)
