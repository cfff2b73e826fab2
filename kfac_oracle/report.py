"""Reports of check records: terminal summary, JSON, Markdown, and failure plots."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kfac_oracle.checks.registry import family_names
from kfac_oracle.errors import UsageError
from kfac_oracle.grouping import FailureGroup, analyse
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


# Groups shown in full before the rest are summed up in one line: with three lines a
# group, a grouped report fits on one screen (about 50 lines).
MAX_GROUPS = 12
MAX_TEXT = 200


def _clip(text: str, width: int = MAX_TEXT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def grouped_failures(
    records: Sequence[Any], cases: Iterable[Any] = ()
) -> list[FailureGroup]:
    """The failures grouped by cause and correlated with case properties.

    See :func:`kfac_oracle.grouping.analyse`.
    """
    return analyse(records, cases)


def grouped_text(
    records: Sequence[Any],
    cases: Iterable[Any] = (),
    max_groups: int = MAX_GROUPS,
    groups: list[FailureGroup] | None = None,
) -> str:
    """Failures by cause, as text (empty if nothing failed).

    Per group: its count and cause, where it occurs (the case properties it
    correlates with) and one reproduce command; at most ``max_groups`` groups.
    """
    groups = grouped_failures(records, cases) if groups is None else groups
    if not groups:
        return ""
    failed = sum(g.count for g in groups if g.kind != "exception")
    errors = sum(g.count for g in groups if g.kind == "exception")
    lines = [
        f"failures by cause: {failed} failed, {errors} errored, in {len(groups)} "
        "group(s)"
    ]
    width = len(str(groups[0].count))
    pad = " " * (width + 4)
    for g in groups[:max_groups]:
        lines.append(f"  {g.count:>{width}}× {_clip(g.label)}")
        lines.append(f"{pad}where: {_clip(g.correlation)}")
        example = g.example
        reproduce = _value(example, "reproduce")
        if reproduce:
            lines.append(f"{pad}reproduce: {reproduce}")
        else:
            lines.append(f"{pad}check: {_record_id(example)}")
    rest = groups[max_groups:]
    if rest:
        n = sum(g.count for g in rest)
        lines.append(
            f"  ... and {len(rest)} more group(s) of {n} check(s) (--verbose or --json)"
        )
    return "\n".join(lines)


def grouped_markdown(
    records: Sequence[Any],
    cases: Iterable[Any] = (),
    max_groups: int = MAX_GROUPS,
    groups: list[FailureGroup] | None = None,
) -> str:
    """The grouped failures as a Markdown table (one row per group)."""
    groups = grouped_failures(records, cases) if groups is None else groups
    if not groups:
        return ""
    lines = [
        "| count | cause | where | example |",
        "|---|---|---|---|",
    ]
    for g in groups[:max_groups]:
        example = _value(g.example, "reproduce") or _record_id(g.example)
        cells = (str(g.count), _clip(g.label), _clip(g.correlation), f"`{example}`")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    rest = groups[max_groups:]
    if rest:
        n = sum(g.count for g in rest)
        lines.append(f"| {n} | {len(rest)} more groups (see the JSON records) | | |")
    return "\n".join(lines)


def _value(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name)


def _record_id(record: Any) -> str:
    return str(record.get("id", "")) if isinstance(record, dict) else record.id


def write_json(records: list[CheckRecord], path: str | Path) -> None:
    """A JSON list of records (``--json``)."""
    Path(path).write_text(json.dumps([r.as_dict() for r in records], indent=1))


def markdown_report(
    records: list[CheckRecord],
    title: str,
    cases: Iterable[Any] = (),
    verbose: bool = False,
    groups: list[FailureGroup] | None = None,
) -> str:
    """A Markdown report of one implementation's records.

    The summary by family and status, the failures grouped by cause and correlated
    with the cases' properties, and (``verbose``) one row per failed check.
    """
    counts = summary_counts(records)
    lines = [f"# {title}", "", "| family | " + " | ".join(STATUSES) + " |"]
    lines.append("|---" * (len(STATUSES) + 1) + "|")
    for family, c in counts.items():
        lines.append(
            f"| {family} | " + " | ".join(str(c.get(s, 0)) for s in STATUSES) + " |"
        )
    grouped = grouped_markdown(records, cases, groups=groups)
    if grouped:
        lines += ["", "## Failures by cause", "", grouped]
    bad = [r for r in records if r.status in ("failed", "error")]
    if bad and verbose:
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
