"""Reports of check records: terminal summary, JSON, Markdown, and failure plots."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from kfac_oracle.checks.registry import family_names
from kfac_oracle.errors import UsageError
from kfac_oracle.runner.records import STATUSES, CheckRecord


def summary_counts(records: list[CheckRecord]) -> dict[str, Counter]:
    """``{family: Counter(status)}``, families in rank order (also those with none)."""
    out: dict[str, Counter] = {f: Counter() for f in family_names()}
    for r in records:
        out.setdefault(r.family, Counter())[r.status] += 1
    return out


def summary_table(records: list[CheckRecord]) -> str:
    """A fixed-width table: one row per check family, one column per status."""
    counts = summary_counts(records)
    header = ["family", *STATUSES]
    rows = [header]
    for family, c in counts.items():
        rows.append([family, *(str(c.get(s, 0)) for s in STATUSES)])
    total = Counter(r.status for r in records)
    rows.append(["total", *(str(total.get(s, 0)) for s in STATUSES)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(-1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def failures_text(records: list[CheckRecord], limit: int = 20) -> str:
    """The failed and errored checks, one paragraph each (at most ``limit``)."""
    bad = [r for r in records if r.status in ("failed", "error")]
    lines = []
    for r in bad[:limit]:
        lines.append(f"{r.status.upper()} {r.id}")
        lines.append(f"    {r.message}")
        if r.diagnosis:
            lines.append(f"    diagnosis: {r.diagnosis}")
        if r.reproduce:
            lines.append(f"    reproduce: {r.reproduce}")
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more (see --json)")
    return "\n".join(lines)


def write_json(records: list[CheckRecord], path: str | Path) -> None:
    """A JSON list of records (``--json``)."""
    Path(path).write_text(json.dumps([r.as_dict() for r in records], indent=1))


def markdown_report(records: list[CheckRecord], title: str) -> str:
    """A Markdown report: summary by family and status, then the failures."""
    counts = summary_counts(records)
    lines = [f"# {title}", "", "| family | " + " | ".join(STATUSES) + " |"]
    lines.append("|---" * (len(STATUSES) + 1) + "|")
    for family, c in counts.items():
        lines.append(
            f"| {family} | " + " | ".join(str(c.get(s, 0)) for s in STATUSES) + " |"
        )
    bad = [r for r in records if r.status in ("failed", "error")]
    if bad:
        lines += [
            "",
            "## Failures",
            "",
            "| check | status | error | diagnosis |",
            "|---|---|---|---|",
        ]
        for r in bad:
            err = "" if r.error is None else f"{r.error:.3e}"
            diag = (r.diagnosis or r.message).replace("|", "\\|")
            lines.append(f"| `{r.id}` | {r.status} | {err} | {diag} |")
    return "\n".join(lines) + "\n"


def require_matplotlib() -> None:
    """Raise a usage error unless matplotlib can be imported (for ``--plots``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise UsageError(
            "--plots needs matplotlib: pip install 'kfac-oracle[plots]'"
        ) from error


def write_plots(records: list[CheckRecord], directory: str | Path) -> list[Path]:
    """For each failed block comparison, a PNG: reference, candidate, difference.

    The blocks travel on the records (``record.blocks``). Needs matplotlib (the
    ``plots`` extra).
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for r in records:
        blocks = r.blocks
        if r.status != "failed" or blocks is None:
            continue
        candidate, reference = (b.detach().cpu().numpy() for b in blocks)
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        vmax = max(abs(reference).max(), abs(candidate).max())
        for ax, M, title in zip(
            axes,
            (reference, candidate, candidate - reference),
            ("reference", "candidate", "candidate − reference"),
        ):
            im = ax.imshow(M, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(title)
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(f"{r.id}\n{r.diagnosis or ''}", fontsize=9)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in r.id)
        path = directory / f"{safe}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
