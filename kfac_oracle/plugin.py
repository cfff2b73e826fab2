"""pytest plugin (``pytest11`` entry point): ``pytest --kfac-impl IMPL``.

Runs the whole conformance suite against ``IMPL`` (``module:attr`` or a built-in
name), in any directory, an empty one too. Items are named ``check[case_id-layer]``
and collected like any test (``--co``, ``-k``, ``--lf`` work); select single checks
with ``--kfac-checks ID`` (ids match literally) or ``-k``. Failures show the block, the
errors, the tolerance, the diagnosis and a command that reproduces the check. Every
option has an ini mirror (``kfac_impl = ...`` under ``[pytest]``). Nothing heavy
(torch) is imported unless an implementation is given.

For conformance items — these and ``parametrize_with_checks``' — a session in which
none passed (everything unsupported) fails, unless ``--kfac-allow-nothing-passed``.

Under pytest-xdist (``-n auto``) the checks of one case stay on one worker, in order
(each item is in the ``xdist_group`` of its case, and ``--dist load``, which ``-n``
implies, becomes ``--dist loadgroup``), so the records equal a serial run's;
``--kfac-json FILE`` writes them (on the controller, in collection order).
``--kfac-no-cache`` disables the reference disk cache
(:mod:`kfac_oracle.runner.diskcache`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MARKER = "kfac_oracle_check"
RECORD = "kfac_oracle_record"
ALLOW_MARKER = "kfac_oracle_allow_nothing_passed"

OPTIONS = (
    ("impl", "implementation: module:attr or a built-in name"),
    ("cases", "patterns on case ids/families"),
    ("case_file", "an extra case file"),
    ("checks", "check ids or names ('*' and '?' wildcards, brackets literal)"),
    ("families", "comma-separated check families"),
    ("xfail", "expected failures: JSON {pattern: reason} or text 'pattern # reason'"),
    ("time_limit", "seconds per candidate call, or 'none' (default 60)"),
    ("isolation", "auto, process or none (default auto)"),
    ("world_size", "run the distributed checks on W >= 2 processes"),
    ("dtype", "float64 or float32: the precision the candidate computes in"),
    (
        "threads",
        "torch threads of the harness (default 1, as the command line; 0 keeps "
        "torch's default)",
    ),
    ("json", "write the check records as JSON (serial and under pytest-xdist)"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ``--kfac-*`` options and their ini mirrors."""
    group = parser.getgroup("kfac-oracle", "KFAC conformance checks")
    for name, help_ in OPTIONS:
        flag = "--kfac-" + name.replace("_", "-")
        group.addoption(flag, dest=f"kfac_{name}", default=None, help=help_)
        parser.addini(f"kfac_{name}", help_, default=None)
    group.addoption(
        "--kfac-single-batch",
        action="store_true",
        default=False,
        help="merge each case's batches into one",
    )
    group.addoption(
        "--kfac-allow-nothing-passed",
        action="store_true",
        default=False,
        help="do not fail the session when no conformance check passed",
    )
    group.addoption(
        "--kfac-no-cache",
        action="store_true",
        default=False,
        help="do not read or write the reference disk cache",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers conformance items carry."""
    config.addinivalue_line("markers", f"{MARKER}: a kfac-oracle conformance check")
    config.addinivalue_line(
        "markers", f"{ALLOW_MARKER}: no conformance check passing is acceptable"
    )
    config.pluginmanager.register(_Verdict(config), "kfac-oracle-verdict")
    config.addinivalue_line(
        "markers", "xdist_group(name): pytest-xdist runs a group on one worker"
    )
    if config.getoption("kfac_no_cache"):
        from kfac_oracle.runner import diskcache

        diskcache.set_enabled(False)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        if workerinput.get("kfac_loadgroup"):
            config.option.loadgroup = True
    elif _option(config, "impl") and getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: tell the workers that the checks are grouped by case."""
    node.workerinput["kfac_loadgroup"] = node.config.option.dist == "loadgroup"


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(f"kfac_{name}")
    return value if value is not None else config.getini(f"kfac_{name}")


class ConformanceFailure(Exception):
    """A conformance check failed or errored."""


class ConformanceItem(pytest.Item):
    """One conformance check."""

    def __init__(
        self,
        *,
        check: Any,
        reason: str | None = None,
        index: int = 0,
        expected: dict[str, str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.check = check
        self.index = index
        self.expected = expected or {}
        self.add_marker(MARKER)
        self.add_marker(pytest.mark.xdist_group(check.item.case.id))
        if reason is not None:
            self.add_marker(pytest.mark.xfail(strict=True, reason=reason))

    def runtest(self) -> None:
        """Run the check; skip if unsupported."""
        record = self.check.run()
        if _option(self.config, "json"):
            self.user_properties.append((RECORD, self._json_record(record)))
        if record.status == "unsupported":
            pytest.skip(f"unsupported: {record.message}")
        if record.status in ("failed", "error"):
            raise ConformanceFailure(record)

    def _json_record(self, record: Any) -> str:
        """The record as ``kfac-oracle check --json`` writes it (statuses too)."""
        import copy

        from kfac_oracle.runner import expected as expected_mod

        shown = copy.copy(record)
        documented = self.check.session.resolved.documented
        shown = expected_mod.apply_documented(shown, documented)
        shown = expected_mod.apply(shown, self.expected)
        return json.dumps({"index": self.index, "record": shown.as_dict()})

    def repr_failure(self, excinfo: Any, style: Any = None) -> Any:
        """The focused message for conformance failures."""
        if isinstance(excinfo.value, ConformanceFailure):
            from kfac_oracle.testing import format_record

            return format_record(excinfo.value.args[0])
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[str, None, str]:
        """Location shown by pytest."""
        return "kfac-oracle", None, self.name


class ConformanceSuite(pytest.Collector):
    """The conformance items of one implementation."""

    def __init__(self, *, checks: list[Any], expected: dict[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self._checks = checks
        self._expected = expected

    def collect(self) -> Iterator[ConformanceItem]:
        """One item per check."""
        from kfac_oracle.runner.expected import reason_for

        # pytest-xdist's --dist loadgroup reads the group from an ``@group`` suffix
        # of the node id; it is set here, as not every pytest/xdist pair adds it.
        grouped = bool(getattr(self.config.option, "loadgroup", False))
        for index, check in enumerate(self._checks):
            group = f"@{check.item.case.id}" if grouped else ""
            yield ConformanceItem.from_parent(
                self,
                name=check.item.id,
                nodeid=f"{self.nodeid}::{check.item.id}{group}",
                check=check,
                reason=reason_for(check.item.id, self._expected),
                index=index,
                expected=self._expected,
            )


def _set_threads(value: Any) -> None:
    """Set torch's intra-op threads for the conformance run (as ``kfac-oracle check``).

    One thread by default: reference results (and so the records) must not depend on
    how many threads the machine offers, and the catalogue's problems are small.

    Raises:
        UsageError: For a value that is not an integer >= 0.
    """
    from kfac_oracle.errors import UsageError

    try:
        threads = 1 if value is None else int(value)
    except ValueError:
        threads = -1
    if threads < 0:
        raise UsageError(f"--kfac-threads must be an integer >= 0, got {value!r}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _suite(session: pytest.Session) -> ConformanceSuite | None:
    config = session.config
    spec = _option(config, "impl")
    if not spec:
        return None
    from kfac_oracle.errors import UsageError
    from kfac_oracle.runner import expected as expected_mod
    from kfac_oracle.testing import check_items

    case_files = [_option(config, "case_file")] if _option(config, "case_file") else []
    try:
        from kfac_oracle.cli import parse_time_limit

        limit = parse_time_limit(str(_option(config, "time_limit") or "60"))
        _set_threads(_option(config, "threads"))
        expected = expected_mod.load(_option(config, "xfail"))
        world_size = _option(config, "world_size") or None
        if world_size is not None:
            try:
                world_size = int(world_size)
            except ValueError:
                raise UsageError(
                    f"--kfac-world-size must be an integer, got {world_size!r}"
                ) from None
        resolved, checks = check_items(
            spec,
            _option(config, "cases"),
            _option(config, "checks"),
            limit,
            families=_option(config, "families"),
            isolation=_option(config, "isolation") or "auto",
            case_files=case_files,
            single_batch=config.getoption("kfac_single_batch"),
            world_size=world_size,
            dtype=_option(config, "dtype"),
        )
        expected_mod.warn_unmatched(expected, [c.item.id for c in checks])
    except UsageError as error:
        raise pytest.UsageError(f"kfac-oracle: {error}") from error
    return ConformanceSuite.from_parent(
        session,
        name=f"kfac-oracle[{resolved.name}]",
        nodeid=f"kfac-oracle[{resolved.name}]",
        checks=checks,
        expected=expected,
    )


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """Add the conformance suite to the session's collection (``--kfac-impl``)."""
    report = yield
    if isinstance(collector, pytest.Session):
        suite = _suite(collector)
        if suite is not None:
            report.result.append(suite)
    return report


class _Verdict:
    """Counts one session's conformance items and fails it when none passed.

    One instance per pytest configuration (registered in :func:`pytest_configure`),
    so that a pytest run inside another (``pytester``) never mixes their counts.
    """

    def __init__(self, config: pytest.Config):
        self.config = config
        self.items: set[str] = set()
        self.passed: set[str] = set()
        self.allowed = False
        self.records: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Count conformance items (by node id) and those that passed."""
        if MARKER not in report.keywords:
            return
        for name, value in report.user_properties if report.when == "call" else ():
            if name == RECORD:
                self.records.append(json.loads(str(value)))
        if report.when == "call" or (report.when == "setup" and report.skipped):
            self.items.add(report.nodeid)
            if (
                report.when == "call"
                and report.passed
                and not hasattr(report, "wasxfail")
            ):
                self.passed.add(report.nodeid)
            if ALLOW_MARKER in report.keywords:
                self.allowed = True

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """On the controller: write ``--kfac-json``; fail if no check passed."""
        config = self.config
        if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller
            return
        path = _option(config, "json")
        if path:
            records = sorted(self.records, key=lambda r: r["index"])
            Path(path).write_text(json.dumps([r["record"] for r in records], indent=1))
        if not self.items or self.passed or self.allowed:
            return
        if config.getoption("kfac_allow_nothing_passed"):
            return
        if exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            config.stash[_NOTHING] = len(self.items)


_NOTHING = pytest.StashKey[int]()


def pytest_terminal_summary(
    terminalreporter: Any, exitstatus: int, config: pytest.Config
) -> None:
    """Say why a session with no passing conformance check failed."""
    n = config.stash.get(_NOTHING, None)
    if n:
        terminalreporter.write_sep("=", "kfac-oracle: nothing passed", red=True)
        terminalreporter.write_line(
            f"none of the {n} conformance checks passed (all unsupported or expected "
            "to fail); check the implementation's capabilities, or pass "
            "--kfac-allow-nothing-passed"
        )


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """Name the implementation under test, the oracle and torch versions."""
    spec = _option(config, "impl")
    if not spec:
        return None
    from importlib import metadata

    from kfac_oracle import __version__

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    lines = [
        f"kfac-oracle {__version__}: conformance checks of {spec} (torch "
        f"{torch_version})"
    ]
    for name, _ in OPTIONS[1:]:
        value = _option(config, name)
        if value:
            lines.append(f"kfac-oracle {name}: {value}")
    return lines
