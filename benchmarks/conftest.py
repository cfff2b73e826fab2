"""pytest configuration of the benchmark suite (not collected by the default run).

Run: ``pytest benchmarks/ --benchmark-json out.json`` (see docs/benchmarks.md).
Smoke test: ``pytest benchmarks/ --benchmark-disable -q``.

Options:
    --kfac-bench-impl module:attr   add an implementation (class, instance or a dict
                                    ``{name: class}``); repeatable.
    --kfac-bench-only a,b           benchmark only these implementations.
    --kfac-bench-quick              small problems only (the quick subset).
    --kfac-bench-problems a,b       only these problems.
    --kfac-bench-devices cpu,cuda   devices (default both; cuda skips without a GPU).
    --kfac-bench-json FILE          results file when pytest-benchmark is missing.

Without pytest-benchmark a minimal ``benchmark`` fixture (median of a few rounds,
same JSON layout) is provided, so the suite runs on bare machines.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import pytest
import torch

try:
    import pytest_benchmark  # noqa: F401

    # KFAC_BENCH_FALLBACK=1 (with -p no:benchmark) forces the fallback fixture.
    HAVE_PYTEST_BENCHMARK = os.environ.get("KFAC_BENCH_FALLBACK") != "1"
except ImportError:  # pragma: no cover - depends on environment
    HAVE_PYTEST_BENCHMARK = False


def pytest_addoption(parser):
    group = parser.getgroup("kfac-bench", "kfac_oracle benchmarks")
    group.addoption("--kfac-bench-impl", action="append", default=[])
    group.addoption("--kfac-bench-only", default="")
    group.addoption("--kfac-bench-quick", action="store_true", default=False)
    group.addoption("--kfac-bench-problems", default="")
    group.addoption("--kfac-bench-devices", default="cpu,cuda")
    group.addoption("--kfac-bench-json", default="")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def pytest_configure(config):
    from benchmarks import _support

    entries = _support.builtin_implementations()
    for spec in config.getoption("--kfac-bench-impl"):
        entries.extend(_support.load_external(spec))
    only = _split(config.getoption("--kfac-bench-only"))
    if only:
        entries = [e for e in entries if e.name in only]
    problems = _split(config.getoption("--kfac-bench-problems"))
    quick = config.getoption("--kfac-bench-quick")
    config.kfac_bench = {
        "impls": entries,
        "problems": problems,
        "quick": quick,
        "devices": _split(config.getoption("--kfac-bench-devices")),
    }
    if not HAVE_PYTEST_BENCHMARK:
        config.kfac_bench_results = []


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    from importlib import metadata

    info = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu_name": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else None,
        "torch_num_threads": torch.get_num_threads(),
    }
    for dist in ("curvlinops-for-pytorch", "backpack-for-pytorch", "kfac-oracle"):
        try:
            info[f"{dist}_version"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[f"{dist}_version"] = None
    machine_info.update(info)


# ----------------------------------------------------------------------------------
# Fallback benchmark fixture (only without pytest-benchmark)
# ----------------------------------------------------------------------------------


class _MiniBenchmark:
    """The subset of pytest-benchmark's fixture the suite uses."""

    disabled = False

    def __init__(self, node):
        self.node = node
        self.extra_info = {}
        self.group = None
        self.stats = None

    def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0, **_):
        for _ in range(warmup_rounds):
            fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(iterations):
                result = fn()
            times.append((time.perf_counter() - start) / iterations)
        self.stats = {
            "median": statistics.median(times),
            "mean": statistics.fmean(times),
            "min": min(times),
            "max": max(times),
            "stddev": statistics.stdev(times) if len(times) > 1 else 0.0,
            "rounds": rounds,
        }
        return result


if not HAVE_PYTEST_BENCHMARK:  # pragma: no cover - depends on environment

    @pytest.fixture
    def benchmark(request):
        bench = _MiniBenchmark(request.node)
        yield bench
        if bench.stats is not None:
            request.config.kfac_bench_results.append(
                {
                    "name": request.node.name,
                    "fullname": request.node.nodeid,
                    "group": bench.group,
                    "params": None,
                    "extra_info": bench.extra_info,
                    "stats": bench.stats,
                }
            )

    def pytest_sessionfinish(session):
        path = session.config.getoption("--kfac-bench-json")
        if not path:
            return
        machine = {
            "node": platform.node(),
            "machine": platform.machine(),
            "python_version": platform.python_version(),
        }
        pytest_benchmark_update_machine_info(session.config, machine)
        with open(path, "w") as f:
            json.dump(
                {
                    "machine_info": machine,
                    "benchmarks": session.config.kfac_bench_results,
                    "fallback": "kfac_oracle minimal benchmark fixture",
                },
                f,
                indent=2,
            )
