"""Public helpers for a KFAC library's own test suite.

``parametrize_with_checks`` works like scikit-learn's: decorate a test taking one
argument ``check`` and call it::

    from kfac_oracle.testing import parametrize_with_checks

    @parametrize_with_checks(MyKFAC(), expected_failures={"mc_*": "no MC yet"})
    def test_kfac(check):
        check()

Expected failures are ``{pattern: reason}`` matched like ``--checks`` (``agree_*`` in
every case, ``agree_*[case-0]`` in one; an id matches itself); they are strict: a
check expected to fail that passes fails the test. A pattern that matches no check
warns; a ``checks`` selection that matches nothing is a usage error at collection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfac_oracle.checks.registry import CheckItem
from kfac_oracle.runner.records import CheckRecord

if TYPE_CHECKING:
    from kfac_oracle.distributed.checks import DistItem

__all__ = ["ConformanceCheck", "format_record", "parametrize_with_checks"]


def format_record(record: CheckRecord) -> str:
    """A focused failure message: what, how far off, tolerance, diagnosis, reproduce."""
    lines = [f"{record.id}: {record.status}", f"  {record.message}"]
    if record.error is not None:
        tol = "" if record.tolerance is None else f" (tolerance {record.tolerance:.1e})"
        lines.append(f"  error: {record.error:.3e}{tol}")
    if record.diagnosis:
        lines.append(f"  diagnosis: {record.diagnosis}")
    if record.reproduce:
        lines.append(f"  reproduce: {record.reproduce}")
    return "\n".join(lines)


class ConformanceCheck:
    """One check as a callable: ``AssertionError`` on failure, skip if unsupported.

    Args:
        item: The check item (a distributed one with ``world_size``).
        session: The run's session (candidate caller and references).
    """

    def __init__(self, item: CheckItem | DistItem, session: Any):
        self.item = item
        self.session = session

    def __repr__(self) -> str:
        return self.item.id

    def run(self) -> CheckRecord:
        """Run the check and return its record."""
        from kfac_oracle.distributed.checks import DistItem
        from kfac_oracle.distributed.run import run_item as run_distributed_item
        from kfac_oracle.runner.run import run_item

        item = self.item
        if isinstance(item, DistItem):
            record = run_distributed_item(item, self.session)
        else:
            record = run_item(item, self.session)
        record.reproduce = self.session.reproduce(self.item)
        return record

    def __call__(self) -> None:
        """Run the check; pass, skip (unsupported) or raise ``AssertionError``."""
        import pytest

        record = self.run()
        if record.status == "unsupported":
            pytest.skip(f"unsupported: {record.message}")
        if record.status in ("failed", "error"):
            raise AssertionError(format_record(record))


def check_items(
    impl: Any,
    cases: Any = None,
    checks: str | Iterable[str] | None = None,
    time_limit: float | None = 60.0,
    families: str | Iterable[str] | None = None,
    isolation: str = "auto",
    case_files: Sequence[str] = (),
    single_batch: bool = False,
    world_size: int | None = None,
    dtype: str | None = None,
) -> tuple[Any, list[ConformanceCheck]]:
    """``(resolved implementation, [ConformanceCheck])`` sharing one session.

    With ``world_size`` the checks are the distributed ones
    (:mod:`kfac_oracle.distributed`), run on one process group of that size.
    ``dtype`` (``"float64"``/``"float32"``) forces the candidate's precision
    (default: what its capabilities declare).

    Raises:
        UsageError: For an invalid implementation, capabilities, cases or selection.
    """
    from kfac_oracle.runner.run import Session, resolve_cases, select_items

    case_list = resolve_cases(cases, case_files)
    if world_size is not None:
        from kfac_oracle.distributed import run as distributed

        distributed.check_world_size(world_size)
        if dtype is not None:
            from kfac_oracle.errors import UsageError

            raise UsageError("dtype does not combine with world_size")
        dist_items = distributed.select_items(case_list, checks)
        dist_session = distributed.DistributedSession.start(
            impl, world_size, time_limit, case_files
        )
        return dist_session.resolved, [
            ConformanceCheck(item, dist_session) for item in dist_items
        ]
    items = select_items(case_list, checks, families)
    session = Session.start(
        impl, time_limit, isolation, case_files, dtype=dtype, single_batch=single_batch
    )
    return session.resolved, [ConformanceCheck(item, session) for item in items]


def parametrize_with_checks(
    impl: Any,
    expected_failures: Mapping[str, str] | str | Path | None = None,
    cases: Any = None,
    checks: str | Iterable[str] | None = None,
    time_limit: float | None = 60.0,
    families: str | Iterable[str] | None = None,
    isolation: str = "auto",
    allow_nothing_passed: bool = False,
    single_batch: bool = False,
    world_size: int | None = None,
    dtype: str | None = None,
) -> Any:
    """A ``pytest.mark.parametrize("check", ...)`` over every applicable check.

    Args:
        impl: The implementation (instance, class, factory, ``module:attr`` or a
            built-in name).
        expected_failures: ``{pattern: reason}`` or a file of them; strict.
        cases: Cases or patterns on case ids/families (default: all).
        checks: Patterns on check names or ids.
        time_limit: Seconds per candidate call (``None``: no limit).
        families: Restrict to these check families.
        isolation: ``"auto"``, ``"process"`` or ``"none"``.
        allow_nothing_passed: Do not fail the session when no check passes.
        single_batch: Merge each case's batches into one.
        world_size: Run the distributed checks on this many processes instead
            (``families``, ``isolation`` and ``single_batch`` do not apply).
        dtype: ``"float32"`` to judge the candidate in float32 (measured rounding
            tolerances; default: what its capabilities declare).

    Raises:
        UsageError: At collection, for an invalid implementation, capabilities,
            cases or selection.
    """
    import pytest

    from kfac_oracle.plugin import ALLOW_MARKER, MARKER
    from kfac_oracle.runner import expected as expected_mod

    expected = expected_mod.load(expected_failures)
    _, items = check_items(
        impl,
        cases,
        checks,
        time_limit,
        families,
        isolation,
        single_batch=single_batch,
        world_size=world_size,
        dtype=dtype,
    )
    expected_mod.warn_unmatched(expected, [c.item.id for c in items])
    params = []
    for check in items:
        marks: list[Any] = [getattr(pytest.mark, MARKER)]
        if allow_nothing_passed:
            marks.append(getattr(pytest.mark, ALLOW_MARKER))
        reason = expected_mod.reason_for(check.item.id, expected)
        if reason is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        params.append(pytest.param(check, id=check.item.id, marks=marks))
    return pytest.mark.parametrize("check", params)
