"""Public helpers for a KFAC library's own test suite.

``parametrize_with_checks`` works like scikit-learn's: decorate a test taking one
argument ``check`` and call it::

    from kfac_oracle.testing import parametrize_with_checks

    @parametrize_with_checks(MyKFAC(), expected_failures={"mc_*": "no MC yet"})
    def test_kfac(check):
        check()

Expected failures are ``{check-id pattern: reason}`` (fnmatch on ``check[case-layer]``
or on the check name); they are strict: a check expected to fail that passes fails the
test. A pattern that matches no check warns.
"""

from __future__ import annotations

import fnmatch

from kfac_oracle.checks.base import CheckRecord


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
    """One check as a callable: raises ``AssertionError`` on failure.

    Unsupported checks are skipped.
    """

    def __init__(self, item, session, spec=None):
        self.item = item
        self.session = session
        self.spec = spec

    def __repr__(self) -> str:
        return self.item.id

    def run(self) -> CheckRecord:
        """Run the check and return its record."""
        from kfac_oracle.harness import reproduce_command

        record = self.item.run(self.session)
        record.reproduce = reproduce_command(self.session.impl, self.item)
        return record

    def __call__(self) -> None:
        """Run the check; pass, skip (unsupported) or raise ``AssertionError``."""
        import pytest

        record = self.run()
        if record.status == "unsupported":
            pytest.skip(f"unsupported: {record.message}")
        if record.status in ("failed", "error"):
            raise AssertionError(format_record(record))


def expected_reason(check_id: str, expected: dict[str, str] | None) -> str | None:
    """The reason of the first expected-failure pattern matching ``check_id``."""
    name = check_id.split("[")[0]
    for pattern, reason in (expected or {}).items():
        if fnmatch.fnmatch(check_id, pattern) or fnmatch.fnmatch(name, pattern):
            return reason
    return None


def check_items(impl, cases=None, checks=None, time_limit: float | None = 60.0):
    """``(impl, [ConformanceCheck])`` for an implementation (resolved once)."""
    from kfac_oracle.catalogue import load_cases
    from kfac_oracle.checks import CheckSession, collect
    from kfac_oracle.harness import resolve_implementation, select_items

    impl = resolve_implementation(impl)
    case_list = load_cases(cases) if cases is None or isinstance(cases, str) else cases
    items = select_items(collect(impl, case_list), checks)
    session = CheckSession(impl, time_limit=time_limit)
    return impl, [ConformanceCheck(item, session) for item in items]


def parametrize_with_checks(
    impl,
    expected_failures: dict[str, str] | None = None,
    cases=None,
    checks: str | None = None,
    time_limit: float | None = 60.0,
):
    """A ``pytest.mark.parametrize("check", ...)`` over every applicable check.

    Args:
        impl: The implementation (instance, class, factory, ``module:attr`` or a
            built-in name).
        expected_failures: ``{check-id pattern: reason}``, strict.
        cases: Cases or an fnmatch pattern on case ids/families (default: all).
        checks: fnmatch pattern(s) on check names or ids.
        time_limit: Seconds per candidate call.
    """
    import pytest

    from kfac_oracle.harness import warn_unmatched

    _, items = check_items(impl, cases, checks, time_limit)
    warn_unmatched(expected_failures, [c.item.id for c in items])
    params = []
    for check in items:
        reason = expected_reason(check.item.id, expected_failures)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(check, id=check.item.id, marks=marks))
    return pytest.mark.parametrize("check", params)
