"""The reference disk cache and parallel runs (``benchmarks/cache_speed.py`` has the
full-catalogue measurement reported in docs/benchmarks.md).

- ``test_reference_cache[off|cold|warm]``: a conformance run of the reference on a
  few cases without the disk cache, with an empty cache (emptied before every round)
  and with a filled one; ``extra_info["reference_seconds"]`` is the time spent
  obtaining the exact and reference results.
- ``test_plugin_run[serial|xdist2]``: ``pytest --kfac-impl reference`` on the same
  cases, serial and with ``-n 2`` (pytest-xdist), without the cache; one round each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.cache_speed import _pytest_run, timed_run

CASES = "mlp_tanh_cro_mean,seq_ce_mean"


@pytest.mark.parametrize("state", ["off", "cold", "warm"])
def test_reference_cache(benchmark, state, tmp_path):
    """One conformance run of the reference, by cache state."""
    cache = None if state == "off" else tmp_path / "cache"
    if state == "warm":
        timed_run(CASES, cache)  # fill the cache
    last: dict = {}

    def setup():
        if state == "cold" and cache is not None and cache.exists():
            shutil.rmtree(cache)
        return (), {}

    def fn():
        last.update(timed_run(CASES, cache))

    benchmark.group = "reference-cache"
    benchmark.extra_info.update(cases=CASES, state=state)
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn, rounds=1, iterations=1)
    else:
        benchmark.pedantic(fn, setup=setup, rounds=3, iterations=1)
    benchmark.extra_info["reference_seconds"] = last["references"]
    assert last["records"]


@pytest.mark.parametrize("workers", [1, 2], ids=["serial", "xdist2"])
def test_plugin_run(benchmark, workers, tmp_path):
    """``pytest --kfac-impl reference`` serial and under ``-n 2``."""
    if workers > 1:
        pytest.importorskip("xdist")
    out: dict = {}

    def fn():
        out.update(_pytest_run(CASES, workers, Path(tmp_path, "records.json")))

    benchmark.group = "plugin-run"
    benchmark.extra_info.update(cases=CASES, workers=workers)
    benchmark.pedantic(fn, rounds=1, iterations=1)
    benchmark.extra_info["cpu_seconds"] = out["cpu"]
    assert Path(tmp_path, "records.json").exists()
