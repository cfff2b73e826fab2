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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as error:
        print(f"kfac-oracle: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
