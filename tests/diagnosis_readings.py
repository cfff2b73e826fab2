"""Reading a diagnosis back into the causes it names, to judge it against a mutant.

A diagnosis (kfac_oracle.diagnosis) names one or more *readings*; each is a structural
pitfall (or none) together with the named scales of its constant. Alternatives are
listed as ``ambiguous on this case, these explanations coincide: (1) ...; (2) ...``
(structural) or ``a constant factor ambiguous on this case (...): A; or B`` (scales).
A diagnosis names a wrong cause when it names a cause and none of its readings is
made of the mutant's own pitfalls only.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from kfac_oracle.diagnosis import NO_PITFALL

STRUCTURAL_AMBIGUITY = "ambiguous on this case, these explanations coincide: "
# texts that name no cause: nothing explains the mismatch, or the explanation is a
# constant that matches no named scale or too many
SILENT = (
    NO_PITFALL,
    "matching no known scale",
    "inconclusive on this case",
    "no diagnosis:",
    "diagnosis failed",
)
# a named scale: "by SYMBOL (meaning)" or "× SYMBOL (meaning)", one level of nested
# parentheses in the meaning
_SCALE = re.compile(r"(?:by |× )(\S+) \(((?:[^()]|\([^()]*\))*)\)")
# a pitfall acting as a constant factor on the case (kfac_oracle.diagnosis.core)
_PITFALL = re.compile(r"P\d+")


@dataclass(frozen=True)
class Reading:
    """One explanation: a structural pitfall (or ``None``) and named scale symbols."""

    why: str | None
    scales: tuple[str, ...]


def readings(diagnosis: str | None) -> list[Reading]:
    """The readings a diagnosis names (empty: it names no cause)."""
    if not diagnosis or diagnosis.startswith(NO_PITFALL):
        return []
    if diagnosis.startswith(STRUCTURAL_AMBIGUITY):
        rest = diagnosis[len(STRUCTURAL_AMBIGUITY) :]
        parts = re.split(r"(?:^|; )\(\d+\) ", rest)
        return [r for part in parts if part for r in readings(part)]
    if diagnosis.startswith("a constant factor"):
        why, scale = None, diagnosis
    elif ", with a constant factor" in diagnosis:
        why, scale = diagnosis.split(", with ", 1)
    elif diagnosis.startswith("weight block off by "):
        rest = diagnosis[len("weight block off by ") :]
        why, scale = "weight block off", rest.split("; the bias block")[0]
    else:
        why, scale = diagnosis, None
    alternatives = _scale_readings(scale)
    if not alternatives:
        return [] if why is None else [Reading(why, ())]
    out = []
    for scales in alternatives:
        whys = [why] if why is not None else []
        whys += [m.split(": a factor")[0] for s, m in scales if _PITFALL.fullmatch(s)]
        symbols = tuple(s for s, _ in scales if not _PITFALL.fullmatch(s))
        out.append(Reading(" & ".join(whys) if whys else None, symbols))
    return out


def _scale_readings(text: str | None) -> list[list[tuple[str, str]]]:
    if text is None or any(s in text for s in SILENT):
        return []
    if "ambiguous on this case" in text:
        text = text.split("): ", 1)[1]
    return [_SCALE.findall(alt) for alt in text.split("; or ")]


def allowed(reading: Reading, causes: tuple[str, ...]) -> bool:
    """Whether a reading names only the given causes (see tests/mutants.py)."""
    structural = [c for c in causes if not c.startswith("scale:")]
    scales = [c.removeprefix("scale:") for c in causes if c.startswith("scale:")]
    for why in reading.why.split(" & ") if reading.why is not None else []:
        if not any(c in why for c in structural):
            return False
    return all(any(fnmatch.fnmatchcase(s, p) for p in scales) for s in reading.scales)


def names_a_cause(diagnosis: str | None) -> bool:
    """Whether the diagnosis names any cause."""
    return bool(readings(diagnosis))


def wrong_cause(diagnosis: str | None, causes: tuple[str, ...]) -> bool:
    """Whether the diagnosis names a cause but no reading of only ``causes``."""
    found = readings(diagnosis)
    return bool(found) and not any(allowed(r, causes) for r in found)
