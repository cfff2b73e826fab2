"""How a case's data set is split over the ranks of a data-parallel run.

:func:`shard`: the data set (all batches, in order) is cut into ``W`` contiguous
shards of *unequal* sizes, roughly proportional to ``1, 2, …, W`` (so an average of
per-rank means with equal weights is wrong), and the largest shard, the last rank's,
is given as two batches (so a rank accumulates over several batches). It needs
``N ≥ W + 1`` data.

:func:`replicate`: every rank gets the whole data set (the data set of the run is then
``W`` copies of it); used to see whether ranks draw the same Monte-Carlo samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfac_oracle.errors import Unsupported

Batches = list[tuple[Tensor, Tensor]]


def shard_sizes(num_data: int, world_size: int) -> list[int]:
    """Sizes ``N_0 < … `` (roughly ``∝ r + 1``), each ``≥ 1``, not all equal.

    Raises:
        Unsupported: For ``num_data < world_size + 1``.
    """
    W = world_size
    if num_data < W + 1:
        raise Unsupported(
            f"the case has {num_data} data, too few for {W} unequal non-empty shards "
            f"(needs at least {W + 1})"
        )
    weights = [r + 1 for r in range(W)]
    total = sum(weights)
    sizes = [max(1, num_data * w // total) for w in weights]
    sizes[-1] += num_data - sum(sizes)
    while sizes[-1] < 1:  # rounding up the small shards took too much
        k = max(range(W - 1), key=lambda r: sizes[r])
        sizes[k] -= 1
        sizes[-1] += 1
    if len(set(sizes)) == 1:
        sizes[0] -= 1
        sizes[-1] += 1
    return sizes


def _concatenated(data: Batches) -> tuple[Tensor, Tensor]:
    return torch.cat([X for X, _ in data]), torch.cat([y for _, y in data])


def shard(data: Batches, world_size: int) -> list[Batches]:
    """Rank ``r``'s batches: contiguous, unequal shards; the last rank has two batches.

    Raises:
        Unsupported: If the data set is too small (:func:`shard_sizes`).
    """
    X, y = _concatenated(data)
    sizes = shard_sizes(len(X), world_size)
    shards: list[Batches] = []
    start = 0
    for r, size in enumerate(sizes):
        Xr, yr = X[start : start + size], y[start : start + size]
        start += size
        if r == world_size - 1 and size >= 2:
            half = size // 2
            shards.append([(Xr[:half], yr[:half]), (Xr[half:], yr[half:])])
        else:
            shards.append([(Xr, yr)])
    return shards


def replicate(data: Batches, world_size: int) -> list[Batches]:
    """Every rank gets the whole data set, in its batches."""
    return [[(X.clone(), y.clone()) for X, y in data] for _ in range(world_size)]


def union(shards: list[Batches]) -> Batches:
    """The data set of the run: every rank's batches, rank by rank."""
    return [batch for batches in shards for batch in batches]


LAYOUTS = {"shards": shard, "replicated": replicate}


__all__ = ["LAYOUTS", "Batches", "replicate", "shard", "shard_sizes", "union"]
