"""pytest plugin (``pytest11`` entry point): ``pytest --kfac-impl IMPL``.

Runs the whole conformance suite against ``IMPL`` (``module:attr`` or a built-in
name), in any directory, an empty one too. Items are named ``check[case_id-layer]``;
failures show the block, the errors, the tolerance, the diagnosis and a command that
reproduces the check. Nothing heavy (torch) is imported unless ``--kfac-impl`` is given.
"""

from __future__ import annotations

import json

import pytest


def pytest_addoption(parser):
    """Register the ``--kfac-*`` options."""
    group = parser.getgroup("kfac-oracle", "KFAC conformance checks")
    group.addoption(
        "--kfac-impl",
        default=None,
        help="implementation: module:attr or a built-in name",
    )
    group.addoption(
        "--kfac-cases", default=None, help="fnmatch pattern(s) on case ids/families"
    )
    group.addoption(
        "--kfac-checks", default=None, help="fnmatch pattern(s) on check names/ids"
    )
    group.addoption(
        "--kfac-xfail", default=None, help="JSON file {check-id pattern: reason}"
    )
    group.addoption(
        "--kfac-time-limit", type=float, default=60.0, help="seconds per candidate call"
    )


class ConformanceFailure(Exception):
    """A conformance check failed or errored."""


class ConformanceItem(pytest.Item):
    """One conformance check."""

    def __init__(self, *, check, reason=None, **kwargs):
        super().__init__(**kwargs)
        self.check = check
        if reason:
            self.add_marker(pytest.mark.xfail(strict=True, reason=reason))

    def runtest(self):
        """Run the check; skip if unsupported."""
        record = self.check.run()
        if record.status == "unsupported":
            pytest.skip(f"unsupported: {record.message}")
        if record.status in ("failed", "error"):
            raise ConformanceFailure(record)

    def repr_failure(self, excinfo, style=None):
        """The focused message for conformance failures."""
        if isinstance(excinfo.value, ConformanceFailure):
            from kfac_oracle.testing import format_record

            return format_record(excinfo.value.args[0])
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        """Location shown by pytest."""
        return "kfac-oracle", None, self.name


class ConformanceSuite(pytest.Collector):
    """The collector holding the conformance items of one implementation."""

    def collect(self):
        """Not used: items are created in ``pytest_collection_modifyitems``."""
        return []


def _expected(config):
    path = config.getoption("--kfac-xfail")
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Append the conformance items when ``--kfac-impl`` is given."""
    spec = config.getoption("--kfac-impl")
    if not spec:
        return
    from kfac_oracle.harness import ImplementationError, warn_unmatched
    from kfac_oracle.testing import check_items, expected_reason

    try:
        impl, checks = check_items(
            spec,
            config.getoption("--kfac-cases"),
            config.getoption("--kfac-checks"),
            config.getoption("--kfac-time-limit"),
        )
    except ImplementationError as error:
        raise pytest.UsageError(f"--kfac-impl: {error}") from error
    try:
        impl._kfac_oracle_spec = spec
    except AttributeError:
        pass
    expected = _expected(config)
    warn_unmatched(expected, [c.item.id for c in checks])
    suite = ConformanceSuite.from_parent(
        session, name=f"kfac-oracle[{getattr(impl, 'name', spec)}]"
    )
    for check in checks:
        items.append(
            ConformanceItem.from_parent(
                suite,
                name=check.item.id,
                check=check,
                reason=expected_reason(check.item.id, expected),
            )
        )


def pytest_report_header(config):
    """Name the implementation under test."""
    spec = config.getoption("--kfac-impl")
    if spec:
        return f"kfac-oracle: conformance checks of {spec}"
    return None
