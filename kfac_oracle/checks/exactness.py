"""Exactness: where the catalogue claims KFAC is exact, so must the candidate be.

The candidate must equal the exact block (type-2 ↔ GGN, empirical ↔ empirical
Fisher) to a relative error of 1e-10.

Claims about MC-KFAC for the *same* samples (E1) need the oracle's own sampling and
are checked on the reference only; candidates' MC is checked statistically (``mc``).
"""

from __future__ import annotations

from kfac_oracle.catalogue import Case, Claim
from kfac_oracle.checks.base import CheckItem, CheckSession, RequestKey, Unsupported
from kfac_oracle.checks.compare import compare_layer
from kfac_oracle.checks.diagnose import diagnose_item, supported_or_raise

KIND = {"type-2": "ggn", "empirical": "empirical"}


def items(impl, case: Case) -> list[CheckItem]:
    """One item per (layer, positive ``kfac`` claim with a deterministic flavour)."""
    out = []
    for layer in case.layers:
        for claim in case.claims_for(layer):
            if claim.statement != "kfac" or not claim.holds:
                continue
            if claim.fisher_type not in KIND:
                continue
            out.append(_item(case, layer, claim))
    return out


def _item(case: Case, layer: str, claim: Claim) -> CheckItem:
    key = RequestKey(case.id, claim.fisher_type, claim.kfac_approx)
    name = f"exact_{claim.equivalence}_{claim.fisher_type}_{claim.kfac_approx}"

    def run(session: CheckSession):
        supported_or_raise(session.impl, case, claim.fisher_type, claim.kfac_approx)
        result = session.candidate(case, key)
        reference = session.exact_block(case, layer, KIND[claim.fisher_type])
        what = f"layer {layer} vs exact {KIND[claim.fisher_type]} block ({claim.id})"
        return compare_layer(session, case, layer, result, reference, what)

    return CheckItem(
        name, "exactness", case, layer, run, diagnose_item(case, layer, key)
    )


__all__ = ["items", "Unsupported"]
