"""The conformance matrix: every library adapter through the whole suite.

Rows are adapters (library/flavour), columns the check families, cells
``passed/failed/unsupported`` (errors count as failed, and are listed separately).
Adapters whose library is not installed are listed as such. One adapter failing,
even at import, never stops the others. Records of several runs (e.g. from
environments with conflicting libraries) can be merged with ``--from``.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

from kfac_oracle.checks.registry import family_names
from kfac_oracle.errors import UsageError

TITLE = "KFAC conformance matrix"


def available_adapters() -> dict[str, str | None]:
    """``{registered adapter name: library version or None}``."""
    from kfac_oracle.implementations import adapters

    return {name: impl.version() for name, impl in adapters().items()}


def _extra_of(name: str) -> str:
    """The kfac-oracle extra that installs an adapter's library ('core': none)."""
    from kfac_oracle.implementations import adapters

    library = adapters()[name].library
    return (library.extra if library is not None else None) or "core"


def adapter_findings() -> dict[str, list]:
    """``{adapter name: [Finding]}`` from the adapter modules' ``FINDINGS``."""
    import importlib

    from kfac_oracle.implementations import adapters

    out: dict[str, list] = {}
    for impl in {i.module: i for i in adapters().values()}.values():
        module = importlib.import_module(impl.module)
        for finding in getattr(module, "FINDINGS", []):
            for name in finding.adapters:
                out.setdefault(name, []).append(finding)
    return out


def adapter_error(name: str, message: str) -> dict:
    """One error record for an adapter that could not run at all."""
    return {
        "id": f"adapter[{name}]",
        "check": "adapter",
        "case": "",
        "layer": None,
        "family": "robustness",
        "status": "error",
        "message": message,
        "implementation": name,
    }


def run_adapter(
    name: str, cases, time_limit: float | None, progress=None
) -> list[dict]:
    """Records of one adapter (dicts with ``implementation``); never raises."""
    from kfac_oracle.runner.run import run

    try:
        records = run(name, cases, time_limit=time_limit, progress=progress)
    except Exception as error:  # noqa: BLE001 - one adapter never stops the others
        return [adapter_error(name, f"the adapter could not run: {error!r}")]
    out = []
    for r in records:
        d = r.as_dict()
        d["implementation"] = name
        out.append(d)
    return out


def run_isolated(name: str, cases_pattern, time_limit: float | None) -> list[dict]:
    """Run one adapter in a subprocess (crash isolation)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        cmd = [
            sys.executable,
            "-m",
            "kfac_oracle.cli",
            "matrix",
            name,
            "--json",
            str(out),
            "-q",
        ]
        cmd += ["--time-limit", "none" if time_limit is None else str(time_limit)]
        if cases_pattern:
            cmd += ["--cases", cases_pattern]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if out.exists():
            return json.loads(out.read_text())
        why = f"subprocess exited {proc.returncode}: {proc.stderr[-500:]}"
        return [adapter_error(name, why)]


def matrix_markdown(
    records: list[dict], versions: dict[str, str | None], note: str = ""
) -> str:
    """The matrix as Markdown (rows: adapters; columns: families)."""
    families = family_names()
    families += sorted({r["family"] for r in records} - set(families))
    by_impl: dict[str, dict[str, Counter]] = {}
    for r in records:
        fam = by_impl.setdefault(r["implementation"], {f: Counter() for f in families})
        fam.setdefault(r["family"], Counter())[r["status"]] += 1
    lines = [
        f"| implementation | version | {' | '.join(families)} | errors | documented "
        "| findings (upstream status) |"
    ]
    lines.append("|---|---|" + "---|" * len(families) + "---|---|---|")
    findings = adapter_findings()
    for name in sorted(set(versions) | set(by_impl)):
        version = versions.get(name) or "not installed"
        labels = "; ".join(f.label for f in findings.get(name, [])) or "–"
        if name not in by_impl:
            lines.append(
                f"| {name} | {version} |"
                + " – |" * len(families)
                + f" – | – | {labels} |"
            )
            continue
        cells, errors, documented = [], 0, 0
        for family in families:
            c = by_impl[name].get(family, Counter())
            failed = c["failed"] + c["error"]
            errors += c["error"]
            documented += c["documented"]
            cells.append(f"{c['passed']}/{failed}/{c['unsupported']}")
        lines.append(
            f"| {name} | {version} | "
            + " | ".join(cells)
            + f" | {errors} | {documented} | {labels} |"
        )
    legend = (
        "\nCells: passed/failed/unsupported (failed includes errors, which the errors "
        "column counts; a crash is one error per check that needs the call). "
        "documented: failures the library documents as a deliberate difference, with "
        "the citation in the record (not counted as failed). Findings and their status "
        "(new, known, fixed upstream unreleased, documented convention, documented "
        "limitation): docs/findings.md. "
    )
    return "\n".join(lines) + legend + note + "\n"


def grouped_reports(records: list[dict], cases) -> dict[str, str]:
    """``{adapter: its failures grouped by cause}`` (adapters with failures only)."""
    from kfac_oracle.report import grouped_text

    out = {}
    for name in sorted({r["implementation"] for r in records}):
        mine = [r for r in records if r["implementation"] == name]
        text = grouped_text(mine, cases)
        if text:
            out[name] = text
    return out


def grouped_markdown_report(records: list[dict], cases=None) -> str:
    """Markdown: per adapter, its failures grouped by cause (``matrix --report``)."""
    from kfac_oracle.catalogue import load_cases
    from kfac_oracle.report import grouped_markdown

    cases = load_cases() if cases is None else cases
    lines = [f"# {TITLE}: failures by cause", ""]
    for name in sorted({r["implementation"] for r in records}):
        mine = [r for r in records if r["implementation"] == name]
        table = grouped_markdown(mine, cases)
        lines += [f"## {name}", "", table or "No failures.", ""]
    return "\n".join(lines)


def main(args) -> int:
    """``kfac-oracle matrix``: run adapters, write JSON and Markdown."""
    from kfac_oracle.catalogue import load_cases

    versions = available_adapters()
    if getattr(args, "from_files", None):
        records = []
        for path in args.from_files:
            opener = gzip.open if str(path).endswith(".gz") else open
            with opener(path, "rt") as f:
                records.extend(json.load(f))
        names = sorted({r["implementation"] for r in records})
    else:
        names = args.adapters or [n for n, v in versions.items() if v is not None]
        if getattr(args, "extras", None):
            names = [n for n in names if _extra_of(n) in args.extras.split(",")]
        unknown = [n for n in names if n not in versions]
        if unknown:
            raise UsageError(f"unknown adapters {unknown}; known: {sorted(versions)}")
        cases = load_cases(args.cases)
        records = []
        for name in names:
            start = time.perf_counter()
            if versions[name] is None:
                print(f"{name}: library not installed, skipped", file=sys.stderr)
                continue
            if args.isolate:
                recs = run_isolated(name, args.cases, args.time_limit)
            else:
                recs = run_adapter(name, cases, args.time_limit)
            for r in recs:
                r["library_version"] = versions[name]
            records.extend(recs)
            bad = sum(r["status"] in ("failed", "error") for r in recs)
            print(
                f"{name}: {len(recs)} checks, {bad} failed or errored, "
                f"{time.perf_counter() - start:.0f} s",
                file=sys.stderr,
            )
    recorded = {r["implementation"]: r.get("library_version") for r in records}
    seen_versions = {n: recorded.get(n) or versions.get(n) for n in names}
    note = (
        f"Generated by `kfac-oracle matrix` on {time.strftime('%Y-%m-%d')} with torch "
        f"{metadata.version('torch')}."
    )
    named = args.adapters or getattr(args, "from_files", None)
    table = matrix_markdown(records, seen_versions if named else versions, note)
    print(table)
    catalogue = load_cases(getattr(args, "cases", None))
    for name, text in grouped_reports(records, catalogue).items():
        print(f"\n{name}\n{text}")
    if getattr(args, "report", None):
        Path(args.report).write_text(grouped_markdown_report(records, catalogue))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(f"# {TITLE}\n\n{table}")
    return 0
