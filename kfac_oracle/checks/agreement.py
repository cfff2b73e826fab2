"""Agreement: everywhere, the candidate equals the reference KFAC of its flavour.

Flavours: type-2, empirical, forward-only; expand and, with weight sharing, reduce.
Tolerance: a relative Frobenius error of 1e-10 in float64.
"""

from __future__ import annotations

from kfac_oracle.catalogue import Case
from kfac_oracle.checks.base import CheckItem, CheckSession, RequestKey, Unsupported
from kfac_oracle.checks.compare import compare_layer
from kfac_oracle.checks.diagnose import diagnose_item, supported_or_raise

FLAVOURS = ("type-2", "empirical", "forward-only")


def approxes(case: Case) -> tuple[str, ...]:
    """Both approximations with weight sharing; without, they coincide (expand)."""
    return ("expand",) if case.setting == "none" else ("expand", "reduce")


def items(impl, case: Case) -> list[CheckItem]:
    """One item per layer, deterministic flavour and approximation."""
    return [
        _item(case, layer, ft, approx)
        for ft in FLAVOURS
        for approx in approxes(case)
        for layer in case.layers
    ]


def _item(case: Case, layer: str, fisher_type: str, approx: str) -> CheckItem:
    key = RequestKey(case.id, fisher_type, approx)

    def run(session: CheckSession):
        supported_or_raise(session.impl, case, fisher_type, approx)
        if session.approximation == "ekfac" and fisher_type == "forward-only":
            raise Unsupported("EKFAC has no forward-only flavour")
        result = session.candidate(case, key)
        bias = result.bias[layer] if result.bias[layer] != "none" else "joint"
        if layer in session.ekfac_ambiguous(case, fisher_type, approx, bias):
            raise Unsupported(
                "EKFAC is not unique here: a Kronecker factor has a repeated "
                "eigenvalue, so the eigenbasis (and EKFAC) depends on the solver"
            )
        reference = session.reference_blocks(case, fisher_type, approx, bias)[layer]
        what = f"layer {layer} vs reference KFAC ({fisher_type}, {approx})"
        return compare_layer(session, case, layer, result, reference, what)

    return CheckItem(
        f"agree_{fisher_type}_{approx}",
        "agreement",
        case,
        layer,
        run,
        diagnose_item(case, layer, key),
    )
