"""Failures grouped by cause, and each group correlated with case properties.

A report of hundreds of failed checks usually has a handful of causes. Failed checks
are grouped by their diagnosis (an opaque string; failed checks without one by check
name), errored checks by their exception (its first line, numbers masked so that
the same exception on differently sized cases is one group). Each group is then
compared with the properties of the cases (:mod:`kfac_oracle.properties`) among the
cases where the group's checks ran (passed or failed): a property ``X`` whose cases
are *exactly* the group's cases gives "exactly the cases with X", i.e. on every case
with X and on none without; otherwise a pair of properties, or the smallest property
containing every failing case, is named. Twins (cases equal but for one field, e.g.
the same model and data with reduction mean and sum) that pass are named too.

Records are :class:`~kfac_oracle.runner.records.CheckRecord` objects or their JSON
dicts (``--json``, the matrix's records).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BAD = ("failed", "error")
# Statuses in which a check ran and gave a verdict (the correlation's universe).
RAN = ("passed", "failed", "error")
# Case fields compared to find twins (cases equal in all of them but one).
TWIN_FIELDS = (
    "family",
    "model",
    "input_shape",
    "loss",
    "reduction",
    "batch_sizes",
    "setting",
    "targets",
    "identical_data",
    "seed",
)

# Numbers, not parts of names (``float32``, ``conv2d``), but shapes (``4x5``).
_NUMBER = re.compile(r"(?<![A-Za-wyz_])\d+(\.\d+)?(e[-+]?\d+)?")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def _get(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name)


def _record_id(record: Any) -> str:
    if isinstance(record, Mapping):
        return str(record.get("id", ""))
    return str(record.id)


@dataclass
class FailureGroup:
    """Failed or errored checks with one cause.

    Attributes:
        kind: ``"diagnosis"``, ``"undiagnosed"`` (failed without a diagnosis, grouped
            by check) or ``"exception"`` (errored).
        text: The diagnosis, the check name, or the exception's first line.
        records: The group's records, in run order.
        varies: For exceptions, whether the members' texts differ in numbers only.
        correlation: What the group's cases have in common (:func:`correlate`).
    """

    kind: str
    text: str
    records: list[Any] = field(default_factory=list)
    varies: bool = False
    correlation: str = ""

    @property
    def count(self) -> int:
        """Number of failed or errored checks."""
        return len(self.records)

    @property
    def cases(self) -> set[str]:
        """The ids of the cases with a check in the group."""
        return {str(_get(r, "case")) for r in self.records}

    @property
    def checks(self) -> set[str]:
        """The check names in the group."""
        return {str(_get(r, "check")) for r in self.records}

    @property
    def example(self) -> Any:
        """The first record."""
        return self.records[0]

    @property
    def label(self) -> str:
        """``diagnosis: ...``, ``exception: ...`` or ``no diagnosis: check ...``."""
        if self.kind == "exception":
            return f"exception: {self.text}" + (
                " (numbers vary)" if self.varies else ""
            )
        if self.kind == "undiagnosed":
            return f"no diagnosis: check {self.text}"
        return f"diagnosis: {self.text}"


def exception_text(message: str) -> str:
    """The first non-empty line of an error message (tracebacks dropped)."""
    for line in str(message or "").splitlines():
        if line.strip():
            return line.strip()
    return "(no message)"


def exception_key(message: str) -> str:
    """The grouping key of an error: its first line, numbers and addresses masked.

    With numbers masked (``#``), one exception on differently shaped cases is one
    group.
    """
    text = _ADDRESS.sub("0x#", exception_text(message))
    return _NUMBER.sub("#", text)


def group_failures(records: Iterable[Any]) -> list[FailureGroup]:
    """Failed and errored records grouped by diagnosis, check or exception.

    Groups are ordered by size (largest first), then by first appearance.
    """
    groups: dict[tuple[str, str], FailureGroup] = {}
    for r in records:
        status = _get(r, "status")
        if status not in BAD:
            continue
        if status == "error":
            text = exception_text(_get(r, "message"))
            key = ("exception", exception_key(text))
        elif _get(r, "diagnosis"):
            text = str(_get(r, "diagnosis"))
            key = ("diagnosis", text)
        else:
            text = str(_get(r, "check"))
            key = ("undiagnosed", text)
        group = groups.get(key)
        if group is None:
            group = groups[key] = FailureGroup(key[0], text)
        elif group.kind == "exception" and text != group.text:
            group.varies = True
        group.records.append(r)
    order = {key: k for k, key in enumerate(groups)}
    return sorted(groups.values(), key=lambda g: (-g.count, order[(g.kind, _key(g))]))


def _key(group: FailureGroup) -> str:
    return exception_key(group.text) if group.kind == "exception" else group.text


def ran_cases(records: Iterable[Any], checks: set[str]) -> set[str]:
    """Cases in which one of ``checks`` ran (passed, failed or errored)."""
    return {
        str(_get(r, "case"))
        for r in records
        if _get(r, "check") in checks and _get(r, "status") in RAN
    }


def correlate(
    failing: set[str],
    universe: set[str],
    properties: Mapping[str, Mapping[str, str]],
) -> str:
    """What the failing cases have in common among the ``universe`` of cases.

    Args:
        failing: Ids of the cases in which the group's checks failed.
        universe: Ids of the cases in which those checks ran (``failing`` included).
        properties: ``{case id: {key: value}}`` (:mod:`kfac_oracle.properties`);
            cases without properties (unknown ids) are left out.

    Returns:
        A phrase: "every case where these checks ran (m)", "exactly the cases with X
        (k of m)" (also for two properties joined by "and", for k > 1), "only case
        C (of m)", "only cases with X: k of its f (of m)", or "k of m cases; no case
        property separates them".
    """
    known = {c for c in universe | failing if c in properties}
    fail = failing & known
    m, k = len(known), len(fail)
    if not fail:
        return f"{len(failing)} case(s) outside the catalogue"
    if fail == known:
        return f"every case where these checks ran ({m})"
    features = _features(known, properties)
    exact = [label for label, cases in features.items() if cases == fail]
    if exact:
        also = f" (equivalently: {'; '.join(exact[1:3])})" if exact[1:] else ""
        return f"exactly the cases with {exact[0]} ({k} of {m} checked cases){also}"
    if k == 1:
        return f"only case {next(iter(fail))} (of {m} checked cases)"
    for (a, ca), (b, cb) in itertools.combinations(features.items(), 2):
        if ca & cb == fail and ca != known and cb != known:
            return f"exactly the cases with {a} and {b} ({k} of {m} checked cases)"
    containing = [
        (len(cases), label)
        for label, cases in features.items()
        if fail <= cases and cases != known
    ]
    if containing:
        size, label = min(containing)
        return f"only cases with {label}: {k} of its {size} (of {m} checked cases)"
    return f"{k} of {m} cases; no case property separates them"


def _features(
    cases: set[str], properties: Mapping[str, Mapping[str, str]]
) -> dict[str, set[str]]:
    """``{value phrase: cases with it}`` over the given cases, phrases in key order."""
    out: dict[str, set[str]] = {}
    for case in sorted(cases):
        for value in properties[case].values():
            out.setdefault(value, set()).add(case)
    ordered = (v for c in sorted(cases) for v in properties[c].values())
    order = list(dict.fromkeys(ordered))
    return {v: out[v] for v in order}


def twins(
    failing: set[str], universe: set[str], fields: Mapping[str, Mapping[str, Any]]
) -> str:
    """Passing twins of failing cases, if any, as a phrase.

    E.g. "twins differing only in reduction pass (mean; for 4 of the 4 failing
    cases)". Two cases are twins in a field when they agree in every other field of
    :data:`TWIN_FIELDS`. The phrase is given for the field in which the most failing
    cases have a twin that ran and did not fail, and only if no failing case has a
    failing twin in that field.
    """
    best: tuple[int, str, set[str]] | None = None
    for name in TWIN_FIELDS:
        passing: set[str] = set()
        covered: set[str] = set()
        broken = False
        for case in sorted(failing & set(fields)):
            for other in sorted(universe - {case}):
                if other not in fields or not _twin(fields[case], fields[other], name):
                    continue
                if other in failing:
                    broken = True
                else:
                    passing.add(other)
                    covered.add(case)
        if broken or not passing:
            continue
        if best is None or len(covered) > best[0]:
            best = (len(covered), name, passing)
    if best is None:
        return ""
    covered_count, name, passing = best
    values = sorted({_show(name, fields[p][name]) for p in passing})
    shown = ", ".join(values[:2]) + (", ..." if len(values) > 2 else "")
    return (
        f"twins differing only in {name} pass ({shown}; for {covered_count} of the "
        f"{len(failing)} failing cases)"
    )


def _show(name: str, value: Any) -> str:
    if name == "model":
        from kfac_oracle.models import describe

        return describe(value)
    return str(value)


def _twin(a: Mapping[str, Any], b: Mapping[str, Any], name: str) -> bool:
    return a[name] != b[name] and all(a[f] == b[f] for f in TWIN_FIELDS if f != name)


def twin_fields(case: Any) -> dict[str, Any]:
    """A case's :data:`TWIN_FIELDS`."""
    return {f: getattr(case, f) for f in TWIN_FIELDS}


def analyse(
    records: Sequence[Any],
    cases: Iterable[Any] = (),
) -> list[FailureGroup]:
    """Group the failures of one implementation and correlate each group.

    Args:
        records: The implementation's records (all statuses: the passing ones define
            where each group's checks ran).
        cases: :class:`~kfac_oracle.catalogue.Case` objects of the run (their
            properties and twins; records of other cases are not correlated).
    """
    from kfac_oracle.properties import case_properties

    by_id = {c.id: c for c in cases}
    seen = {str(_get(r, "case")) for r in records}
    properties: dict[str, dict[str, str]] = {}
    for cid, case in by_id.items():
        if cid in seen:
            try:
                properties[cid] = case_properties(case)
            except Exception:  # noqa: BLE001 - a report never fails on one case
                continue
    fields = {cid: twin_fields(by_id[cid]) for cid in properties}
    groups = group_failures(records)
    for group in groups:
        universe = ran_cases(records, group.checks) | group.cases
        phrase = correlate(group.cases, universe, properties)
        twin = twins(group.cases, universe, fields)
        group.correlation = f"{phrase}; {twin}" if twin else phrase
    return groups
