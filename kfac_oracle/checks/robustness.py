"""Robustness: the candidate's result is well formed, and it leaves the model alone.

One item per case: the candidate is called once (the first flavour it declares) and
its result must be a dict holding every requested layer, with factors or blocks of the
right shapes, dtype and device, finite, symmetric and positive semi-definite, computed
within the time limit, without modifying the model's parameters. A candidate that
raises is reported here as ``failed`` with the exception; the other checks of the case
then report ``error`` with the same message, and the run goes on.
"""

from __future__ import annotations

from kfac_oracle.catalogue import Case
from kfac_oracle.checks.base import (
    CandidateError,
    CandidateUnsupported,
    CheckItem,
    CheckSession,
    RequestKey,
    Unsupported,
    capability,
)
from kfac_oracle.checks.diagnose import supported_or_raise

ORDER = ("type-2", "empirical", "forward-only", "mc")


def items(impl, case: Case) -> list[CheckItem]:
    """The well-formedness check of ``case``."""

    def run(session: CheckSession):
        approx = "reduce" if case.setting == "reduce" else "expand"
        allowed = capability(session.impl, "fisher_type")
        flavours = [ft for ft in ORDER if allowed is None or ft in allowed]
        if not flavours:
            raise Unsupported("no fisher_type in capabilities")
        supported_or_raise(session.impl, case, flavours[0], approx)
        key = RequestKey(case.id, flavours[0], approx)
        try:
            result = session.candidate(case, key)
        except CandidateUnsupported:
            raise
        except CandidateError as error:
            return "failed", None, None, str(error)
        modes = sorted(set(result.bias.values()))
        return (
            "passed",
            None,
            None,
            f"{flavours[0]}/{approx}: {len(result.blocks)} layers, bias {modes}, "
            "well formed",
        )

    return [CheckItem("wellformed", "robustness", case, None, run)]
