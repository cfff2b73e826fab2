"""Running the conformance checks against one implementation.

:func:`run` resolves the implementation, collects the check items of the selected
cases, and runs each against one :class:`Session` (the candidate caller and the
reference cache), applying expected failures. A check never raises because of the
candidate: every item becomes a :class:`~kfac_oracle.runner.records.CheckRecord`.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kfac_oracle.catalogue import Case, load_cases
from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.registry import CheckItem, collect, family_names
from kfac_oracle.errors import (
    CandidateError,
    CandidateUnsupported,
    SelectionError,
    Unsupported,
)
from kfac_oracle.implementations import Resolved, resolve
from kfac_oracle.operators import dense_only_reason
from kfac_oracle.reference.approximations import approximation
from kfac_oracle.runner import expected as expected_failures_
from kfac_oracle.runner.caller import CandidateCaller
from kfac_oracle.runner.records import CheckRecord
from kfac_oracle.runner.references import ReferenceCache
from kfac_oracle.runner.selection import select

DEFAULT_TIME_LIMIT = 60.0


@dataclass
class Session:
    """Everything the checks of one run share.

    Attributes:
        resolved: The implementation under test.
        caller: Calls it (isolated, time-limited, validated, cached).
        references: Exact and reference blocks (cached).
        spec: How reproduce lines name the implementation.
        case_files: Case files given besides the built-in catalogue.
    """

    resolved: Resolved
    caller: CandidateCaller
    references: ReferenceCache
    case_files: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        impl: Any,
        time_limit: float | None = DEFAULT_TIME_LIMIT,
        isolation: str = "auto",
        case_files: Sequence[str] = (),
        dtype: str | None = None,
        single_batch: bool = False,
    ) -> Session:
        """Resolve ``impl`` and set up its caller and references.

        The candidate gets models and data in ``dtype`` (``"float64"`` or
        ``"float32"``; by default what its capabilities declare:
        :meth:`~kfac_oracle.capabilities.Capabilities.compute_dtype`); references
        are float64 always.

        With ``single_batch`` each case's batches are merged into one (an optimizer
        keeping per-step state gets a verdict on its mathematics apart from its
        accumulation; the batching invariances still test the accumulation).
        """
        resolved = impl if isinstance(impl, Resolved) else resolve(impl)
        caller = CandidateCaller(
            resolved.impl,
            resolved.capabilities,
            time_limit,
            isolation,
            resolved.capabilities.compute_dtype(dtype),
            single_batch,
        )
        references = ReferenceCache(
            approximation(resolved.capabilities.approximation_name),
            torch.float64,
            single_batch,
        )
        return cls(resolved, caller, references, list(case_files))

    @property
    def name(self) -> str:
        """The implementation's display name."""
        return self.resolved.name

    def close(self) -> None:
        """Release the candidate's worker process."""
        self.caller.close()

    def reproduce(self, item: CheckItem) -> str:
        """A command that re-runs one check."""
        options = ["--single-batch"] if self.caller.single_batch else []
        dtype = self.caller.dtype
        if dtype != self.resolved.capabilities.compute_dtype():
            options += ["--dtype", str(dtype).removeprefix("torch.")]
        return reproduce_command(
            self.resolved.spec,
            item,
            self.case_files,
            self.caller.time_limit,
            options,
        )


def reproduce_command(
    spec: str | None,
    item: Any,
    case_files: Sequence[str],
    time_limit: float | None,
    options: Sequence[str] = (),
) -> str:
    """``kfac-oracle check SPEC [OPTIONS] --cases CASE ... --checks ID``, shell-quoted.

    The time limit appears when it is not the default; ``KFAC_ORACLE_CASES`` is
    carried over as a prefix when set.
    """
    parts = ["kfac-oracle", "check", spec or "MODULE:ATTR", *options]
    parts += ["--cases", item.case.id]
    for path in case_files:
        parts += ["--case-file", path]
    parts += ["--checks", item.id]
    if time_limit != DEFAULT_TIME_LIMIT:
        parts += ["--time-limit", "none" if time_limit is None else f"{time_limit:g}"]
    env = os.environ.get("KFAC_ORACLE_CASES")
    prefix = f"KFAC_ORACLE_CASES={shlex.quote(env)} " if env else ""
    return prefix + " ".join(shlex.quote(p) for p in parts)


def unsupported_reason(item: CheckItem, ctx: CheckContext) -> str | None:
    """Why the candidate cannot run this check (by declarations alone), or None."""
    target = item.target
    reason = ctx.excludes(target.fisher_type, target.kfac_approx)
    if reason:
        return reason
    if target.fisher_type is not None and not ctx.approximation.supports(
        target.fisher_type
    ):
        return ctx.approximation.unsupported_reason(target.fisher_type)
    if ctx.caller.dtype != torch.float64 and not item.spec.float32:
        return (
            f"the candidate computes in {str(ctx.caller.dtype).removeprefix('torch.')}"
            "; this check's verdict is defined for float64 only (float32 verdicts: "
            "agreement, exactness, mc, invariance, robustness)"
        )
    if not item.spec.matrix_free:
        reason = dense_only_reason(item.case, item.layer)
        if reason:
            return reason
    for key, values in item.spec.needs.items():
        allowed = ctx.capabilities.allowed(key)
        if allowed is None or not values <= allowed:
            declared = "not declared" if allowed is None else f"{sorted(allowed)}"
            return (
                f"the check needs capabilities[{key!r}] to declare {sorted(values)}; "
                f"{declared}"
            )
    return None


def run_item(item: CheckItem, session: Session) -> CheckRecord:
    """Run one check; never raises (errors become records)."""
    start = time.perf_counter()
    record = CheckRecord(
        check=item.check,
        case=item.case.id,
        layer=item.layer,
        family=item.family,
        status="error",
        implementation=session.name,
    )
    ctx = CheckContext(item.case, item.layer, session.caller, session.references)
    try:
        reason = unsupported_reason(item, ctx)
        if reason:
            raise Unsupported(reason)
        arguments = item.target.arguments()
        outcome = item.spec.function(ctx, **arguments)
        record.status, record.error = outcome.status, outcome.error
        record.tolerance, record.message = outcome.tolerance, outcome.message
        if outcome.status == "failed":
            record.blocks = outcome.blocks
            record.diagnosis = outcome.diagnosis
            if record.diagnosis is None and item.spec.diagnose is not None:
                try:
                    record.diagnosis = item.spec.diagnose(ctx, outcome, **arguments)
                except CandidateError as error:
                    record.diagnosis = f"no diagnosis: {error}"
                except Exception as error:  # noqa: BLE001 - never break a run
                    record.diagnosis = f"diagnosis failed: {error!r}"
    except (Unsupported, CandidateUnsupported) as error:
        record.status, record.message = "unsupported", str(error)
    except CandidateError as error:
        record.status, record.message = "error", str(error)
        record.diagnosis = _diagnose_error(str(error))
    except Exception as error:  # noqa: BLE001 - a harness bug must not end the run
        record.status = "error"
        record.message = f"harness error: {error!r}\n{traceback.format_exc()}"
    record.seconds = time.perf_counter() - start
    return record


def _diagnose_error(message: str) -> str | None:
    if "factors swapped" in message:
        return "Kronecker factors swapped (A and G exchanged)"
    return None


def select_items(
    cases: Iterable[Case],
    checks: str | Iterable[str] | None = None,
    families: str | Iterable[str] | None = None,
) -> list[CheckItem]:
    """The check items of ``cases``, narrowed to ``families`` and ``checks`` patterns.

    Raises:
        SelectionError: For an unknown family, or patterns that match no check.
    """
    if isinstance(families, str):
        families = [f.strip() for f in families.split(",") if f.strip()]
    if families is not None:
        families = list(families)
        known = family_names()
        unknown = [f for f in families if f not in known]
        if unknown:
            raise SelectionError(
                f"unknown check families {unknown}; known: {', '.join(known)}"
            )
    items = collect(cases, families)
    if not items:
        raise SelectionError("the selected cases and families have no checks")
    return select(items, checks)


def resolve_cases(
    cases: Sequence[Case] | str | None, case_files: Sequence[str] = ()
) -> list[Case]:
    """Cases from a list, or the catalogue filtered by a pattern.

    Raises:
        SelectionError: If a pattern matches no case.
    """
    if cases is not None and not isinstance(cases, str):
        out = list(cases)
    else:
        out = load_cases(cases, list(case_files))
    if not out:
        raise SelectionError(f"no case matches {cases!r}")
    return out


Progress = Callable[[int, int, CheckRecord], None]


def run(
    impl: Any,
    cases: Sequence[Case] | str | None = None,
    checks: str | Iterable[str] | None = None,
    families: str | Iterable[str] | None = None,
    expected_failures: Mapping[str, str] | str | Path | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    progress: Progress | None = None,
    session: Session | None = None,
    isolation: str = "auto",
    case_files: Sequence[str] = (),
    stream: str | Path | None = None,
    single_batch: bool = False,
    dtype: str | None = None,
) -> list[CheckRecord]:
    """Run the conformance suite; never raises because of the candidate.

    Args:
        impl: A candidate (class, factory or instance), a built-in name or
            ``module:attr``.
        cases: Cases, or a pattern on case ids/families (default: all).
        checks: Patterns on check names or ids (:mod:`kfac_oracle.runner.selection`).
        families: Restrict to these check families.
        expected_failures: ``{pattern: reason}`` or a file; strict.
        time_limit: Seconds per candidate call (``None``: no limit).
        progress: Called after each check with ``(done, total, record)``.
        session: Reuse a session (and its caches); ``impl`` is then ignored.
        isolation: ``"auto"``, ``"process"`` or ``"none"``
            (:class:`~kfac_oracle.runner.caller.CandidateCaller`).
        case_files: Case files besides the built-in catalogue.
        stream: Append each record as a JSON line to this file as soon as it is
            done (a run that is killed leaves what it checked).
        single_batch: Merge each case's batches into one.
        dtype: ``"float64"`` or ``"float32"``: the precision the candidate is run
            in (default: :meth:`~kfac_oracle.capabilities.Capabilities.compute_dtype`
            of its capabilities).

    Returns:
        One record per check item.

    Raises:
        UsageError: For an implementation, capabilities, cases or a selection that
            are invalid (never for what the candidate does).
    """
    case_list = resolve_cases(cases, case_files)
    items = select_items(case_list, checks, families)
    expected = expected_failures_.load(expected_failures)
    expected_failures_.warn_unmatched(expected, [it.id for it in items])
    own = session is None
    session = session or Session.start(
        impl, time_limit, isolation, case_files, dtype=dtype, single_batch=single_batch
    )
    return run_items(
        items, session, run_item, expected, progress=progress, stream=stream, own=own
    )


def run_items(
    items: list[Any],
    session: Any,
    run_one: Callable[[Any, Any], CheckRecord],
    expected: Any,
    progress: Progress | None = None,
    stream: str | Path | None = None,
    own: bool = False,
) -> list[CheckRecord]:
    """Run ``items`` in order with ``run_one(item, session)``; the shared loop.

    Each record gets the library's documented differences and the expected failures
    applied and its reproduce line; it is appended to ``stream`` (JSON lines) as soon
    as it exists, so that a killed run leaves what it checked. ``own``: close the
    session at the end.
    """
    records = []
    sink = open(stream, "a") if stream is not None else None  # noqa: SIM115
    try:
        for k, item in enumerate(items):
            record = run_one(item, session)
            record = expected_failures_.apply_documented(
                record, session.resolved.documented
            )
            record = expected_failures_.apply(record, expected)
            record.reproduce = session.reproduce(item)
            records.append(record)
            if sink is not None:
                sink.write(json.dumps(record.as_dict()) + "\n")
                sink.flush()
            if progress:
                progress(k + 1, len(items), record)
    finally:
        if sink is not None:
            sink.close()
        if own:
            session.close()
    return records


__all__ = [
    "DEFAULT_TIME_LIMIT",
    "Session",
    "resolve_cases",
    "run",
    "run_item",
    "reproduce_command",
    "run_items",
    "select_items",
    "unsupported_reason",
]
