"""The reference KFAC in data-parallel form: local sums, all-reduced, then normalised.

Every rank holds a shard ``D_r`` of the data set (``N = Σ_r N_r`` data). The factors of
docs/theory.md §4 are sums over data (and positions) divided by a global count, so
each rank accumulates its *sums* over its own shard,

    ``ΣA_r = Σ_{n ∈ D_r} Σ_s ã ãᵀ``,  ``ΣG_r = Σ_{n ∈ D_r} Σ_{s,v} g gᵀ``,

``all_reduce(SUM)`` adds them over the ranks, and only then are they normalised with
the *global* counts: ``A = (Σ_r ΣA_r) / (N·S)`` (reduce: ``/ N``) and ``G`` carries
``R`` of the whole data set (``R = 1/(N·T)`` for the mean reduction; ``N`` itself is an
all-reduced count). Every rank ends with the same factors, equal to the single-process
reference over the whole data set up to the order of the floating-point additions.

Monte-Carlo labels: rank ``r`` draws from the generator seeded ``seed + r·2²⁰``, so
the ranks' samples are independent (a single process draws rank 0's stream; torch's
CPU generator keeps only the low 32 bits of a seed, so the stride must stay below
2³²).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfac_oracle.problem import Problem, reduction_factor
from kfac_oracle.reference.exact import mc_labels
from kfac_oracle.reference.kfac import KFACSteps

#: Rank ``r`` seeds its MC generator with ``seed + r · RANK_SEED_STRIDE``.
RANK_SEED_STRIDE = 2**20


class DataParallelSteps(KFACSteps):
    """The reference's steps over a ``torch.distributed`` process group.

    Needs an initialised default process group; collectives are issued in the same
    order on every rank (layers in request order).
    """

    def __init__(self) -> None:
        self._num_data: int | None = None

    @staticmethod
    def rank() -> int:
        """This process's rank."""
        import torch.distributed as dist

        return dist.get_rank()

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """``Σ_r tensor_r`` (a copy; the argument is left alone)."""
        import torch.distributed as dist

        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def total(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every rank's sums added: ``Σ_r ΣA_r`` (and likewise for ``G``)."""
        return {name: self.all_reduce(value) for name, value in sums.items()}

    def num_data(self, problem: Problem) -> int:
        """``N = Σ_r N_r`` (one all-reduce, then cached)."""
        if self._num_data is None:
            count = torch.tensor([problem.num_data], dtype=torch.int64)
            self._num_data = int(self.all_reduce(count).item())
        return self._num_data

    def reduction_factor(self, problem: Problem) -> float:
        """``R`` of the whole data set: ``1/(N·T)`` for mean with the global ``N``."""
        return reduction_factor(
            problem.reduction, self.num_data(problem), problem.loss_terms_per_datum
        )

    def labels(self, problem: Problem, mc_samples: int, seed: int) -> list[Tensor]:
        """Labels from this rank's own stream, ``seed + rank · 2²⁰``."""
        return mc_labels(problem, mc_samples, seed + self.rank() * RANK_SEED_STRIDE)


__all__ = ["RANK_SEED_STRIDE", "DataParallelSteps"]
