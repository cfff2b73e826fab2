"""The conformance checks: one module per family, each check a registered function.

See :mod:`kfac_oracle.checks.registry` for how checks are declared and collected;
``kfac-oracle checks`` lists every check with the statement it tests.
"""

from __future__ import annotations

from kfac_oracle.checks.registry import (
    CheckItem,
    CheckSpec,
    Family,
    Target,
    check,
    checks,
    collect,
    families,
    family_names,
)

__all__ = [
    "CheckItem",
    "CheckSpec",
    "Family",
    "Target",
    "check",
    "checks",
    "collect",
    "families",
    "family_names",
]
