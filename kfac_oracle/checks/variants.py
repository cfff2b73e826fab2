"""Transformations of a problem under which KFAC behaves predictably (theory §6).

- ``split``: the same data re-split into batches of other, unequal sizes → same KFAC;
- ``shuffle``: the data points permuted (and re-split) → same KFAC;
- ``sum``: reduction ``"sum"`` instead of ``"mean"`` → KFAC scaled by ``1/R``;
- ``perturbed``: parameters moved → KFAC at the new parameters (no stale state);
- ``repeat``: the same problem again (a second, independent call);
- ``flatten``: a trailing ``Flatten`` on an ``(N, S, C)`` output for MSE/BCE → same
  KFAC (the loss does not see the output's shape).
"""

from __future__ import annotations

import copy

import torch

from kfac_oracle.problem import Problem

VARIANTS = ("base", "repeat", "split", "shuffle", "sum", "perturbed", "flatten")


def resplit(
    X: torch.Tensor, y: torch.Tensor, sizes: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the given sizes from concatenated data."""
    data, start = [], 0
    for size in sizes:
        data.append((X[start : start + size], y[start : start + size]))
        start += size
    return data


def other_split(N: int) -> list[int]:
    """Unequal batch sizes different from the catalogue's: ``[1, 2, ..., rest]``."""
    if N == 1:
        return [1]
    sizes: list[int] = []
    k = 1
    while sum(sizes) + k < N:
        sizes.append(k)
        k += 1
    sizes.append(N - sum(sizes))
    return sizes[::-1]


def make_variant(problem: Problem, variant: str) -> Problem:
    """Apply ``variant`` (one of :data:`VARIANTS`) to a problem."""
    if variant in ("base", "repeat"):
        return problem
    X = torch.cat([X for X, _ in problem.data])
    y = torch.cat([y for _, y in problem.data])
    N = X.shape[0]
    if variant == "split":
        return Problem(problem.model, problem.loss_func, resplit(X, y, other_split(N)))
    if variant == "shuffle":
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(123))
        sizes = [len(b[0]) for b in problem.data][::-1]
        return Problem(
            problem.model, problem.loss_func, resplit(X[perm], y[perm], sizes)
        )
    if variant == "sum":
        loss_func = type(problem.loss_func)(reduction="sum")
        return Problem(problem.model, loss_func, problem.data)
    if variant == "perturbed":
        model = copy.deepcopy(problem.model)
        generator = torch.Generator().manual_seed(321)
        with torch.no_grad():
            for p in model.parameters():
                # drawn in float32, as the catalogue's parameters: the same move
                # in every precision a candidate is run in
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                p.add_(0.5 * noise.to(dtype=p.dtype, device=p.device))
        return Problem(model, problem.loss_func, problem.data)
    if variant == "flatten":
        if isinstance(problem.model, torch.nn.Sequential):
            model = torch.nn.Sequential(
                *list(problem.model.children()), torch.nn.Flatten()
            )
        else:  # any module: flatten its output in a hook (module names unchanged)
            model = copy.deepcopy(problem.model)
            model.register_forward_hook(_flatten_output)
        data = [(Xb, yb.flatten(1)) for Xb, yb in problem.data]
        return Problem(model, problem.loss_func, data)
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")


def _flatten_output(
    module: torch.nn.Module, args: tuple, output: torch.Tensor
) -> torch.Tensor:
    """Forward hook: ``output.flatten(1)``."""
    return output.flatten(1)
