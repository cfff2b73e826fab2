"""The references a run compares with, computed once per run and cached.

Exact blocks (GGN, empirical Fisher, ...) per case, layer and variant
(:func:`kfac_oracle.reference.exact.curvature_block`), and the reference blocks of the
candidate's approximation per flavour (:mod:`kfac_oracle.reference.approximations`),
with the layers where that approximation has no unique answer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfac_oracle import statistics
from kfac_oracle.catalogue import Case
from kfac_oracle.flavours import Flavour
from kfac_oracle.operators import exact_or_dense, keep_one_result
from kfac_oracle.problem import Problem
from kfac_oracle.reference.approximations import Approximation
from kfac_oracle.reference.mc_draws import reference_draws
from kfac_oracle.runner.caller import build_problem
from kfac_oracle.statistics import NullModel


class ReferenceCache:
    """Exact and reference blocks of one run, computed on first use.

    Args:
        approximation: The approximation the candidate computes.
        dtype: The problems' dtype.
    """

    def __init__(
        self,
        approximation: Approximation,
        dtype: torch.dtype = torch.float64,
        single_batch: bool = False,
    ):
        self.approximation = approximation
        self.dtype = dtype
        self.single_batch = single_batch
        self._problems: dict[tuple[str, str], Problem] = {}
        self._exact: dict[tuple[str, str, str, str], Tensor] = {}
        self._blocks: dict[tuple[str, Flavour, str], dict[str, Tensor]] = {}
        self._ambiguous: dict[tuple[str, Flavour, str], set[str]] = {}
        self._nulls: dict[tuple[str, str, str], dict[str, dict[int, NullModel]]] = {}

    def problem(self, case: Case, variant: str = "base") -> Problem:
        """The case's problem under ``variant`` (shared: do not modify it)."""
        key = (case.id, variant)
        if key not in self._problems:
            self._problems[key] = build_problem(
                case, variant, self.dtype, self.single_batch
            )
        return self._problems[key]

    def exact_block(
        self, case: Case, layer: str, kind: str, variant: str = "base"
    ) -> Any:
        """The exact block ``kind`` (``"ggn"``, ``"empirical"``, ...) of ``layer``.

        A tensor, or an :class:`~kfac_oracle.operators.ExactOperator` for a block too
        large to densify.
        """
        key = (case.id, layer, kind, variant)
        if key not in self._exact:
            self._exact[key] = exact_or_dense(self.problem(case, variant), layer, kind)
        return self._exact[key]

    def blocks(
        self, case: Case, flavour: Flavour, variant: str = "base"
    ) -> dict[str, Tensor]:
        """The approximation's reference blocks of every layer of the case."""
        key = (case.id, flavour, variant)
        if key not in self._blocks:
            if keep_one_result(case):  # large factors: one flavour at a time
                self._blocks = {
                    k: v for k, v in self._blocks.items() if k[0] != case.id
                }
            problem = self.problem(case, variant)
            self._blocks[key] = self.approximation.blocks(problem, flavour, case.layers)
        return self._blocks[key]

    def kfac_blocks(
        self, case: Case, flavour: Flavour, variant: str = "base"
    ) -> dict[str, Tensor]:
        """Reference KFAC blocks, whatever the candidate's approximation."""
        from kfac_oracle.reference.approximations import approximation

        kfac = approximation("kfac")
        key = (case.id, flavour, f"kfac:{variant}")
        if key not in self._blocks:
            self._blocks[key] = kfac.blocks(
                self.problem(case, variant), flavour, case.layers
            )
        return self._blocks[key]

    def mc_nulls(
        self, case: Case, kfac_approx: str, bias: str
    ) -> dict[str, dict[int, NullModel]]:
        """What a correct MC-KFAC looks like: ``{layer: {M: NullModel}}``.

        From :data:`~kfac_oracle.statistics.REFERENCE_DRAWS` draws of the reference
        MC-KFAC at every ``M`` of the plan (seeds disjoint from a candidate's), around
        the reference type-2 KFAC block (:mod:`kfac_oracle.statistics`).
        """
        key = (case.id, str(kfac_approx), str(bias))
        if key not in self._nulls:
            problem = self.problem(case)
            mean = self.kfac_blocks(case, Flavour("type-2", kfac_approx, bias))
            nulls: dict[str, dict[int, NullModel]] = {
                layer: {} for layer in case.layers
            }
            for M, _ in statistics.PLAN:
                flavour = Flavour(
                    "mc", kfac_approx, bias, M, statistics.REFERENCE_SEED_OFFSET
                )
                draws = reference_draws(
                    problem, flavour, statistics.REFERENCE_DRAWS, case.layers
                )
                for layer in case.layers:
                    nulls[layer][M] = statistics.null_model(
                        draws[layer], mean[layer], M
                    )
            self._nulls[key] = nulls
        return self._nulls[key]

    def ambiguous(
        self, case: Case, flavour: Flavour, variant: str = "base"
    ) -> set[str]:
        """Layers where the approximation is not unique (nothing to compare with)."""
        key = (case.id, flavour, variant)
        if key not in self._ambiguous:
            problem = self.problem(case, variant)
            self._ambiguous[key] = self.approximation.ambiguous(
                problem, flavour, case.layers
            )
        return self._ambiguous[key]


__all__ = ["ReferenceCache"]
