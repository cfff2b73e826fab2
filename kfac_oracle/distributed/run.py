"""Running the distributed checks against one implementation (``--world-size W``).

One :class:`DistributedSession` per run: the candidate's process group of ``W`` ranks
is started at the first call and serves every case (process start and rendezvous are
paid once, or again only after a failed call), the reference blocks are cached as in a
single-process run. Every check item becomes a
:class:`~kfac_oracle.runner.records.CheckRecord` of the family ``distributed``; a
rank that crashes, hangs or raises is an ``error`` record of the checks that needed
that call, and the run goes on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kfac_oracle.catalogue import Case
from kfac_oracle.distributed.caller import DistributedCaller
from kfac_oracle.distributed.checks import FAMILY, DistContext, DistItem, items
from kfac_oracle.errors import (
    CandidateError,
    CandidateUnsupported,
    SelectionError,
    Unsupported,
    UsageError,
)
from kfac_oracle.implementations import Resolved, resolve
from kfac_oracle.reference.approximations import approximation
from kfac_oracle.runner import expected as expected_failures_
from kfac_oracle.runner.records import CheckRecord
from kfac_oracle.runner.references import ReferenceCache
from kfac_oracle.runner.run import (
    DEFAULT_TIME_LIMIT,
    Progress,
    reproduce_command,
    resolve_cases,
    run_items,
)
from kfac_oracle.runner.selection import select

#: The most ranks a run may ask for.
MAX_WORLD_SIZE = 16


def check_world_size(world_size: int) -> int:
    """``W`` of ``--world-size``: an integer in ``[2, 16]``.

    Raises:
        UsageError: Otherwise.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise UsageError(f"--world-size must be an integer, got {world_size!r}")
    if not 2 <= world_size <= MAX_WORLD_SIZE:
        raise UsageError(
            f"--world-size must be between 2 and {MAX_WORLD_SIZE}, got {world_size}"
        )
    return world_size


@dataclass
class DistributedSession:
    """Everything the distributed checks of one run share."""

    resolved: Resolved
    caller: DistributedCaller
    references: ReferenceCache
    case_files: Sequence[str] = ()

    @classmethod
    def start(
        cls,
        impl: Any,
        world_size: int,
        time_limit: float | None = DEFAULT_TIME_LIMIT,
        case_files: Sequence[str] = (),
        dtype: torch.dtype = torch.float64,
    ) -> DistributedSession:
        """Resolve ``impl``; the process group starts at the first call."""
        check_world_size(world_size)
        resolved = impl if isinstance(impl, Resolved) else resolve(impl)
        caller = DistributedCaller(
            resolved.impl, resolved.capabilities, world_size, time_limit, dtype
        )
        references = ReferenceCache(
            approximation(resolved.capabilities.approximation_name), dtype
        )
        return cls(resolved, caller, references, list(case_files))

    @property
    def name(self) -> str:
        """The implementation's display name."""
        return self.resolved.name

    @property
    def world_size(self) -> int:
        """``W``."""
        return self.caller.world_size

    def close(self) -> None:
        """Stop the rank processes."""
        self.caller.close()

    def reproduce(self, item: DistItem) -> str:
        """A command that re-runs one check."""
        return reproduce_command(
            self.resolved.spec,
            item,
            self.case_files,
            self.caller.time_limit,
            ["--world-size", str(self.world_size)],
        )


def run_item(item: DistItem, session: DistributedSession) -> CheckRecord:
    """Run one distributed check; never raises (errors become records)."""
    start = time.perf_counter()
    record = CheckRecord(
        check=item.check,
        case=item.case.id,
        layer=item.layer,
        family=FAMILY,
        status="error",
        implementation=session.name,
    )
    ctx = DistContext(item.case, item.layer, session.caller, session.references)
    try:
        dtype = session.caller.capabilities.compute_dtype()
        if dtype != torch.float64:
            raise Unsupported(
                f"the candidate computes in {str(dtype).removeprefix('torch.')}; the "
                "distributed checks' verdicts are defined for float64 only"
            )
        outcome = item.function(ctx, **item.params)
        record.status, record.error = outcome.status, outcome.error
        record.tolerance, record.message = outcome.tolerance, outcome.message
        if outcome.status == "failed":
            record.blocks = outcome.blocks
            record.diagnosis = outcome.diagnosis
    except (Unsupported, CandidateUnsupported) as error:
        record.status, record.message = "unsupported", str(error)
    except CandidateError as error:
        record.status, record.message = "error", str(error)
    except Exception as error:  # noqa: BLE001 - a harness bug must not end the run
        record.message = f"harness error: {error!r}\n{traceback.format_exc()}"
    record.seconds = time.perf_counter() - start
    return record


def select_items(
    cases: Sequence[Case], checks: str | Iterable[str] | None = None
) -> list[DistItem]:
    """The distributed check items of ``cases``, narrowed to ``checks`` patterns.

    Raises:
        SelectionError: If patterns match no distributed check.
    """
    out = [item for case in cases for item in items(case)]
    if not out:
        raise SelectionError("the selected cases have no distributed checks")
    return select(out, checks)


def run(
    impl: Any,
    world_size: int,
    cases: Sequence[Case] | str | None = None,
    checks: str | Iterable[str] | None = None,
    expected_failures: Mapping[str, str] | str | Path | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    progress: Progress | None = None,
    session: DistributedSession | None = None,
    case_files: Sequence[str] = (),
    stream: str | Path | None = None,
) -> list[CheckRecord]:
    """Run the distributed checks on ``world_size`` ranks; never raises for a candidate.

    Arguments as :func:`kfac_oracle.runner.run.run`; ``session`` reuses a
    :class:`DistributedSession` (its process group and caches).

    Raises:
        UsageError: For an invalid implementation, world size, cases or selection.
    """
    case_list = resolve_cases(cases, case_files)
    selected = select_items(case_list, checks)
    expected = expected_failures_.load(expected_failures)
    expected_failures_.warn_unmatched(expected, [it.id for it in selected])
    own = session is None
    session = session or DistributedSession.start(
        impl, world_size, time_limit, case_files
    )
    return run_items(
        selected,
        session,
        run_item,
        expected,
        progress=progress,
        stream=stream,
        own=own,
    )


__all__ = [
    "MAX_WORLD_SIZE",
    "DistributedSession",
    "check_world_size",
    "run",
    "run_item",
    "select_items",
]
