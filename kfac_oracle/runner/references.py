"""The references a run compares with, computed once per run and cached.

Exact blocks (GGN, empirical Fisher, ...) per case, layer and variant
(:func:`kfac_oracle.reference.exact.curvature_block`), and the reference blocks of the
candidate's approximation per flavour (:mod:`kfac_oracle.reference.approximations`),
with the layers where that approximation has no unique answer.

Within a run they are kept in memory; across runs, processes and implementations in
the disk cache (:mod:`kfac_oracle.runner.diskcache`), keyed by the problem's content
(:func:`~kfac_oracle.runner.diskcache.problem_fingerprint`), what is computed, and
the environment. A cached value is the computed value, bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from kfac_oracle import rounding, statistics
from kfac_oracle.catalogue import Case
from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.flavours import Flavour
from kfac_oracle.operators import (
    exact_or_dense,
    keep_one_result,
    layer_sizes,
    too_large,
)
from kfac_oracle.problem import Problem
from kfac_oracle.reference.approximations import Approximation
from kfac_oracle.reference.kfac import KFACSteps
from kfac_oracle.reference.mc_draws import reference_draw_factors, reference_draws
from kfac_oracle.rounding import RoundingTolerance
from kfac_oracle.runner import diskcache
from kfac_oracle.runner.caller import build_problem
from kfac_oracle.statistics import NullModel

T = TypeVar("T")


def _nulls_to_disk(nulls: dict[str, dict[int, NullModel]]) -> dict:
    return {
        layer: {M: dataclasses.asdict(null) for M, null in by_m.items()}
        for layer, by_m in nulls.items()
    }


def _nulls_from_disk(raw: dict) -> dict[str, dict[int, NullModel]]:
    return {
        str(layer): {int(M): NullModel(**null) for M, null in by_m.items()}
        for layer, by_m in raw.items()
    }


class ReferenceCache:
    """Exact and reference blocks of one run, computed on first use.

    Args:
        approximation: The approximation the candidate computes.
        dtype: The problems' dtype.
        single_batch: Merge each case's batches into one.
        disk: The disk cache; by default :func:`~kfac_oracle.runner.diskcache.
            default_cache` (``None`` when disabled), ``False`` for none.
    """

    def __init__(
        self,
        approximation: Approximation,
        dtype: torch.dtype = torch.float64,
        single_batch: bool = False,
        disk: diskcache.DiskCache | None | bool = True,
    ):
        self.approximation = approximation
        self.dtype = dtype
        self.single_batch = single_batch
        if disk is True:
            disk = diskcache.default_cache()
        self.disk: diskcache.DiskCache | None = disk or None
        self._fingerprints: dict[tuple[str, str], str] = {}
        self._problems: dict[tuple[str, str], Problem] = {}
        self._exact: dict[tuple[str, str, str, str], Tensor] = {}
        self._blocks: dict[tuple[str, Flavour, str], dict[str, Tensor]] = {}
        self._ambiguous: dict[tuple[str, Flavour, str], set[str]] = {}
        self._factors: dict[tuple[str, Flavour, str], dict[str, KroneckerFactors]] = {}
        self._nulls: dict[tuple[str, str, str], dict[str, dict[int, NullModel]]] = {}
        self._rounding: dict[tuple[str, Flavour, str], dict[str, RoundingTolerance]]
        self._rounding = {}

    def problem(self, case: Case, variant: str = "base") -> Problem:
        """The case's problem under ``variant`` (shared: do not modify it)."""
        key = (case.id, variant)
        if key not in self._problems:
            self._problems[key] = build_problem(
                case, variant, self.dtype, self.single_batch
            )
        return self._problems[key]

    def fingerprint(self, case: Case, variant: str = "base") -> str:
        """The content hash of the case's problem under ``variant``.

        A variant is a seeded, deterministic transformation of the base problem
        (:mod:`kfac_oracle.checks.variants`, covered by the source fingerprint), so
        its hash is that of the base problem and the variant's name: a warm run
        builds no variant problem.
        """
        key = (case.id, variant)
        if key not in self._fingerprints:
            if variant == "base":
                definition = {"case": case.as_dict()}
                extra = (case.model, self.dtype, self.single_batch)
                self._fingerprints[key] = diskcache.problem_fingerprint(
                    self.problem(case), definition, extra
                )
            else:
                base = self.fingerprint(case)
                self._fingerprints[key] = diskcache.digest(
                    {"base": base, "variant": variant}
                )
        return self._fingerprints[key]

    def _cached(
        self,
        what: str,
        case: Case,
        variant: str,
        detail: dict[str, Any],
        compute: Callable[[], T],
        to_disk: Callable[[T], Any] = lambda v: v,
        from_disk: Callable[[Any], T] = lambda v: v,
    ) -> T:
        """``compute()`` through the disk cache (if any) under a content key."""
        if self.disk is None:
            return compute()
        key = {
            "what": what,
            "problem": self.fingerprint(case, variant),
            "dtype": str(self.dtype),
            **detail,
            "environment": diskcache.environment(),
        }
        return self.disk.get(key, compute, to_disk, from_disk)

    def exact_block(
        self, case: Case, layer: str, kind: str, variant: str = "base"
    ) -> Any:
        """The exact block ``kind`` (``"ggn"``, ``"empirical"``, ...) of ``layer``.

        A tensor, or an :class:`~kfac_oracle.operators.ExactOperator` for a block too
        large to densify.
        """
        key = (case.id, layer, kind, variant)
        if key not in self._exact:

            def compute_exact() -> Any:
                return exact_or_dense(self.problem(case, variant), layer, kind)

            if keep_one_result(case):  # matrix-free operators: not cached on disk
                self._exact[key] = compute_exact()
            else:
                self._exact[key] = self._cached(
                    "exact_block",
                    case,
                    variant,
                    {"layer": layer, "kind": kind},
                    compute_exact,
                )
        return self._exact[key]

    def blocks(
        self, case: Case, flavour: Flavour, variant: str = "base"
    ) -> dict[str, Tensor]:
        """The approximation's reference blocks of every layer of the case."""
        key = (case.id, flavour, variant)
        if key not in self._blocks:
            approx = self.approximation
            if keep_one_result(case):  # large factors: one flavour at a time, in memory
                self._blocks = {
                    k: v for k, v in self._blocks.items() if k[0] != case.id
                }
                problem = self.problem(case, variant)
                self._blocks[key] = approx.blocks(problem, flavour, case.layers)
            else:
                self._blocks[key] = self._cached(
                    "blocks",
                    case,
                    variant,
                    _detail(approx.name, flavour, case.layers),
                    lambda: approx.blocks(
                        self.problem(case, variant), flavour, case.layers
                    ),
                )
        return self._blocks[key]

    def factors(
        self, case: Case, flavour: Flavour, variant: str = "base"
    ) -> dict[str, KroneckerFactors]:
        """Reference KFAC factors of every layer (what factor damping acts on)."""
        key = (case.id, flavour, variant)
        if key not in self._factors:
            self._factors[key] = KFACSteps().factors(
                self.problem(case, variant), flavour, case.layers
            )
        return self._factors[key]

    def kfac_blocks(
        self, case: Case, flavour: Flavour, variant: str = "base"
    ) -> dict[str, Tensor]:
        """Reference KFAC blocks, whatever the candidate's approximation."""
        from kfac_oracle.reference.approximations import approximation

        kfac = approximation("kfac")
        key = (case.id, flavour, f"kfac:{variant}")
        if key not in self._blocks and keep_one_result(case):  # operators: in memory
            self._blocks[key] = kfac.blocks(
                self.problem(case, variant), flavour, case.layers
            )
        if key not in self._blocks:
            self._blocks[key] = self._cached(
                "blocks",
                case,
                variant,
                _detail(kfac.name, flavour, case.layers),
                lambda: kfac.blocks(self.problem(case, variant), flavour, case.layers),
            )
        return self._blocks[key]

    def mc_nulls(
        self, case: Case, kfac_approx: str, bias: str
    ) -> dict[str, dict[int, NullModel]]:
        """What a correct MC-KFAC looks like: ``{layer: {M: NullModel}}``.

        From :data:`~kfac_oracle.statistics.REFERENCE_DRAWS` draws of the reference
        MC-KFAC at every ``M`` of the plan (seeds disjoint from a candidate's), around
        the reference type-2 KFAC block (:mod:`kfac_oracle.statistics`). Layers too
        large to densify get their null models from the draws' Kronecker factors
        (:func:`~kfac_oracle.statistics.kronecker_null_model`), only where a claim
        asks for MC convergence, and are kept in memory only.
        """
        key = (case.id, str(kfac_approx), str(bias))
        if key not in self._nulls and keep_one_result(case):
            self._nulls[key] = self._compute_nulls(case, kfac_approx, bias)
        if key not in self._nulls:
            detail = {
                "kfac_approx": str(kfac_approx),
                "bias": str(bias),
                "layers": list(case.layers),
                "plan": [list(map(int, p)) for p in statistics.PLAN],
                "draws": statistics.REFERENCE_DRAWS,
                "seed_offset": statistics.REFERENCE_SEED_OFFSET,
            }
            self._nulls[key] = self._cached(
                "mc_nulls",
                case,
                "base",
                detail,
                lambda: self._compute_nulls(case, kfac_approx, bias),
                _nulls_to_disk,
                _nulls_from_disk,
            )
        return self._nulls[key]

    def _compute_nulls(
        self, case: Case, kfac_approx: str, bias: str
    ) -> dict[str, dict[int, NullModel]]:
        """The null models of :meth:`mc_nulls`, computed."""
        problem = self.problem(case)
        mean = self.kfac_blocks(case, Flavour("type-2", kfac_approx, bias))
        sizes = layer_sizes(case)
        dense = [layer for layer in case.layers if not too_large(sizes[layer])]
        large = [
            layer
            for layer in case.layers
            if too_large(sizes[layer])
            and any(c.statement == "mc_convergence" for c in case.claims_for(layer))
        ]
        nulls: dict[str, dict[int, NullModel]] = {
            layer: {} for layer in case.layers if layer in dense or layer in large
        }
        for M, _ in statistics.PLAN:
            flavour = Flavour(
                "mc", kfac_approx, bias, M, statistics.REFERENCE_SEED_OFFSET
            )
            if dense:
                draws = reference_draws(
                    problem, flavour, statistics.REFERENCE_DRAWS, dense
                )
                for layer in dense:
                    nulls[layer][M] = statistics.null_model(
                        draws[layer], mean[layer], M
                    )
            if large:
                for d in reference_draw_factors(
                    problem, flavour, statistics.REFERENCE_DRAWS, large
                ):
                    B: Any = mean[d.layer]
                    nulls[d.layer][M] = statistics.kronecker_null_model(
                        d.gradient_covariances, d.input_covariance, B, M
                    )
                    del d  # one layer's draws at a time
        return nulls

    def rounding(self, case: Case, flavour: Flavour) -> dict[str, RoundingTolerance]:
        """The float32 tolerance of every layer's block (:mod:`kfac_oracle.rounding`).

        The reference approximation of ``flavour`` computed in float32 in
        :data:`~kfac_oracle.rounding.ORDERINGS` data orderings, against the float64
        reference blocks of this cache.
        """
        key = (case.id, flavour, "rounding")
        if key not in self._rounding:
            self._rounding[key] = self._cached(
                "rounding",
                case,
                "base",
                {
                    **_detail(self.approximation.name, flavour, case.layers),
                    "orderings": rounding.ORDERINGS,
                },
                lambda: self._measure_rounding(case, flavour),
                lambda tols: {k: [t.spread, t.orderings] for k, t in tols.items()},
                lambda raw: {
                    str(k): RoundingTolerance(float(s), int(n))
                    for k, (s, n) in raw.items()
                },
            )
        return self._rounding[key]

    def _measure_rounding(
        self, case: Case, flavour: Flavour
    ) -> dict[str, RoundingTolerance]:
        from kfac_oracle.checks.compare import block_distance

        approx = self.approximation
        reference = self.blocks(case, flavour)
        problem32 = build_problem(case, "base", torch.float32, self.single_batch)
        model = self.problem(case).model

        def distances(blocks32: Mapping[str, Any]) -> dict[str, float]:
            return {
                layer: block_distance(
                    block,
                    reference[layer],
                    str(flavour.bias),
                    model.get_submodule(layer),
                )
                for layer, block in blocks32.items()
            }

        return rounding.measure(
            problem32,
            lambda problem: approx.blocks(problem, flavour, case.layers),
            distances,
        )

    def ambiguous(
        self, case: Case, flavour: Flavour, variant: str = "base"
    ) -> set[str]:
        """Layers where the approximation is not unique (nothing to compare with)."""
        key = (case.id, flavour, variant)
        if key not in self._ambiguous:
            approx = self.approximation
            self._ambiguous[key] = self._cached(
                "ambiguous",
                case,
                variant,
                _detail(approx.name, flavour, case.layers),
                lambda: approx.ambiguous(
                    self.problem(case, variant), flavour, case.layers
                ),
                sorted,
                set,
            )
        return self._ambiguous[key]


def _detail(approximation: str, flavour: Flavour, layers: list[str]) -> dict[str, Any]:
    return {
        "approximation": approximation,
        "flavour": {f.name: str(getattr(flavour, f.name)) for f in _fields(flavour)},
        "layers": list(layers),
    }


def _fields(flavour: Flavour) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(flavour)


__all__ = ["ReferenceCache"]
