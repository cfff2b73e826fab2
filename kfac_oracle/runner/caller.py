"""The candidate caller: one safe, validated, cached call per distinct request.

Each call gets a freshly built copy of the case's model, loss and data (nothing a
candidate does to them can reach another call), runs under the time limit — in a
worker process by default (:mod:`kfac_oracle.runner.isolation`), else in-process
(:mod:`kfac_oracle.runner.limits`) — and its result is copied on receipt and validated
(:mod:`kfac_oracle.runner.validate`). Results and failures are cached per
:class:`RequestKey`, so each distinct request is made once per run. What a call left
behind (hooks, flags, global state) is kept per case for the ``side_effects`` check.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from kfac_oracle.capabilities import Capabilities
from kfac_oracle.catalogue import Case
from kfac_oracle.checks.variants import make_variant
from kfac_oracle.contract import KFACRequest, OperationsRequest
from kfac_oracle.errors import CandidateError, CandidateUnsupported, UsageError
from kfac_oracle.flavours import BiasMode
from kfac_oracle.operators import keep_one_result
from kfac_oracle.problem import Problem
from kfac_oracle.runner import isolation
from kfac_oracle.runner.call import CallReport, guarded_call
from kfac_oracle.runner.limits import can_arm, check_time_limit
from kfac_oracle.runner.validate import (
    CandidateResult,
    layer_shapes,
    validate,
    widened,
)

ISOLATION_MODES = ("auto", "process", "none")
#: Problems kept for reuse by an isolated caller (the most recent ones).
PROBLEMS_KEPT = 4


@dataclass(frozen=True)
class RequestKey:
    """What distinguishes one candidate call from another within a run.

    ``repeat`` > 0 asks the same request again, as an independent call (to check
    that results are reproducible). ``operations`` asks for operations instead of
    curvature (:class:`OperationsKey`).
    """

    case: str
    fisher_type: str
    kfac_approx: str
    mc_samples: int = 1
    seed: int = 0
    variant: str = "base"
    bias: str | None = None
    repeat: int = 0
    operations: OperationsKey | None = None


@dataclass(frozen=True)
class OperationsKey:
    """A request of operations: convention, dampings per layer, operations.

    The probe vectors are fixed by the layers' sizes
    (:func:`kfac_oracle.reference.operations.probe_vectors`).
    """

    convention: str
    damping: tuple[tuple[str, tuple[float, ...]], ...]
    operations: tuple[str, ...]


def build_problem(
    case: Case,
    variant: str = "base",
    dtype: torch.dtype = torch.float64,
    single_batch: bool = False,
) -> Problem:
    """A fresh problem of ``case``, transformed by ``variant``.

    With ``single_batch`` the case's batches are merged into one first (the
    ``--single-batch`` mode; the re-splitting variants still split it again).
    """
    problem = case.build(dtype)
    if single_batch and len(problem.data) > 1:
        X = torch.cat([X for X, _ in problem.data])
        y = torch.cat([y for _, y in problem.data])
        problem = Problem(problem.model, problem.loss_func, [(X, y)])
    return make_variant(problem, variant)


class CandidateCaller:
    """Calls one candidate safely and caches its validated results.

    Args:
        impl: The candidate (``name``, ``capabilities``, ``compute``).
        capabilities: Its validated capabilities.
        time_limit: Seconds per call (``None``: no limit).
        isolation: ``"process"`` (a worker process, hard kill at the limit),
            ``"none"`` (in-process) or ``"auto"`` (process where available).
        dtype: The problems' dtype.
        single_batch: Merge each case's batches into one.

    Raises:
        UsageError: For an invalid time limit or isolation mode.
    """

    def __init__(
        self,
        impl: Any,
        capabilities: Capabilities,
        time_limit: float | None = 60.0,
        isolation: str = "auto",
        dtype: torch.dtype = torch.float64,
        single_batch: bool = False,
    ):
        if isolation not in ISOLATION_MODES:
            raise UsageError(
                f"unknown isolation {isolation!r}; use one of "
                f"{', '.join(ISOLATION_MODES)}"
            )
        self.impl = impl
        self.capabilities = capabilities
        self.time_limit = check_time_limit(time_limit)
        self.dtype = dtype
        self.single_batch = single_batch
        use_process = isolation == "process" or (
            isolation == "auto" and isolation_available()
        )
        self.isolation = "process" if use_process else "none"
        self._worker = isolation_worker(impl) if use_process else None
        self._cache: dict[RequestKey, CandidateResult | CandidateError] = {}
        self._problems: dict[tuple[str, str], Problem] = {}
        self._calls: dict[str, list[tuple[RequestKey, list[str], bool]]] = defaultdict(
            list
        )
        self.notes: list[str] = []
        #: Distinct warnings the candidate raised, with how many calls raised each.
        self.warnings: dict[str, int] = {}
        if self._worker is None and self.time_limit is not None and not can_arm():
            self.notes.append(
                "the time limit cannot be armed here (not the main thread, or no "
                "setitimer): it is checked after each call only, and a candidate that "
                "hangs blocks the run"
            )

    @property
    def name(self) -> str:
        """The candidate's name."""
        return str(getattr(self.impl, "name", type(self.impl).__name__))

    def result(self, case: Case, key: RequestKey) -> CandidateResult:
        """The candidate's validated result for ``key`` (cached, failures too).

        For a case with blocks too large to densify only the latest result is kept
        (:func:`~kfac_oracle.operators.keep_one_result`): its factors can take
        gigabytes, and the matrix-free checks use one request at a time.

        Raises:
            CandidateUnsupported: The candidate raised ``NotImplementedError``.
            CandidateError: It failed otherwise (message names the cause).
        """
        if key not in self._cache:
            if keep_one_result(case):
                self._cache = {
                    k: v
                    for k, v in self._cache.items()
                    if k.case != case.id or isinstance(v, CandidateError)
                }
            self._cache[key] = self._call(case, key)
        result = self._cache[key]
        if isinstance(result, CandidateError):
            raise result
        return result

    def leftovers(self, case_id: str) -> list[tuple[RequestKey, list[str]]]:
        """Side effects left by the calls of one case so far: ``[(key, messages)]``."""
        return [(k, msgs) for k, msgs, _ in self._calls[case_id] if msgs]

    def calls(self, case_id: str) -> int:
        """How many calls were made for a case."""
        return len(self._calls[case_id])

    def returned(self, case_id: str) -> int:
        """How many calls of a case returned a result."""
        return sum(ok for _, _, ok in self._calls[case_id])

    def _problem(self, case: Case, variant: str) -> Problem:
        """The problem a call is made on.

        Built afresh for an in-process candidate (it gets the very objects). A
        worker process gets a pickled copy and never touches the harness's, so with
        isolation the last few problems are kept and reused.
        """
        if self._worker is None:
            return build_problem(case, variant, self.dtype, self.single_batch)
        key = (case.id, variant)
        problem = self._problems.pop(key, None)
        if problem is None:
            problem = build_problem(case, variant, self.dtype, self.single_batch)
        self._problems[key] = problem  # most recent last
        while len(self._problems) > PROBLEMS_KEPT:
            del self._problems[next(iter(self._problems))]
        return problem

    def _call(self, case: Case, key: RequestKey) -> CandidateResult | CandidateError:
        problem = self._problem(case, key.variant)
        layers = tuple(case.layers)
        shapes = layer_shapes(problem.model, layers)
        operations = None
        if key.operations is not None:
            from kfac_oracle.reference.operations import probe_vectors

            operations = OperationsRequest(
                convention=key.operations.convention,
                damping=dict(key.operations.damping),
                vectors=probe_vectors(shapes, problem.dtype, problem.device),
                operations=key.operations.operations,
                bias=key.bias or BiasMode.JOINT.value,
            )
        request = KFACRequest(
            model=problem.model,
            loss_func=problem.loss_func,
            data=list(problem.data),
            fisher_type=key.fisher_type,
            kfac_approx=key.kfac_approx,
            mc_samples=key.mc_samples,
            seed=key.seed,
            layers=layers,
            bias=key.bias,
            info={"case": case.id, "variant": key.variant},
            operations=operations,
        )
        report = self._invoke(request, shapes, problem.dtype, problem.device)
        self._calls[case.id].append((key, report.leftovers, report.plain is not None))
        for warning in report.warnings:
            self.warnings[warning] = self.warnings.get(warning, 0) + 1
        if report.unsupported is not None:
            return CandidateUnsupported(report.unsupported)
        if report.error is not None or report.plain is None:
            return CandidateError(report.error or "no result")
        try:
            result = validate(report.plain, shapes, problem.dtype, problem.device)
        except CandidateError as error:
            return error
        return result if problem.dtype == torch.float64 else widened(result)

    def _invoke(
        self, request: KFACRequest, shapes: Any, dtype: Any, device: Any
    ) -> CallReport:
        if self._worker is None:
            return guarded_call(
                self.impl, request, shapes, dtype, device, self.time_limit
            )
        try:
            return self._worker.call(request, shapes, dtype, device, self.time_limit)
        except isolation.WorkerTimeout as error:
            return CallReport(error=f"timeout: {error}")
        except isolation.WorkerDied as error:
            return CallReport(error=str(error))

    def close(self) -> None:
        """Stop the worker process, if any."""
        if self._worker is not None:
            self._worker.stop()


def isolation_available() -> bool:
    """Whether process isolation is the default here."""
    return isolation.available()


def isolation_worker(impl: Any) -> isolation.Worker:
    """A worker process for ``impl`` (started at its first call)."""
    return isolation.Worker(impl)


__all__ = [
    "ISOLATION_MODES",
    "CandidateCaller",
    "OperationsKey",
    "RequestKey",
    "build_problem",
]
