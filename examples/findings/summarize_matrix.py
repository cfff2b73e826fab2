"""Group the failed and errored records of a `kfac-oracle matrix --json` file.

Usage: python examples/findings/summarize_matrix.py docs/matrix.json.gz [adapter ...]

The records file may be plain JSON or gzipped (a name ending in ``.gz``).

Per adapter, records are grouped by check name (the part before ``[``) and by the
diagnosis (or, without one, the message) with its numbers replaced by ``#``; each group
prints its size, the range of the measured errors, the cases, and one full example.
"""

import gzip
import json
import re
import sys
from collections import defaultdict

NUMBER = re.compile(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?")


def key_text(record):
    text = record.get("diagnosis") or record.get("message") or ""
    text = text.split("\n")[0]
    return NUMBER.sub("#", text)[:160]


def main(path, wanted=()):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        records = json.load(f)
    groups = defaultdict(list)
    for r in records:
        if r["status"] not in ("failed", "error"):
            continue
        if wanted and r["implementation"] not in wanted:
            continue
        check = r["check"]
        groups[(r["implementation"], check, r["status"], key_text(r))].append(r)
    current = None
    for (impl, check, status, text), recs in sorted(groups.items()):
        if impl != current:
            current = impl
            total = sum(
                x["status"] in ("failed", "error")
                for x in records
                if x["implementation"] == impl
            )
            print(f"\n## {impl}: {total} failed or errored")
        errors = [r["error"] for r in recs if r["error"] is not None]
        span = f" error {min(errors):.3g}..{max(errors):.3g}" if errors else ""
        cases = sorted({r["case"] for r in recs})
        print(f"- {check} [{status}] x{len(recs)}{span}: {text}")
        print(f"    cases: {', '.join(cases[:8])}{' ...' if len(cases) > 8 else ''}")
        example = recs[0]
        print(f"    e.g. {example['id']}: {example['message'][:300]}")
        if example.get("diagnosis"):
            print(f"    diagnosis: {example['diagnosis'][:300]}")


if __name__ == "__main__":
    main(sys.argv[1], tuple(sys.argv[2:]))
