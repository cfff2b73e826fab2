"""The ``kfac-oracle`` command line.

Subcommands: ``cases`` (the catalogue), ``check`` (conformance of one
implementation), ``matrix`` (every library adapter), ``bench`` (benchmarks).
Exit status: 0 success, 1 failed or errored checks, 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_cases(args) -> int:
    from kfac_oracle.catalogue import load_cases

    cases = load_cases(args.cases, args.case_file)
    if args.json:
        print(json.dumps([c.as_dict() for c in cases], indent=2))
        return 0
    rows = [("id", "family", "loss", "red.", "setting", "N", "P", "claims")]
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
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{len(cases)} cases")
    return 0


class _Progress:
    """A one-line progress bar on a terminal (nothing otherwise)."""

    def __init__(self, enabled: bool, label: str = ""):
        self.enabled = enabled
        self.label = label

    def __call__(self, done: int, total: int, record) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(
            f"\r{self.label}[{bar}] {done}/{total} {record.check[:28]:28s}"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _cmd_check(args) -> int:
    from kfac_oracle import report
    from kfac_oracle.catalogue import load_cases
    from kfac_oracle.checks import CheckSession
    from kfac_oracle.harness import resolve_implementation, run

    impl = resolve_implementation(args.impl)
    try:
        impl._kfac_oracle_spec = args.impl
    except AttributeError:
        pass
    cases = load_cases(args.cases, args.case_file)
    if not cases:
        raise ValueError(f"no case matches {args.cases!r}")
    expected = _load_expected(args.xfail)
    session = CheckSession(impl, time_limit=args.time_limit)
    progress = _Progress(sys.stderr.isatty() and not args.quiet, f"{impl.name} ")
    records = run(
        impl,
        cases,
        checks=args.checks,
        families=args.families.split(",") if args.families else None,
        expected_failures=expected,
        session=session,
        progress=progress,
    )
    print(f"kfac-oracle check {args.impl}: {len(records)} checks on {len(cases)} cases")
    print()
    print(report.summary_table(records))
    failures = report.failures_text(records, limit=args.show)
    if failures:
        print()
        print(failures)
    if args.json:
        report.write_json(records, args.json)
        print(f"\nwrote {args.json}")
    if args.report:
        from pathlib import Path

        Path(args.report).write_text(
            report.markdown_report(records, f"Conformance of {impl.name}")
        )
        print(f"wrote {args.report}")
    if args.plots:
        paths = report.write_plots(session, records, args.plots)
        print(f"wrote {len(paths)} plots to {args.plots}")
    bad = sum(r.status in ("failed", "error") for r in records)
    return 1 if bad else 0


def _load_expected(path: str | None) -> dict[str, str] | None:
    if not path:
        return None
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{pattern: reason}}")
    return data


def _cmd_matrix(args) -> int:
    from kfac_oracle.matrix import main as matrix_main

    return matrix_main(args)


def _cmd_bench(args) -> int:
    from kfac_oracle.bench import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kfac-oracle``."""
    parser = argparse.ArgumentParser(
        prog="kfac-oracle",
        description="Test oracle and conformance harness for KFAC in PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cases", help="list the case catalogue")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--cases", default=None, help="fnmatch pattern(s) on id or family")
    p.add_argument("--case-file", action="append", default=[], help="extra case file")
    p.set_defaults(func=_cmd_cases)

    p = sub.add_parser("check", help="run the conformance checks on an implementation")
    p.add_argument(
        "impl", help="module:attr (class, factory or instance) or a built-in name"
    )
    p.add_argument(
        "--cases", default=None, help="fnmatch pattern(s) on case id or family"
    )
    p.add_argument("--case-file", action="append", default=[], help="extra case file")
    p.add_argument(
        "--checks", default=None, help="fnmatch pattern(s) on check names or ids"
    )
    p.add_argument("--families", default=None, help="comma-separated check families")
    p.add_argument("--json", default=None, help="write the check records as JSON")
    p.add_argument("--report", default=None, help="write a Markdown report")
    p.add_argument(
        "--plots", default=None, help="write a PNG per failed comparison here"
    )
    p.add_argument("--xfail", default=None, help="JSON file {check-id pattern: reason}")
    p.add_argument(
        "--time-limit", type=float, default=60.0, help="seconds per candidate call"
    )
    p.add_argument("--show", type=int, default=20, help="failures to print")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "matrix", help="run every library adapter; write the conformance matrix"
    )
    p.add_argument(
        "adapters", nargs="*", help="built-in adapter names (default: all available)"
    )
    p.add_argument(
        "--cases", default=None, help="fnmatch pattern(s) on case id or family"
    )
    p.add_argument("--json", default=None, help="write all check records as JSON")
    p.add_argument("--markdown", default=None, help="write the matrix as Markdown")
    p.add_argument(
        "--time-limit", type=float, default=120.0, help="seconds per candidate call"
    )
    p.add_argument("--isolate", action="store_true", help="one subprocess per adapter")
    p.add_argument(
        "--from",
        dest="from_files",
        nargs="+",
        default=None,
        help="build the matrix from record JSON files of earlier runs",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_matrix)

    p = sub.add_parser(
        "bench", help="run the benchmarks; write a table and a plot", add_help=False
    )
    p.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="options for the benchmark runner"
    )
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark runner parses its own options
        from kfac_oracle.bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, ImportError, OSError) as error:
        print(f"kfac-oracle: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
