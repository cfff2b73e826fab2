"""Calling a candidate on every rank: one request per rank, every rank's result.

For a case, a request key (:class:`~kfac_oracle.runner.caller.RequestKey`) and a data
layout (:data:`~kfac_oracle.distributed.shards.LAYOUTS`), every rank gets a fresh copy
of the case's model and loss and its own shard, in a
:class:`~kfac_oracle.contract.KFACRequest` carrying ``rank`` and ``world_size``; the
group runs them (:class:`~kfac_oracle.distributed.group.RankGroup`). Each rank's result
is validated as in a single-process run (:mod:`kfac_oracle.runner.validate`). Results
and failures are cached per ``(case, key, layout)``: each distinct request is made once
per run.
"""

from __future__ import annotations

from typing import Any

import torch

from kfac_oracle.capabilities import Capabilities
from kfac_oracle.catalogue import Case
from kfac_oracle.contract import KFACRequest
from kfac_oracle.distributed.group import GroupError, RankGroup
from kfac_oracle.distributed.shards import LAYOUTS, Batches
from kfac_oracle.errors import CandidateError, CandidateUnsupported
from kfac_oracle.runner.caller import CandidateCaller, RequestKey, build_problem
from kfac_oracle.runner.validate import CandidateResult, layer_shapes, validate

RankResults = list[CandidateResult]


class DistributedCaller:
    """Calls one candidate on ``W`` ranks; caches every rank's validated result.

    Args:
        impl: The candidate.
        capabilities: Its validated capabilities.
        world_size: ``W >= 2``.
        time_limit: Seconds per call for the whole group (``None``: none).
        dtype: The problems' dtype.
    """

    def __init__(
        self,
        impl: Any,
        capabilities: Capabilities,
        world_size: int,
        time_limit: float | None = 60.0,
        dtype: torch.dtype = torch.float64,
    ):
        self.impl = impl
        self.capabilities = capabilities
        self.world_size = world_size
        self.time_limit = time_limit
        self.dtype = dtype
        self.group = RankGroup(impl, world_size, time_limit)
        self._single: CandidateCaller | None = None
        #: Notes on the run (none so far; as :class:`CandidateCaller`).
        self.notes: list[str] = []
        #: Distinct warnings the candidate raised, with how many rank calls raised each.
        self.warnings: dict[str, int] = {}
        self._cache: dict[tuple[str, RequestKey, str], RankResults | Exception] = {}
        #: Per case: every rank call's ``(rank, what it left behind)``.
        self.calls: dict[str, list[tuple[int, list[str]]]] = {}

    def shards(self, case: Case, layout: str = "shards") -> list[Batches]:
        """Every rank's batches of ``case`` under ``layout``.

        Raises:
            Unsupported: If the case has too few data for the layout.
        """
        problem = build_problem(case, "base", self.dtype)
        return LAYOUTS[layout](problem.data, self.world_size)

    def results(
        self, case: Case, key: RequestKey, layout: str = "shards"
    ) -> RankResults:
        """Every rank's validated result, rank by rank (cached, failures too).

        Raises:
            Unsupported: The case cannot be laid out over ``W`` ranks.
            CandidateUnsupported: A rank raised ``NotImplementedError``.
            CandidateError: A rank failed (the message names the rank and why).
        """
        cache_key = (case.id, key, layout)
        if cache_key not in self._cache:
            self._cache[cache_key] = self._call(case, key, layout)
        out = self._cache[cache_key]
        if isinstance(out, Exception):
            raise out
        return out

    def single(self, case: Case, key: RequestKey) -> CandidateResult:
        """The candidate's result in one process (``world_size = 1``), isolated."""
        if self._single is None:
            self._single = CandidateCaller(
                self.impl, self.capabilities, self.time_limit, "auto", self.dtype
            )
        return self._single.result(case, key)

    def _call(
        self, case: Case, key: RequestKey, layout: str
    ) -> RankResults | Exception:
        shards = self.shards(case, layout)
        requests = []
        for rank, batches in enumerate(shards):
            problem = build_problem(case, "base", self.dtype)
            layers = tuple(case.layers)
            shapes = layer_shapes(problem.model, layers)
            request = KFACRequest(
                model=problem.model,
                loss_func=problem.loss_func,
                data=batches,
                fisher_type=key.fisher_type,
                kfac_approx=key.kfac_approx,
                mc_samples=key.mc_samples,
                seed=key.seed,
                layers=layers,
                bias=key.bias,
                info={"case": case.id, "layout": layout},
                rank=rank,
                world_size=self.world_size,
            )
            requests.append((request, shapes, problem.dtype, problem.device))
        try:
            reports = self.group.call(requests)
        except GroupError as error:
            return CandidateError(f"the process group did not start: {error}")
        calls = self.calls.setdefault(case.id, [])
        for rank, report in enumerate(reports):
            calls.append((rank, report.leftovers))
            for warning in report.warnings:
                self.warnings[warning] = self.warnings.get(warning, 0) + 1
        unsupported = [
            f"rank {r}: {rep.unsupported}"
            for r, rep in enumerate(reports)
            if rep.unsupported is not None
        ]
        errors = [
            f"rank {r}: {rep.error or 'no result'}"
            for r, rep in enumerate(reports)
            if rep.unsupported is None and (rep.error or rep.plain is None)
        ]
        if errors:
            return CandidateError("; ".join(errors + unsupported))
        if unsupported:
            return CandidateUnsupported("; ".join(unsupported))
        results = []
        for r, (report, (_, shape, dtype, device)) in enumerate(
            zip(reports, requests, strict=True)
        ):
            assert report.plain is not None
            try:
                results.append(validate(report.plain, shape, dtype, device))
            except CandidateError as error:
                return CandidateError(f"rank {r}: {error}")
        return results

    def close(self) -> None:
        """Stop the rank processes and the single-process worker."""
        self.group.stop()
        if self._single is not None:
            self._single.close()


__all__ = ["DistributedCaller", "RankResults"]
