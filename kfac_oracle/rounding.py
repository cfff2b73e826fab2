r"""Tolerances of float32 verdicts, from a measured rounding model.

A candidate that computes in float32 cannot match the float64 reference to the
``1e-10`` of a float64 run, and a tolerance copied from somewhere ("1e-4 is usual")
would either pass real mistakes or fail right implementations, depending on the
case. The tolerance of a float32 verdict is instead *measured* on the case, for the
layer and flavour under check:

    s   = max_r ‖K₃₂⁽ʳ⁾ − K₆₄‖_F / ‖K₆₄‖_F,
    tol = ROUNDING_FACTOR · max(s, FLOOR_UNITS · u),     u = 2⁻²⁴,

where ``K₆₄`` is the reference approximation in float64 and ``K₃₂⁽ʳ⁾`` the same
reference computed in float32 on the same model and data (the catalogue draws
parameters and data in float32, so both runs see the same numbers), with the data
points in ordering ``r`` (:func:`orderings`): as given, reversed, and a seeded
shuffle. Re-ordering changes only the order of the sums, so the spread ``s`` measures
how far float32 arithmetic alone takes *an* implementation of this block; another
implementation sums in another order, with other kernels and, e.g., another
factorisation of the loss Hessian, hence the factor ``ROUNDING_FACTOR``. ``u`` is
float32's unit roundoff; the floor keeps a tolerance from collapsing where the
spread happens to be tiny (e.g. one datum).

What this rests on, measured on the default catalogue (docs/benchmarks.md, "float32
verdicts"): the spread is 1e-7 … 1e-6, so tolerances are 1e-6 … 1e-5, while the
pitfalls the checks exist for move a block by 1e-3 or much more (a factor ``1/N``, a
missing bias term, expand for reduce). Exactness claims in float32 use the
tolerance of the claimed flavour's KFAC (the claim makes KFAC and the exact block
one matrix); the invariances use each layer's tolerance, and the Monte-Carlo checks
keep their statistics (rounding is far below sampling noise) with the zero-variance
claim at the type-2 tolerance. Every record of a float32 run states its tolerance or
is compared at it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from kfac_oracle.problem import Problem

#: The float32 unit roundoff ``u = 2⁻²⁴``.
UNIT_ROUNDOFF = 2.0**-24
#: How far another right implementation may be from the measured spread.
ROUNDING_FACTOR = 10.0
#: The smallest spread assumed, in units of ``u``.
FLOOR_UNITS = 2.0
#: Data orderings the reference is computed in (as given, reversed, shuffled).
ORDERINGS = 3


@dataclass(frozen=True)
class RoundingTolerance:
    """The float32 tolerance of one layer's block and what it rests on.

    Attributes:
        spread: ``s``, the largest relative error of the float32 reference.
        orderings: How many data orderings ``s`` was measured over.
    """

    spread: float
    orderings: int

    @property
    def tolerance(self) -> float:
        """``ROUNDING_FACTOR · max(s, FLOOR_UNITS · u)``."""
        return ROUNDING_FACTOR * max(self.spread, FLOOR_UNITS * UNIT_ROUNDOFF)

    def describe(self) -> str:
        """One clause for a record: the tolerance and its basis."""
        return (
            f"float32 run: tolerance {self.tolerance:.2e} = {ROUNDING_FACTOR:g} × "
            f"max(spread {self.spread:.2e} of the reference computed in float32 over "
            f"{self.orderings} data orderings, {FLOOR_UNITS:g}u)"
        )


def reorder(problem: Problem, ordering: int) -> Problem:
    """The problem with its data points in ``ordering`` (0: as given).

    1: the batches and the data points of each batch reversed; ``r ≥ 2``: each batch
    shuffled with the seed ``r``. Points stay in their batch, so every batch's loss
    (and its reduction) is the same set of terms.
    """
    if ordering == 0:
        return problem
    generator = torch.Generator().manual_seed(ordering)
    data = []
    for X, y in problem.data:
        n = X.shape[0]
        if ordering == 1:
            index = torch.arange(n - 1, -1, -1)
        else:
            index = torch.randperm(n, generator=generator)
        index = index.to(X.device)
        data.append((X[index], y[index]))
    if ordering == 1:
        data.reverse()
    return Problem(problem.model, problem.loss_func, data, check_outputs=False)


def orderings(problem: Problem, count: int = ORDERINGS) -> Iterator[Problem]:
    """The problem in ``count`` data orderings (:func:`reorder`)."""
    for r in range(count):
        yield reorder(problem, r)


def measure(
    problem32: Problem,
    blocks32: Callable[[Problem], Mapping[str, object]],
    distances: Callable[[Mapping[str, object]], dict[str, float]],
    count: int = ORDERINGS,
) -> dict[str, RoundingTolerance]:
    """The tolerance of every layer from ``count`` float32 reference computations.

    Args:
        problem32: The case's problem in float32.
        blocks32: Computes the reference blocks of every layer of a problem.
        distances: Relative distances of float32 blocks to the float64 reference.
        count: Data orderings.
    """
    spread: dict[str, float] = {}
    for problem in orderings(problem32, count):
        for layer, distance in distances(blocks32(problem)).items():
            spread[layer] = max(spread.get(layer, 0.0), distance)
    return {layer: RoundingTolerance(s, count) for layer, s in spread.items()}


__all__ = [
    "FLOOR_UNITS",
    "ORDERINGS",
    "ROUNDING_FACTOR",
    "UNIT_ROUNDOFF",
    "RoundingTolerance",
    "measure",
    "orderings",
    "reorder",
]
