"""The ``kfac-oracle`` command line.

Subcommands: ``cases`` (the catalogue), ``checks`` (every check and the statement it
tests), ``check`` (conformance of one implementation), ``matrix`` (every library
adapter).

Exit status: 0 when every selected check passed or was unsupported and at least one
passed; 1 when a check failed or errored, or when nothing passed (unless
``--allow-nothing-passed``); 2 for usage errors (the message names what is wrong);
3 for an internal error of kfac-oracle; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kfac_oracle.errors import UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _cmd_cases(args: argparse.Namespace) -> int:
    from kfac_oracle.catalogue import load_cases

    cases = load_cases(args.cases, args.case_file)
    if args.cases and not cases:
        raise UsageError(f"no case matches {args.cases!r}")
    if args.json:
        print(json.dumps([c.as_dict() for c in cases], indent=2))
        return EXIT_OK
    rows: list[tuple[str, ...]] = [
        ("id", "family", "loss", "red.", "setting", "N", "P", "claims")
    ]
    for c in cases:
        claims = sum(len(c.claims_for(layer)) for layer in c.layers)
        rows.append(
            (
                c.id,
                c.family,
                c.loss,
                c.reduction,
                c.setting,
                str(c.num_data),
                str(c.num_params()),
                str(claims),
            )
        )
    print(_table(rows))
    print(f"\n{len(cases)} cases")
    return EXIT_OK


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_checks(args: argparse.Namespace) -> int:
    from kfac_oracle.checks.registry import checks, families

    data: list[dict[str, Any]] = [
        {
            "family": fam.name,
            "summary": fam.summary,
            "checks": [
                {"function": c.name, "theorem": c.theorem} for c in checks(fam.name)
            ],
        }
        for fam in families()
    ]
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for fam in data:
        print(f"{fam['family']}: {fam['summary']}")
        for c in fam["checks"]:
            first = c["theorem"].splitlines()[0] if c["theorem"] else ""
            print(f"  {c['function']:<20} {first}")
    return EXIT_OK


class _Progress:
    """Progress on standard error: a bar on a terminal, else a line now and then."""

    def __init__(self, enabled: bool, label: str = "", every: float = 10.0):
        self.enabled = enabled
        self.label = label
        self.tty = sys.stderr.isatty()
        self.every = every
        self.last = time.monotonic()
        self.bad = 0

    def __call__(self, done: int, total: int, record: Any) -> None:
        self.bad += record.status in ("failed", "error")
        if not self.enabled:
            return
        if self.tty:
            width = 30
            filled = int(width * done / max(total, 1))
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(
                f"\r{self.label}[{bar}] {done}/{total} {record.check[:28]:28s}"
            )
            if done == total:
                sys.stderr.write("\n")
        elif time.monotonic() - self.last >= self.every or done == total:
            self.last = time.monotonic()
            sys.stderr.write(
                f"{self.label}{done}/{total} checks, {self.bad} failed or errored\n"
            )
        sys.stderr.flush()


def _writable(path: str | None, what: str) -> Path | None:
    """Check an output path before the run: a file in an existing folder."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what} {path!r} is a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{what} {path!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {path!r}: folder {str(parent)!r} is not writable")
    return p


def parse_time_limit(value: str) -> float | None:
    """``--time-limit``: seconds (positive, finite) or ``none``."""
    from kfac_oracle.runner.limits import check_time_limit

    if value.strip().lower() == "none":
        return None
    return check_time_limit(value)


def _cmd_check(args: argparse.Namespace) -> int:
    from kfac_oracle import report
    from kfac_oracle.runner import expected as expected_mod
    from kfac_oracle.runner.run import Session, resolve_cases, run, select_items

    time_limit = parse_time_limit(args.time_limit)
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    json_path = _writable(args.json, "--json")
    report_path = _writable(args.report, "--report")
    if args.plots:
        report.require_matplotlib()
    expected = expected_mod.load(args.xfail)
    cases = resolve_cases(args.cases, args.case_file)
    session: Any
    run_checks: Callable[..., Any] = run
    if args.world_size is not None:
        from kfac_oracle.distributed import run as distributed

        _distributed_options(args)
        distributed.select_items(cases, args.checks)  # usage errors before any work
        session = distributed.DistributedSession.start(
            args.impl, args.world_size, time_limit, args.case_file
        )
        run_checks = functools.partial(distributed.run, world_size=args.world_size)
    else:
        cases, pool = _parallel(args, cases)
        items = select_items(cases, args.checks, args.families)  # usage errors first
        if pool:
            session = pool(items)
            run_checks = session.run
        else:
            session = Session.start(
                args.impl,
                time_limit,
                args.isolation,
                args.case_file,
                dtype=args.dtype,
                single_batch=args.single_batch,
            )
    label = f"{session.name} "
    progress = _Progress(not args.quiet, label)
    partial = Path(f"{json_path}.partial") if json_path else None
    if partial is not None and partial.exists():
        partial.unlink()
    records: list[Any] = []

    def collect(done: int, total: int, record: Any) -> None:
        records.append(record)
        progress(done, total, record)

    interrupted = False
    try:
        run_checks(
            session.resolved,
            cases=cases,
            checks=args.checks,
            **({} if args.world_size is not None else {"families": args.families}),
            expected_failures=expected,
            session=session,
            progress=collect,
            stream=partial,
        )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        session.close()
    print(
        f"kfac-oracle check {args.impl}: {len(records)} checks on {len(cases)} cases"
        + (" (interrupted)" if interrupted else "")
    )
    if session.resolved.library:
        print(f"library: {session.resolved.library}")
    for note in session.caller.notes:
        print(f"note: {note}")
    if session.caller.warnings:
        distinct = len(session.caller.warnings)
        print(f"warnings raised by the candidate ({distinct} distinct):")
        for text, count in sorted(
            session.caller.warnings.items(), key=lambda kv: -kv[1]
        ):
            first = text.splitlines()[0][:160]
            print(f"  {count} call(s): {first}")
    print()
    print(report.summary_table(records))
    groups = report.grouped_failures(records, cases)
    grouped = report.grouped_text(records, groups=groups)
    if grouped:
        print()
        print(grouped)
    failures = report.failures_text(records, limit=args.show) if args.verbose else ""
    if failures:
        print()
        print(failures)
    if json_path is not None:
        report.write_json(records, json_path)
        if partial is not None and partial.exists():
            partial.unlink()
        print(f"\nwrote {json_path}")
    if report_path is not None:
        report_path.write_text(
            report.markdown_report(
                records,
                f"Conformance of {session.name}",
                verbose=args.verbose,
                groups=groups,
            )
        )
        print(f"wrote {report_path}")
    if args.plots:
        paths = report.write_plots(records, args.plots)
        print(f"wrote {len(paths)} plots to {args.plots}")
    if interrupted:
        return EXIT_INTERRUPTED
    bad = sum(r.status in ("failed", "error") for r in records)
    if bad:
        return EXIT_FAILED
    if not any(r.status == "passed" for r in records) and not args.allow_nothing_passed:
        print(
            f"\nnothing passed: all {len(records)} checks were unsupported or expected "
            "to fail. Check the implementation's capabilities (and its "
            "NotImplementedError messages above); pass --allow-nothing-passed if this "
            "is what you expect.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _distributed_options(args: argparse.Namespace) -> None:
    """Options that do not combine with ``--world-size`` are usage errors."""
    from kfac_oracle.distributed.run import check_world_size

    check_world_size(args.world_size)
    for given, option in (
        (args.single_batch, "--single-batch"),
        (args.dtype is not None, "--dtype"),
        (args.families is not None, "--families"),
        (args.isolation == "none", "--isolation none"),
        (args.workers != 1, "--workers"),
        (args.shard is not None, "--shard"),
    ):
        if given:
            raise UsageError(
                f"{option} does not combine with --world-size (every rank is its own "
                "process; the distributed checks are one family)"
            )


def _parallel(args: argparse.Namespace, cases: list[Any]) -> tuple[list[Any], Any]:
    """``--no-cache``, ``--shard i/n`` and ``--workers N`` (runner/parallel.py).

    Returns the cases of the shard, and (with ``--workers``) a function of the
    selected check items that starts the worker pool.
    """
    from kfac_oracle.runner import diskcache, parallel

    if args.no_cache:
        diskcache.set_enabled(False)
    if args.shard:
        cases = parallel.shard_cases(cases, *parallel.parse_shard(args.shard))
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.workers == 1:
        return cases, None
    if args.plots:
        raise UsageError(
            "--plots needs the failed blocks in this process: run without --workers"
        )
    from kfac_oracle.implementations import resolve

    resolved = resolve(args.impl)
    check = next(a for a in build_parser()._actions if a.dest == "command")
    skip = {"cases", "shard", "workers", "json", "report", "show", "quiet"}
    skip |= {"command", "func"}
    argv = parallel.child_arguments(args, check.choices["check"], skip)  # type: ignore[index]

    def pool(items: list[Any]) -> Any:
        order = [item.id for item in items]
        return parallel.WorkerPool(
            resolved, argv, cases, order, args.workers, args.quiet
        )

    return cases, pool


def _cmd_matrix(args: argparse.Namespace) -> int:
    from kfac_oracle.matrix import main as matrix_main

    args.time_limit = parse_time_limit(args.time_limit)
    return matrix_main(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kfac-oracle``."""
    parser = argparse.ArgumentParser(
        prog="kfac-oracle",
        description="Test oracle and conformance harness for KFAC in PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cases", help="list the case catalogue")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--cases", default=None, help="patterns on case id or family")
    p.add_argument("--case-file", action="append", default=[], help="extra case file")
    p.set_defaults(func=_cmd_cases)

    p = sub.add_parser("checks", help="list every check and the statement it tests")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_checks)

    p = sub.add_parser("check", help="run the conformance checks on an implementation")
    p.add_argument(
        "impl", help="module:attr (class, factory or instance) or a built-in name"
    )
    p.add_argument("--cases", default=None, help="patterns on case id or family")
    p.add_argument("--case-file", action="append", default=[], help="extra case file")
    p.add_argument(
        "--checks",
        default=None,
        help="check ids or names; '*' and '?' are wildcards, brackets are literal",
    )
    p.add_argument("--families", default=None, help="comma-separated check families")
    p.add_argument("--json", default=None, help="write the check records as JSON")
    p.add_argument("--report", default=None, help="write a Markdown report")
    p.add_argument(
        "--plots", default=None, help="write a PNG per failed comparison here"
    )
    p.add_argument(
        "--xfail",
        default=None,
        help="expected failures: JSON {pattern: reason}, or text 'pattern # reason'",
    )
    p.add_argument(
        "--time-limit",
        default="60",
        help="seconds per candidate call, or 'none' (default 60)",
    )
    p.add_argument(
        "--isolation",
        choices=("auto", "process", "none"),
        default="auto",
        help="run the candidate in a worker process (default where available)",
    )
    p.add_argument(
        "--single-batch",
        action="store_true",
        help="merge each case's batches into one (an optimizer's mathematics apart "
        "from its accumulation over batches)",
    )
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default=None,
        help="the precision the candidate computes in (default: float64 unless its "
        "capabilities declare float32 only); float32 verdicts use measured rounding "
        "tolerances",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="W",
        help="run the distributed checks instead: W >= 2 processes under "
        "torch.distributed (gloo), each with its own shard of every case's data",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the harness (default 1: the catalogue's problems are "
        "small, and threads only wait for each other; 0 keeps torch's default)",
    )
    p.add_argument(
        "--allow-nothing-passed",
        action="store_true",
        help="exit 0 even when no check passed (all unsupported)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also list every failed check (terminal and --report), not only the "
        "failures grouped by cause",
    )
    p.add_argument(
        "--show", type=int, default=20, help="failed checks listed with --verbose"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="do not read or write the reference disk cache (location: "
        "$KFAC_ORACLE_CACHE, else $XDG_CACHE_HOME/kfac-oracle or "
        "~/.cache/kfac-oracle)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run the cases in N processes (records as in a serial run)",
    )
    p.add_argument(
        "--shard",
        default=None,
        help="run only shard i of n of the selected cases ('i/n'); merge the "
        "shards' --json files with 'kfac-oracle matrix --from'",
    )
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "matrix", help="run every library adapter; write the conformance matrix"
    )
    p.add_argument(
        "adapters", nargs="*", help="built-in adapter names (default: all available)"
    )
    p.add_argument(
        "--extras",
        default=None,
        help="only adapters whose library is installed by these kfac-oracle extras "
        "(comma-separated; 'core' for dependencies such as curvlinops)",
    )
    p.add_argument("--cases", default=None, help="patterns on case id or family")
    p.add_argument("--json", default=None, help="write all check records as JSON")
    p.add_argument("--markdown", default=None, help="write the matrix as Markdown")
    p.add_argument(
        "--report",
        default=None,
        help="write each adapter's failures grouped by cause as Markdown",
    )
    p.add_argument(
        "--time-limit", default="120", help="seconds per candidate call, or 'none'"
    )
    p.add_argument("--isolate", action="store_true", help="one subprocess per adapter")
    p.add_argument(
        "--from",
        dest="from_files",
        nargs="+",
        default=None,
        help="build the matrix from record JSON files of earlier runs",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_matrix)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as error:
        print(f"kfac-oracle: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kfac-oracle: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - an internal error, not a usage error
        traceback.print_exc()
        print(
            "kfac-oracle: internal error (the traceback above); please report it",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
