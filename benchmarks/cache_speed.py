"""The reference disk cache and parallel runs, measured on the catalogue.

Reference cache: the same conformance run (``kfac_oracle.runner.run.run``, the
built-in reference as candidate) three times, in one process: without the cache
(``off``), with an empty cache (``cold``), and again (``warm``). Reported per run:
wall time, and *reference time*, the time spent obtaining exact and reference
results (computing them, or reading them from the cache), measured around the
outermost cached step of ``ReferenceCache``. The candidate's own calls are never
cached (it is under test), so the whole run cannot speed up by more than
``total / (total - reference time)``. The records of the three runs must be equal
(timings aside); the script fails otherwise.

Parallel runs: ``pytest --kfac-impl reference --kfac-no-cache`` serial and with
``-n N`` (pytest-xdist), back to back (``--xdist N``): wall and CPU time of each, and
whether their ``--kfac-json`` records are equal.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.cache_speed [--cases PATTERN]
[--xdist 2]`` (the whole catalogue by default; several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def reference_timer() -> Iterator[dict[str, float]]:
    """Accumulates the seconds of outermost ``ReferenceCache._cached`` calls."""
    from kfac_oracle.runner.references import ReferenceCache

    original = ReferenceCache._cached
    state = {"seconds": 0.0, "depth": 0}

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        state["depth"] += 1
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            state["depth"] -= 1
            if state["depth"] == 0:
                state["seconds"] += time.perf_counter() - start

    ReferenceCache._cached = timed  # type: ignore[method-assign]
    try:
        yield state
    finally:
        ReferenceCache._cached = original  # type: ignore[method-assign]


def timed_run(cases: str | None, cache: Path | None) -> dict[str, Any]:
    """One run of the reference; ``cache=None`` runs without the disk cache."""
    from kfac_oracle.runner import diskcache
    from kfac_oracle.runner.run import Session, run

    enabled, location = diskcache._enabled, os.environ.get(diskcache.ENV)
    diskcache.set_enabled(cache is not None)
    if cache is not None:
        os.environ[diskcache.ENV] = str(cache)
    try:
        with reference_timer() as refs:
            start = time.perf_counter()
            session = Session.start("reference")
            try:
                records = run(None, cases, session=session)
            finally:
                session.close()
            wall = time.perf_counter() - start
    finally:
        diskcache.set_enabled(enabled)
        if location is None:
            os.environ.pop(diskcache.ENV, None)
        else:
            os.environ[diskcache.ENV] = location
    rows = [{k: v for k, v in r.as_dict().items() if k != "seconds"} for r in records]
    return {"wall": wall, "references": refs["seconds"], "records": rows}


def cache_table(cases: str | None) -> tuple[str, bool]:
    """Markdown table of the off/cold/warm runs, and whether their records agree."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kfac-oracle-bench-cache-") as tmp:
        runs = {
            "off": timed_run(cases, None),
            "cold": timed_run(cases, Path(tmp)),
            "warm": timed_run(cases, Path(tmp)),
        }
    same = runs["off"]["records"] == runs["cold"]["records"] == runs["warm"]["records"]
    lines = [
        "| run | checks | wall s | reference s | rest s |",
        "|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        rest = r["wall"] - r["references"]
        lines.append(
            f"| {name} | {len(r['records'])} | {r['wall']:.1f} | "
            f"{r['references']:.2f} | {rest:.1f} |"
        )
    cold, warm = runs["cold"], runs["warm"]
    lines.append("")
    lines.append(
        f"warm vs cold: whole run {cold['wall'] / warm['wall']:.2f}x, reference "
        f"time {cold['references'] / max(warm['references'], 1e-9):.1f}x; records "
        f"equal: {same}"
    )
    return "\n".join(lines), same


def _pytest_run(cases: str | None, workers: int, out: Path) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"]
    cmd += ["-p", "no:cacheprovider", "--kfac-impl", "reference", "--kfac-no-cache"]
    cmd += ["--kfac-json", str(out)]
    if cases:
        cmd += ["--kfac-cases", cases]
    if workers > 1:
        cmd += ["-n", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": os.getloadavg()[0]}


def _burn(n: int) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - start


def capacity(workers: int, n: int = 20_000_000) -> float:
    """How much faster ``workers`` CPU-bound processes finish ``workers`` equal jobs
    than one process finishes one, times ``workers``: the parallelism the machine
    offers at this moment (``workers`` on an idle machine with that many cores)."""
    import multiprocessing

    one = _burn(n)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        start = time.perf_counter()
        pool.map(_burn, [n] * workers)
        many = time.perf_counter() - start
    return workers * one / many


def xdist_table(cases: str | None, workers: int) -> tuple[str, bool]:
    """Markdown table of a serial and an ``-n workers`` plugin run, back to back."""
    with tempfile.TemporaryDirectory() as tmp:
        serial_json, xdist_json = Path(tmp, "serial.json"), Path(tmp, "xdist.json")
        before = capacity(workers)
        serial = _pytest_run(cases, 1, serial_json)
        xdist = _pytest_run(cases, workers, xdist_json)
        after = capacity(workers)

        def load(path: Path) -> list[dict]:
            rows = json.loads(path.read_text()) if path.exists() else []
            return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

        a, b = load(serial_json), load(xdist_json)
    same = bool(a) and a == b
    lines = [
        "| run | checks | wall s | CPU s | load (1 min) at the end |",
        "|---|---|---|---|---|",
        f"| serial | {len(a)} | {serial['wall']:.1f} | {serial['cpu']:.1f} | "
        f"{serial['load']:.1f} |",
        f"| -n {workers} | {len(b)} | {xdist['wall']:.1f} | {xdist['cpu']:.1f} | "
        f"{xdist['load']:.1f} |",
        "",
        f"-n {workers} vs serial: {serial['wall'] / xdist['wall']:.2f}x (wall); "
        f"records equal: {same}",
        f"the machine's parallelism for {workers} CPU-bound processes: "
        f"{before:.2f}x before, {after:.2f}x after",
    ]
    return "\n".join(lines), same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=None, help="case patterns (default: all)")
    parser.add_argument("--xdist", type=int, default=0, help="also time -n N")
    parser.add_argument("--skip-cache", action="store_true")
    args = parser.parse_args(argv)
    ok = True
    if not args.skip_cache:
        table, same = cache_table(args.cases)
        print(table, flush=True)
        ok &= same
    if args.xdist:
        table, same = xdist_table(args.cases, args.xdist)
        print()
        print(table, flush=True)
        ok &= same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
