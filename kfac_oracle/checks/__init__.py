"""The conformance checks, one module per family, and their collection.

``collect(impl, cases)`` returns the check items for an implementation; each item runs
against a shared :class:`~kfac_oracle.checks.base.CheckSession`.
"""

from __future__ import annotations

from kfac_oracle.checks import agreement, exactness, invariances, montecarlo, robustness
from kfac_oracle.checks.base import (
    FAMILIES,
    STATUSES,
    CheckItem,
    CheckRecord,
    CheckSession,
)

MODULES = {
    "robustness": robustness,
    "exactness": exactness,
    "agreement": agreement,
    "mc": montecarlo,
    "invariance": invariances,
}


def collect(impl, cases, families=None) -> list[CheckItem]:
    """All check items for ``impl`` on ``cases`` (optionally some families only)."""
    families = families or list(MODULES)
    items = []
    for case in cases:
        for family in families:
            items.extend(MODULES[family].items(impl, case))
    return items


__all__ = [
    "FAMILIES",
    "STATUSES",
    "CheckItem",
    "CheckRecord",
    "CheckSession",
    "collect",
]
