"""Golden tests: check ids and the record schema are stable.

Expected-failure files and published records (``docs/matrix.json.gz``) refer to check
ids, so an id may never change silently. ``tests/golden/check_ids.txt`` lists every id
the built-in catalogue produces (one per line, sorted). After deliberately adding cases
or checks, regenerate it with ``KFAC_ORACLE_UPDATE_GOLDEN=1 python -m pytest
tests/test_golden.py`` and review the diff: existing lines must not change.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

from kfac_oracle.catalogue import load_cases
from kfac_oracle.checks import collect
from kfac_oracle.runner.records import CheckRecord

GOLDEN = Path(__file__).parent / "golden"
IDS_FILE = GOLDEN / "check_ids.txt"
MATRIX = Path(__file__).parent.parent / "docs" / "matrix.json.gz"
RECORD_KEYS = [
    "id",
    "check",
    "case",
    "layer",
    "family",
    "status",
    "error",
    "tolerance",
    "diagnosis",
    "message",
    "implementation",
    "seconds",
    "reproduce",
]


def collected_ids() -> list[str]:
    return sorted(item.id for item in collect(load_cases()))


def test_check_ids_are_pinned():
    """Every check id of the built-in catalogue equals the pinned list."""
    ids = collected_ids()
    assert len(ids) == len(set(ids)), "duplicate check ids"
    if os.environ.get("KFAC_ORACLE_UPDATE_GOLDEN"):
        IDS_FILE.write_text("\n".join(ids) + "\n")
    pinned = IDS_FILE.read_text().split()
    missing = sorted(set(pinned) - set(ids))
    added = sorted(set(ids) - set(pinned))
    assert not missing and not added, (
        f"check ids changed: {len(missing)} gone (e.g. {missing[:3]}), "
        f"{len(added)} new (e.g. {added[:3]})"
    )


def test_record_schema_is_pinned():
    """The JSON record of a check has exactly the pinned keys, in order."""
    record = CheckRecord("c", "case", "0", "exactness", "passed")
    assert list(record.as_dict()) == RECORD_KEYS
    assert record.id == "c[case-0]"
    assert CheckRecord("c", "case", None, "robustness", "passed").id == "c[case]"


@pytest.mark.skipif(not MATRIX.exists(), reason="no published matrix")
def test_published_matrix_uses_the_pinned_ids():
    """Each adapter's published records carry exactly the catalogue's check ids."""
    with gzip.open(MATRIX, "rt") as f:
        records = json.load(f)
    by_impl: dict[str, set[str]] = defaultdict(set)
    for r in records:
        assert set(RECORD_KEYS) <= set(r), f"record without the schema's keys: {r}"
        by_impl[r["implementation"]].add(r["id"])
    ids = set(collected_ids())
    for impl, impl_ids in by_impl.items():
        assert impl_ids == ids, f"{impl}: published ids differ from the catalogue's"
