"""The library adapters, from the registry: each one's own expectations, and the matrix.

Every adapter module declares ``EXPECTATIONS`` (:class:`kfac_oracle.adapters._common.
Expectation`): catalogue cases and checks where its library is right, which must pass
(a wrong reduction, factor order, bias placement or MSE factor in the adapter would
fail them), and its findings (docs/findings.md), which must stay visible with their
measured numbers. Adapters whose library is missing are skipped. The end-to-end tests
run the ``kfac-oracle matrix`` command and its ``--from`` merge.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from kfac_oracle.implementations import adapters
from kfac_oracle.runner.run import run

ADAPTERS = adapters()


def expectations():
    out = []
    for name, impl in ADAPTERS.items():
        module = importlib.import_module(impl.module)
        for k, exp in enumerate(getattr(module, "EXPECTATIONS", [])):
            if exp.adapter == name:
                out.append(pytest.param(exp, id=f"{name}-{exp.finding or 'right'}-{k}"))
    return out


def require(name: str) -> None:
    """Skip unless the adapter's library is installed and imports."""
    library = ADAPTERS[name].library
    if library is None:
        return
    if library.version() is None:
        pytest.skip(f"{library.distribution} is not installed")
    try:
        library.load()
    except ImportError as error:  # e.g. laplace beside an incompatible torchvision
        pytest.skip(f"{library.distribution} does not import: {error}")


def test_every_adapter_module_is_registered():
    """Each module of kfac_oracle/adapters has an entry point (the one registry)."""
    import pkgutil

    import kfac_oracle.adapters as package

    modules = {
        f"kfac_oracle.adapters.{m.name}"
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_")
    }
    registered = {impl.module for impl in ADAPTERS.values()}
    assert modules == registered
    for impl in ADAPTERS.values():
        module = importlib.import_module(impl.module)
        assert module.LIBRARY is impl.library
        assert getattr(module, "EXPECTATIONS", None), f"{impl.module}: no EXPECTATIONS"


def declared_findings() -> dict[str, object]:
    out = {}
    for impl in ADAPTERS.values():
        for finding in getattr(importlib.import_module(impl.module), "FINDINGS", []):
            out[finding.id] = finding
    return out


def test_findings_have_one_status_everywhere():
    """docs/findings.md's status table and the adapters' FINDINGS agree, id by id."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "findings.md").read_text()
    section = text.split("## Status of every finding")[1].split("\n## ")[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.replace("\\|", "/").split("|")[1:-1]]
        if len(cells) == 5 and cells[0] not in ("id", "---"):
            table[cells[0]] = cells[3]
    declared = declared_findings()
    assert table, "no status table in docs/findings.md"
    assert set(table) == set(declared), sorted(set(table) ^ set(declared))
    for fid, status in table.items():
        assert declared[fid].status == status.strip(), fid
    for finding in declared.values():
        assert set(finding.adapters) <= set(ADAPTERS), finding.id


@pytest.mark.parametrize("exp", expectations())
def test_adapter_expectations(exp):
    """Where the library is right every selected check passes; findings stay visible."""
    require(exp.adapter)
    records = run(exp.adapter, cases=exp.cases, checks=exp.checks, time_limit=120)
    if exp.status == "passed":
        bad = [f"{r.id}: {r.status}: {r.message[:200]}" for r in records]
        bad = [b for b, r in zip(bad, records) if r.status != "passed"]
        assert not bad, "\n".join(bad)
        return
    record = records[0]
    assert record.status == exp.status, f"{record.id}: {record.message}"
    assert exp.text in (record.diagnosis or "") + record.message, record.diagnosis
    if exp.error is not None:
        assert record.error == pytest.approx(exp.error, rel=1e-6)


def kfac_oracle(*args: str, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "kfac_oracle.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_matrix_command_end_to_end(tmp_path):
    """`kfac-oracle matrix` on two adapters and two small cases, then `--from`."""
    require("curvlinops-kfac")
    require("backpack-kflr")
    first, merged = tmp_path / "a.json", tmp_path / "merged.json"
    kfac_oracle(
        "matrix",
        "curvlinops-kfac",
        "backpack-kflr",
        "--cases",
        "one_datum_mse_mean,deep_linear_d1_bias_mse_sum",
        "--json",
        str(first),
        "--markdown",
        str(tmp_path / "a.md"),
        "-q",
        cwd=tmp_path,
    )
    records = json.loads(first.read_text())
    by_impl = {r["implementation"] for r in records}
    assert by_impl == {"curvlinops-kfac", "backpack-kflr"}
    assert any(r["status"] == "passed" for r in records)
    table = (tmp_path / "a.md").read_text()
    assert "| curvlinops-kfac |" in table and "| backpack-kflr |" in table

    # A second run of one adapter, merged with --from: the records are concatenated.
    second = tmp_path / "b.json"
    kfac_oracle(
        "matrix",
        "backpack-kflr",
        "--cases",
        "deep_linear_d1_nobias_mse_mean",
        "--json",
        str(second),
        "-q",
        cwd=tmp_path,
    )
    proc = kfac_oracle(
        "matrix",
        "--from",
        str(first),
        str(second),
        "--json",
        str(merged),
        "--markdown",
        str(tmp_path / "merged.md"),
        cwd=tmp_path,
    )
    both = json.loads(merged.read_text())
    assert len(both) == len(records) + len(json.loads(second.read_text()))
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "backpack-kflr",
        "curvlinops-kfac",
    ]
    # The merged cells add up the records of both runs.
    kflr = [r for r in both if r["implementation"] == "backpack-kflr"]
    passed = sum(r["status"] == "passed" for r in kflr)
    cells = rows[1].split("|")[3:-2]
    assert sum(int(c.split("/")[0]) for c in cells) == passed
