"""Expected failures: loading, matching and applying them (one implementation).

Expected failures map check-id patterns to reasons, matched like selections
(:mod:`kfac_oracle.runner.selection`): ``"agree_*"`` expects that check to fail in every
case, ``"agree_*[mlp_tanh_cro_mean-0]"`` in that case and layer only, and an id copied
from a report matches itself. They are strict: an expected failure that passes fails
("unexpectedly passed"). An empty reason is allowed everywhere and reads "no reason
given". The command line, the pytest plugin and ``parametrize_with_checks`` all use
:func:`load` and :func:`reason_for`.

Files: a JSON object ``{pattern: reason}``, or a text file with one pattern per line
and an optional reason after ``#`` (blank lines and lines starting with ``#`` are
ignored)::

    agree_*[mlp_tanh_cro_mean-0]   # known scale issue, upstream #12
    mc_*                           # no MC yet
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from kfac_oracle.errors import UsageError
from kfac_oracle.runner.records import CheckRecord
from kfac_oracle.runner.selection import matches_check

NO_REASON = "no reason given"


def load(source: str | Path | Mapping[str, str] | None) -> dict[str, str]:
    """Expected failures from a mapping, a JSON file or a text file.

    Raises:
        UsageError: For a missing or unreadable file, invalid JSON, or anything but a
            mapping of string patterns to string reasons.
    """
    if source is None:
        return {}
    if isinstance(source, Mapping):
        data = dict(source)
        origin = "expected failures"
    else:
        path = Path(source)
        origin = str(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise UsageError(f"cannot read expected failures {path}: {error}") from None
        data = _parse(text, path)
    for pattern, reason in data.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise UsageError(
                f"{origin}: pattern {pattern!r} must be a non-empty string"
            )
        if reason is not None and not isinstance(reason, str):
            raise UsageError(
                f"{origin}: the reason of {pattern!r} must be a string, got "
                f"{type(reason).__name__}"
            )
    return {p.strip(): (r or "") for p, r in data.items()}


def _parse(text: str, path: Path) -> dict[str, str]:
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}: invalid JSON: {error}") from None
        if not isinstance(data, dict):
            raise UsageError(
                f"{path}: expected a JSON object {{pattern: reason}}, got "
                f"{type(data).__name__}"
            )
        return data
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, _, reason = line.partition("#")
        out[pattern.strip()] = reason.strip()
    return out


def reason_for(check_id: str, expected: Mapping[str, str] | None) -> str | None:
    """The reason of the pattern matching ``check_id`` (exact ids first), or None."""
    if not expected:
        return None
    if check_id in expected:
        return expected[check_id] or NO_REASON
    for pattern, reason in expected.items():
        if matches_check(check_id, pattern):
            return reason or NO_REASON
    return None


def apply(record: CheckRecord, expected: Mapping[str, str] | None) -> CheckRecord:
    """Strict expected failures: failed/error → xfailed; passed → failed."""
    reason = reason_for(record.id, expected)
    if reason is None:
        return record
    if record.status in ("failed", "error"):
        record.message = f"expected failure ({reason}): {record.message}"
        record.status = "xfailed"
    elif record.status == "passed":
        record.status = "failed"
        record.message = (
            f"unexpectedly passed; it was expected to fail ({reason}). "
            "Remove the expected failure."
        )
    return record


def apply_documented(record: CheckRecord, documented: Mapping[str, str]) -> CheckRecord:
    """A failure the library documents becomes ``documented``; the rest stays.

    Documented: a further approximation or another convention the library states.
    Errors, passes and every other status are left as they are.
    """
    if record.status != "failed":
        return record
    reason = reason_for(record.id, documented)
    if reason is not None:
        record.status = "documented"
        record.message = f"documented difference ({reason}): {record.message}"
    return record


def warn_unmatched(expected: Mapping[str, str] | None, ids: Iterable[str]) -> list[str]:
    """Warn for patterns that match no check id; return them."""
    ids = list(ids)
    unmatched = [
        p for p in (expected or {}) if not any(matches_check(i, p) for i in ids)
    ]
    for pattern in unmatched:
        warnings.warn(
            f"expected-failure pattern {pattern!r} matches no check", stacklevel=3
        )
    return unmatched


__all__ = ["NO_REASON", "apply", "load", "reason_for", "warn_unmatched"]
