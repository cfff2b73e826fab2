"""Glue between check items and :mod:`kfac_oracle.diagnosis`."""

from __future__ import annotations

from kfac_oracle.catalogue import Case
from kfac_oracle.checks.base import (
    CheckSession,
    RequestKey,
    Unsupported,
    unsupported_reason,
)
from kfac_oracle.diagnosis import diagnose


def supported_or_raise(impl, case: Case, fisher_type=None, kfac_approx=None) -> None:
    """Raise :class:`Unsupported` when the candidate's capabilities exclude this."""
    reason = unsupported_reason(impl, case, fisher_type, kfac_approx)
    if reason:
        raise Unsupported(reason)


def diagnose_item(case: Case, layer: str, key: RequestKey):
    """A diagnosis callback for a failed comparison of ``layer`` under ``key``."""

    def run(session: CheckSession) -> str:
        result = session.candidate(case, key)
        problem = session.problem(case, key.variant)
        return diagnose(
            result.blocks[layer],
            problem,
            layer,
            key.fisher_type,
            key.kfac_approx,
            result.bias[layer],
            key.mc_samples,
            key.seed,
        )

    return run
