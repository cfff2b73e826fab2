"""Run the benchmark suite and report ratios: ``python -m benchmarks.bench``.

Runs ``pytest benchmarks/ --benchmark-json FILE`` in a subprocess, then writes to the
output directory:

- ``benchmarks.json``: pytest-benchmark's raw results;
- ``benchmarks.md``: a Markdown table (implementation × problem × flavour: median
  time, ratio to the reference, ratio to one forward+backward pass, peak memory),
  the exact-reference comparisons and the performance goals;
- ``benchmarks.png``: time and peak memory against the number of parameters,
  log-log, one line per implementation (needs matplotlib).

Ratios, not absolute times, are the point: every ratio's numerator and denominator
come from the same run. Regression gate: ``--compare`` adds
``--benchmark-compare --benchmark-compare-fail=median:10%`` only if ``.benchmarks/``
holds a saved run (otherwise it says so and skips the comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

QUICK_ARGS = ["--kfac-bench-quick"]


def _bench_dir(explicit: str | None) -> Path:
    return Path(explicit) if explicit else Path(__file__).resolve().parent


def saved_runs(storage: Path) -> list[Path]:
    """The runs pytest-benchmark saved under ``storage`` (``.benchmarks/``)."""
    if not storage.is_dir():
        return []
    return sorted(storage.glob("*/*.json"))


def pytest_command(args, json_path: Path) -> tuple[list[str], str | None]:
    """The pytest command line and a note (e.g. why the comparison is skipped)."""
    bench_dir = _bench_dir(args.bench_dir)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(bench_dir),
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={json_path}",
        f"--benchmark-storage={args.storage}",
        "--benchmark-columns=median,iqr,rounds",
        "--benchmark-sort=fullname",
    ]
    if args.quick:
        cmd += QUICK_ARGS
    if args.devices:
        cmd.append(f"--kfac-bench-devices={args.devices}")
    if args.only:
        cmd.append(f"--kfac-bench-only={args.only}")
    if args.problems:
        cmd.append(f"--kfac-bench-problems={args.problems}")
    for spec in args.impl:
        cmd.append(f"--kfac-bench-impl={spec}")
    if args.save:
        cmd.append(f"--benchmark-save={args.save}")
    if args.autosave:
        cmd.append("--benchmark-autosave")
    note = None
    if args.compare:
        if saved_runs(Path(args.storage)):
            cmd += [
                "--benchmark-compare",
                f"--benchmark-compare-fail=median:{args.compare_threshold}",
            ]
        else:
            note = (
                f"no saved baseline under {args.storage}/: regression comparison "
                "skipped (save one with --save NAME or --autosave)"
            )
    if args.keyword:
        cmd += ["-k", args.keyword]
    cmd += args.pytest_args
    return cmd, note


# ----------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------


def _fmt_time(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "–"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def _fmt_mem(nbytes) -> str:
    if nbytes is None:
        return "–"
    return f"{nbytes / 2**20:.1f} MiB"


def _fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}"


def _rows(data: dict) -> list[dict]:
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        info["median"] = b["stats"]["median"]
        info["rounds"] = b["stats"].get("rounds")
        info["name"] = b.get("name")
        rows.append(info)
    return rows


def _key(row: dict) -> tuple:
    return (row.get("problem"), row.get("device"), row.get("dtype"))


def summarise(data: dict) -> dict:
    """Tables of ratios computed from one run's JSON.

    Returns:
        ``{"factors": [...], "dense": [...], "products": [...], "goals": [...],
        "machine": {...}}``; each factor row has ``ratio_ref`` (time / the
        reference's for the same problem, flavour, approximation, device and dtype)
        and ``ratio_fb`` (time / one forward+backward pass of the same model).
    """
    rows = _rows(data)
    fwd = {_key(r): r["median"] for r in rows if r.get("kind") == "fwd-bwd"}
    factors = [r for r in rows if r.get("kind") == "factors"]
    ref = {
        (*_key(r), r.get("flavour"), r.get("approx")): r["median"]
        for r in factors
        if r.get("impl") == "reference"
    }
    for r in factors:
        base = ref.get((*_key(r), r.get("flavour"), r.get("approx")))
        r["ratio_ref"] = r["median"] / base if base else None
        fb = fwd.get(_key(r))
        r["ratio_fb"] = r["median"] / fb if fb else None
    dense = [
        r for r in rows if r.get("kind") in ("dense-ggn", "ggn-blocks", "ggn-matvec")
    ]
    dref = {
        (r["kind"], *_key(r)): r["median"]
        for r in dense
        if r.get("impl") == "reference"
    }
    for r in dense:
        base = dref.get((r["kind"], *_key(r)))
        r["ratio_ref"] = r["median"] / base if base else None
        fb = fwd.get(_key(r))
        r["ratio_fb"] = r["median"] / fb if fb else None
    products = [r for r in rows if r.get("kind") in ("mvp", "ivp")]
    pref = {
        (r["kind"], *_key(r)): r["median"]
        for r in products
        if r.get("impl") == "reference"
    }
    for r in products:
        base = pref.get((r["kind"], *_key(r)))
        r["ratio_ref"] = r["median"] / base if base else None
    return {
        "factors": factors,
        "dense": dense,
        "products": products,
        "goals": goals(factors, dense, fwd),
        "machine": data.get("machine_info", {}),
    }


def goals(factors: list[dict], dense: list[dict], fwd: dict) -> list[dict]:
    """The performance goals (docs/benchmarks.md), evaluated where measured."""
    out = []

    def find(rows, **kw):
        return next(
            (r for r in rows if all(r.get(k) == v for k, v in kw.items())), None
        )

    for device in ("cpu", "cuda"):
        common = dict(problem="mlp512", device=device, dtype="float32")
        ref = find(
            factors, impl="reference", flavour="type-2", approx="expand", **common
        )
        cl = find(factors, impl="curvlinops-op", **common)
        fb = fwd.get(("mlp512", device, "float32"))
        if ref and cl:
            ratio = ref["median"] / cl["median"]
            out.append(
                {
                    "goal": f"reference type-2 KFAC mlp512 ({device}, float32) <= "
                    "curvlinops compute_kronecker_factors",
                    "value": ratio,
                    "target": "<= 1.0",
                    "ok": ratio <= 1.0,
                }
            )
        if ref and fb:
            ratio = ref["median"] / fb
            out.append(
                {
                    "goal": f"reference type-2 KFAC mlp512 ({device}, float32) <= "
                    "6x forward+backward",
                    "value": ratio,
                    "target": "<= 6.0",
                    "ok": ratio <= 6.0,
                }
            )
        for dtype in ("float64", "float32"):
            common = dict(kind="dense-ggn", problem="ggn7k", device=device, dtype=dtype)
            r = find(dense, impl="reference", **common)
            c = find(dense, impl="curvlinops", **common)
            if r and c:
                speedup = c["median"] / r["median"]
                out.append(
                    {
                        "goal": f"reference dense GGN ggn7k ({device}, {dtype}) >= 5x "
                        "faster than curvlinops GGN @ I",
                        "value": speedup,
                        "target": ">= 5.0",
                        "ok": speedup >= 5.0,
                    }
                )
    return out


def markdown(summary: dict) -> str:
    """The Markdown report."""
    m = summary["machine"]
    lines = ["# kfac_oracle benchmarks", ""]
    cpu = m.get("cpu", {}) or {}
    lines.append(
        f"torch {m.get('torch_version')}, CUDA {m.get('cuda_version')}, "
        f"GPU {m.get('gpu_name')}, CPU {cpu.get('brand_raw', m.get('machine'))}, "
        f"torch threads {m.get('torch_num_threads')}, "
        f"curvlinops {m.get('curvlinops-for-pytorch_version')}, "
        f"BackPACK {m.get('backpack-for-pytorch_version')}."
    )
    lines += [
        "",
        "Ratios are medians divided by medians from the same run: `/ ref` by the "
        "reference's time for the same problem, flavour, approximation, device and "
        "dtype; `/ fwd+bwd` by one forward+backward pass of the same model. Peak "
        "memory: see docs/benchmarks.md.",
        "",
    ]
    if summary["goals"]:
        lines += [
            "## Goals",
            "",
            "| goal | measured | target | met |",
            "|---|---|---|---|",
        ]
        for g in summary["goals"]:
            ok = "yes" if g["ok"] else "**no**"
            lines.append(f"| {g['goal']} | {g['value']:.2f} | {g['target']} | {ok} |")
        lines.append("")
    lines += [
        "## KFAC factors",
        "",
        "| implementation | problem | P | flavour | approx | device | dtype | median "
        "| / ref | / fwd+bwd | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = lambda r: (  # noqa: E731
        r.get("problem"),
        r.get("device"),
        r.get("dtype"),
        r.get("flavour"),
        r.get("approx"),
        r.get("impl") != "reference",
        r.get("impl"),
    )
    for r in sorted(summary["factors"], key=order):
        lines.append(
            f"| {r.get('impl')} | {r.get('problem')} | {r.get('num_params')} | "
            f"{r.get('flavour')} | {r.get('approx')} | {r.get('device')} | "
            f"{r.get('dtype')} | {_fmt_time(r['median'])} | "
            f"{_fmt_ratio(r['ratio_ref'])} | {_fmt_ratio(r['ratio_fb'])} | "
            f"{_fmt_mem(r.get('peak_memory_bytes'))} |"
        )
    if summary["dense"]:
        lines += [
            "",
            "## Exact references (GGN)",
            "",
            "`curvlinops` = `GGNLinearOperator @ eye(P)` (blocks: one operator per "
            "layer); `naive` = P products `CurvatureOperator.matvec`.",
            "",
            "| what | implementation | problem | P | device | dtype | median | / ref "
            "| / fwd+bwd | peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(summary["dense"], key=lambda r: (r["kind"], *order(r))):
            lines.append(
                f"| {r['kind']} | {r.get('impl')} | {r.get('problem')} | "
                f"{r.get('num_params')} | {r.get('device')} | {r.get('dtype')} | "
                f"{_fmt_time(r['median'])} | {_fmt_ratio(r['ratio_ref'])} | "
                f"{_fmt_ratio(r['ratio_fb'])} | "
                f"{_fmt_mem(r.get('peak_memory_bytes'))} |"
            )
    if summary["products"]:
        lines += [
            "",
            "## KFAC products (type-2)",
            "",
            "`mvp`: `(G ⊗ A) v`; `ivp`: `((G+λI)⁻¹ ⊗ (A+λI)⁻¹) v` including the "
            "factorisation (λ = 1e-3).",
            "",
            "| product | implementation | problem | device | dtype | median | / ref |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(summary["products"], key=lambda r: (r["kind"], *order(r))):
            lines.append(
                f"| {r['kind']} | {r.get('impl')} | {r.get('problem')} | "
                f"{r.get('device')} | {r.get('dtype')} | {_fmt_time(r['median'])} | "
                f"{_fmt_ratio(r['ratio_ref'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    """Log-log time and memory against P, one line per implementation.

    Uses the type-2 (else the implementation's only) flavour, expand, float32, per
    device. Returns ``False`` when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    flavours = defaultdict(set)
    for r in summary["factors"]:
        flavours[r.get("impl")].add(r.get("flavour"))
    for r in summary["factors"]:
        impl = r.get("impl")
        wanted = "type-2" if "type-2" in flavours[impl] else min(flavours[impl])
        if r.get("flavour") != wanted or r.get("approx") != "expand":
            continue
        if r.get("dtype") != "float32":
            continue
        label = f"{impl} ({wanted}, {r.get('device')})"
        series[label][r["num_params"]].append((r["median"], r.get("peak_memory_bytes")))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for label, points in sorted(series.items()):
        xs = sorted(points)
        times = [statistics.median(t for t, _ in points[x]) for x in xs]
        axes[0].plot(xs, times, marker="o", label=label)
        mem = [(x, max((m or 0) for _, m in points[x])) for x in xs]
        mem = [(x, m) for x, m in mem if m > 0]
        if mem:
            axes[1].plot(*zip(*mem), marker="o", label=label)
    for ax, ylabel in zip(axes, ("median time [s]", "peak memory [bytes]")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of parameters P")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("KFAC factors: time")
    axes[1].set_title("KFAC factors: peak memory")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(json_path: Path, out_dir: Path) -> dict:
    """Write ``benchmarks.md`` (and ``benchmarks.png``) from a results JSON."""
    data = json.loads(Path(json_path).read_text())
    summary = summarise(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.md").write_text(markdown(summary))
    plot(summary, out_dir / "benchmarks.png")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of ``python -m benchmarks.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Run the KFAC benchmark suite and write a Markdown table and plot.",
    )
    p.add_argument("--out", default="bench-out", help="output directory")
    p.add_argument("--quick", action="store_true", help="small problems only")
    p.add_argument("--devices", default="", help="e.g. cpu or cpu,cuda")
    p.add_argument("--only", default="", help="implementations, comma-separated")
    p.add_argument("--problems", default="", help="problems, comma-separated")
    p.add_argument(
        "--impl", action="append", default=[], help="extra implementation module:attr"
    )
    p.add_argument("-k", dest="keyword", default="", help="pytest -k expression")
    p.add_argument("--bench-dir", default=None, help="the benchmarks/ directory")
    p.add_argument("--storage", default=".benchmarks", help="saved runs directory")
    p.add_argument("--save", default="", help="save this run as a baseline NAME")
    p.add_argument("--autosave", action="store_true", help="save this run")
    p.add_argument(
        "--compare",
        action="store_true",
        help="fail on a median regression vs the latest saved run (if any)",
    )
    p.add_argument("--compare-threshold", default="10%")
    p.add_argument(
        "--report-only",
        metavar="JSON",
        default=None,
        help="do not run; write the report from an existing results JSON",
    )
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the suite and write the report; returns pytest's exit status (0 = ok)."""
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "benchmarks.json"
    status = 0
    if args.report_only:
        json_path = Path(args.report_only)
    else:
        cmd, note = pytest_command(args, json_path)
        if note:
            print(f"benchmarks.bench: {note}")
        print("benchmarks.bench: " + " ".join(cmd), flush=True)
        status = subprocess.call(cmd)
        if not json_path.is_file():
            print("benchmarks.bench: no results written", file=sys.stderr)
            return status or 1
    summary = report(json_path, out_dir)
    for g in summary["goals"]:
        print(
            f"  goal: {g['goal']}: {g['value']:.2f} ({g['target']}) "
            f"{'met' if g['ok'] else 'NOT met'}"
        )
    print(f"benchmarks.bench: wrote {out_dir / 'benchmarks.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
