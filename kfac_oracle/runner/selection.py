"""Selecting cases and checks: ids match literally, ``*`` and ``?`` are wildcards.

Check ids contain brackets (``agree_type-2_expand[mlp_tanh_cro_mean-0]``), which shell
patterns would read as a character class, so a printed id would select nothing. Here a
pattern's only wildcards are ``*`` (any text) and ``?`` (one character); brackets and
every other character match themselves. A pattern without ``[`` also matches a check's
bare name (``agree_*`` selects that check in every case); a pattern with ``[`` matches
whole ids only (``agree_*[mlp_tanh_cro_mean-0]`` selects one case and layer).

A selection that matches nothing is a :class:`~kfac_oracle.errors.SelectionError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

from kfac_oracle.errors import SelectionError


def split_patterns(patterns: str | Iterable[str] | None) -> list[str]:
    """Comma-separated patterns (or a list of them), stripped, empty ones dropped."""
    if patterns is None:
        return []
    parts = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    return [p.strip() for p in parts if p and p.strip()]


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def matches(text: str, pattern: str) -> bool:
    """Whether ``text`` matches ``pattern`` (``*``, ``?`` wildcards, else literal)."""
    return _regex(pattern).match(text) is not None


def matches_check(check_id: str, pattern: str) -> bool:
    """Whether a check id matches: whole id, or bare name for patterns without ``[``."""
    if matches(check_id, pattern):
        return True
    return "[" not in pattern and matches(check_id.split("[", 1)[0], pattern)


def select(
    items: Sequence, patterns: str | Iterable[str] | None, what: str = "checks"
) -> list:
    """Items (with an ``id``) matching any pattern; all items when none is given.

    Raises:
        SelectionError: If patterns were given and a pattern — or the selection as a
            whole — matches nothing.
    """
    pats = split_patterns(patterns)
    if not pats:
        return list(items)
    chosen = [it for it in items if any(matches_check(it.id, p) for p in pats)]
    unmatched = [p for p in pats if not any(matches_check(it.id, p) for it in items)]
    if unmatched:
        raise SelectionError(
            f"--{what} {', '.join(map(repr, unmatched))} matches no check of the "
            f"selected cases ({len(items)} checks); check ids look like "
            "'agree_type-2_expand[mlp_tanh_cro_mean-0]', check names like 'agree_*'"
        )
    return chosen


__all__ = ["matches", "matches_check", "select", "split_patterns"]
