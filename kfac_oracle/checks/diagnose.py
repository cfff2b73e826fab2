"""Glue between comparison checks and :mod:`kfac_oracle.diagnosis`."""

from __future__ import annotations

from typing import Any

from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.diagnosis import diagnose


def diagnose_layer(
    ctx: CheckContext,
    outcome: Outcome,
    *,
    fisher_type: str,
    kfac_approx: str,
    mc_samples: int = 1,
    seed: int = 0,
    **_: Any,
) -> str | None:
    """Name the pitfall behind a failed comparison of the check's layer.

    The hypotheses are fitted at the failed check's tolerance, around the block the
    check compared with (``outcome.blocks``).
    """
    assert ctx.layer is not None
    key = ctx.key(fisher_type, kfac_approx, mc_samples, seed)
    result = ctx.candidate(key)
    reference = outcome.blocks[1] if outcome.blocks is not None else None
    return diagnose(
        result.blocks[ctx.layer],
        ctx.problem(key.variant),
        ctx.layer,
        fisher_type,
        kfac_approx,
        result.bias[ctx.layer],
        mc_samples,
        seed,
        tolerance=outcome.tolerance or 1e-10,
        reference=reference,
        approximation=ctx.approximation.name,
    )
