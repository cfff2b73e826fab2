"""The published matrix agrees with its records.

README, docs/matrix.md and docs/findings.md are checked against docs/matrix.json.gz.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from kfac_oracle.matrix import matrix_markdown

ROOT = Path(__file__).parent.parent
MATRIX = ROOT / "docs" / "matrix.json.gz"


@pytest.fixture(scope="module")
def records() -> list[dict]:
    with gzip.open(MATRIX, "rt") as f:
        return json.load(f)


def table_rows(text: str) -> list[str]:
    """The rows of the matrix table (``| name | version | ...``), header excluded."""
    rows = [line.strip() for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows if not r.startswith("| implementation")]


def expected_rows(records: list[dict]) -> list[str]:
    versions = {r["implementation"]: r.get("library_version") for r in records}
    return table_rows(matrix_markdown(records, versions))


def test_readme_matrix_equals_the_records(records):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Conformance matrix")[1].split("\n## ")[0]
    assert table_rows(section) == expected_rows(records)


def test_docs_matrix_equals_the_records(records):
    assert table_rows((ROOT / "docs" / "matrix.md").read_text()) == expected_rows(
        records
    )


def test_findings_counts_equal_the_records(records):
    """docs/findings.md's per-adapter count of failed and errored records."""
    text = (ROOT / "docs" / "findings.md").read_text()
    section = text.split("## Matrix records per adapter")[1]
    bad = Counter(
        r["implementation"] for r in records if r["status"] in ("failed", "error")
    )
    stated = dict(re.findall(r"^\| ([a-z0-9-]+) \| (\d+) \|", section, re.M))
    assert stated, "no count table in docs/findings.md"
    assert {k: int(v) for k, v in stated.items()} == {
        name: bad.get(name, 0) for name in stated
    }
    assert set(stated) == {r["implementation"] for r in records}
