"""Data-parallel pitfalls: the reference KFAC with its distributed step broken.

Each mutant is :class:`~kfac_oracle.reference.candidate.ReferenceKFAC` whose
``distributed_steps_class`` breaks one step of
:class:`~kfac_oracle.distributed.reference.DataParallelSteps`; the tests run them at
``W = 2`` and ``3`` and require the named diagnosis.
"""

from __future__ import annotations

import os
import time

import torch.distributed as dist

from kfac_oracle.distributed.reference import DataParallelSteps
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.reference.exact import mc_labels
from kfac_oracle.reference.kfac import KFACSteps


def distributed_mutant(steps_cls, name: str, diagnosis: str, checks: str):
    """A ReferenceKFAC whose distributed steps are ``steps_cls``."""
    return type(
        name,
        (ReferenceKFAC,),
        {
            "name": name,
            "distributed_steps_class": steps_cls,
            "expected_diagnosis": diagnosis,
            "checks": checks,
        },
    )


class _LocalThenReduced(KFACSteps):
    """Each rank normalises its own factors, then the factors are all-reduced."""

    average = False

    def factors(self, problem, flavour=None, layers=None, **fields):
        out = super().factors(problem, flavour, layers, **fields)
        W = dist.get_world_size()
        for f in out.values():
            for name in ("input_covariance", "gradient_covariance"):
                t = getattr(f, name).clone()
                dist.all_reduce(t)
                setattr(f, name, t / W if self.average else t)
        return out


class _MeanThenSum(_LocalThenReduced):
    average = False


class _EqualWeightAverage(_LocalThenReduced):
    average = True


class _GNotReduced(DataParallelSteps):
    """Only the first set of sums (A's) is all-reduced."""

    def __init__(self):
        super().__init__()
        self._calls = 0

    def total(self, sums):
        self._calls += 1
        return super().total(sums) if self._calls == 1 else sums


class _Rank0Only(DataParallelSteps):
    """Sums reduced to rank 0 only (no broadcast): other ranks keep their own."""

    def total(self, sums):
        out = {}
        for name, value in sums.items():
            t = value.detach().clone()
            dist.reduce(t, dst=0)
            out[name] = t if dist.get_rank() == 0 else value
        return out


class _SameLabels(DataParallelSteps):
    """Every rank seeds its sampler with the request's seed alone."""

    def labels(self, problem, mc_samples, seed):
        return mc_labels(problem, mc_samples, seed)


class _SeedIgnored(DataParallelSteps):
    """Every request samples with seed 0 (the ranks' streams still differ)."""

    def labels(self, problem, mc_samples, seed):
        return super().labels(problem, mc_samples, 0)


AGREE = "dist_agree_*,dist_ranks_agree_*"

DISTRIBUTED_MUTANTS = [
    distributed_mutant(_MeanThenSum, "mean-then-sum", "mean-then-SUM", AGREE),
    distributed_mutant(
        _EqualWeightAverage,
        "equal-weight-average",
        "equal-weight average of per-rank means",
        AGREE,
    ),
    distributed_mutant(
        _GNotReduced,
        "g-not-reduced",
        "G (gradient covariance) not all-reduced",
        AGREE,
    ),
    distributed_mutant(_Rank0Only, "rank0-only", "rank 0's factors only", AGREE),
    distributed_mutant(
        KFACSteps,
        "not-reduced",
        "factors not all-reduced: every rank returned the factors of its own shard",
        "dist_ranks_agree_*",
    ),
    distributed_mutant(
        _SameLabels,
        "same-mc-labels",
        "every rank sampled the same MC labels",
        "dist_mc_independent_*",
    ),
    distributed_mutant(
        _SeedIgnored, "seed-ignored", "the seed is ignored", "dist_mc_reproducible_*"
    ),
]


class MisbehavingRank(ReferenceKFAC):
    """The reference, except that rank 1 misbehaves on the case ``bad_case``.

    ``how``: ``"exit"`` (``os._exit(3)`` after starting a child process that would
    outlive it), ``"raise"`` or ``"hang"``.
    """

    name = "misbehaving-rank"
    bad_case = ""
    how = "exit"
    child_pid_file = ""

    def compute(self, request):
        if request.rank == 1 and request.info.get("case") == self.bad_case:
            if self.how == "exit":
                import subprocess

                child = subprocess.Popen(["sleep", "300"])
                if self.child_pid_file:
                    with open(self.child_pid_file, "w") as f:
                        f.write(str(child.pid))
                os._exit(3)
            if self.how == "raise":
                raise RuntimeError("rank 1 fails")
            time.sleep(600)
        return super().compute(request)


class Rank1ReseedsTorch(ReferenceKFAC):
    """Rank 1 reseeds torch's global generator after computing (a side effect)."""

    name = "rank1-reseeds"

    def compute(self, request):
        out = super().compute(request)
        if request.rank == 1:
            import torch

            torch.manual_seed(1234)
        return out


class SingleProcessOnly(ReferenceKFAC):
    """Declares nothing about distribution (the single-process capabilities)."""

    name = "single-process-only"
    capabilities = {
        k: v for k, v in ReferenceKFAC.capabilities.items() if k != "distributed"
    }


__all__ = [
    "DISTRIBUTED_MUTANTS",
    "MisbehavingRank",
    "Rank1ReseedsTorch",
    "SingleProcessOnly",
]
