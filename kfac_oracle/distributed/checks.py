"""The distributed checks: a candidate's data-parallel results against the reference.

Each check is a plain function ``check(ctx, **params) -> Outcome`` of a
:class:`DistContext`; :func:`items` lists them per case. They run only in the
distributed mode (``--world-size W``), so the single-process catalogue of check ids is
unchanged. The data layout is :func:`~kfac_oracle.distributed.shards.shard` (unequal
shards, the last rank with two batches) unless a check says otherwise.

- ``dist_agree_{fisher_type}_{approx}[case-layer]``: *every* rank's block equals the
  single-process reference over the whole data set (relative Frobenius 1e-10,
  float64), for every deterministic fisher type and approximation.
- ``dist_ranks_agree_{fisher_type}_{approx}[case]``: every rank returns the same
  blocks as rank 0 (1e-10).
- ``dist_mc_independent_{approx}[case]``: ranks do not reuse one another's MC
  samples. Every rank gets the *whole* data set ``D`` (``shards.replicate``; the
  run's data set is ``W`` copies of ``D``) with ``M = 1`` and seed 0.
  If every rank drew the labels the candidate draws in one process with seed 0, the
  distributed ``G`` would be a multiple of the single-process ``G`` on ``D``:
  ``Σ_r (·) = W·(·)``. The check fails when the distributed block is proportional to
  the single-process block (relative residual 1e-10). A correct candidate fails only if
  two ranks draw identical labels for all of ``D``, of probability
  ``≤ Π_{n,s} Σ_c p_{nsc}²`` (CE; BCE per output, ``p² + (1−p)²``; 0 for MSE): the
  check is unsupported where this exceeds 1e-6, or where ``D`` has repeated inputs.
  It cannot see ranks that share a stream other than the single-process one; the
  convergence check below sees their spread only if the shards' labels correlate.
- ``dist_mc_reproducible_{approx}[case]``: over all ranks, seed 0 asked twice gives
  the same blocks on every rank and seed 1 another result (``M = 1``; unless sampling
  has no variance in the case).
- ``dist_mc_converges_{approx}[case-layer]``: over all ranks, MC-KFAC with ``K = 16``
  seeds at ``M = 1`` and ``100`` has the distribution of the reference's MC-KFAC over
  the whole data set (independent labels per datum, whichever rank holds it): the
  statistical verdict of :mod:`kfac_oracle.statistics` (scale, Frobenius and spread
  tests; false-alarm probability ≤ 1e-6), on cases with an ``mc_convergence`` claim.
- ``dist_side_effects[case]`` (last): no rank's call on the case left hooks, flags or
  global state changed (:mod:`kfac_oracle.runner.sideeffects`, as ``side_effects``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kfac_oracle import statistics as st
from kfac_oracle.catalogue import Case
from kfac_oracle.checks.agreement import approximations
from kfac_oracle.checks.compare import EXACT_RTOL, compare_blocks, rel_error
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.checks.registry import check_id
from kfac_oracle.diagnosis import fit_scalar
from kfac_oracle.distributed.caller import DistributedCaller, RankResults
from kfac_oracle.distributed.diagnose import (
    diagnose_rank,
    diagnose_ranks,
    reference_bias,
)
from kfac_oracle.errors import Unsupported
from kfac_oracle.flavours import FisherType, Flavour, deterministic_fisher_types
from kfac_oracle.problem import Problem
from kfac_oracle.runner.caller import RequestKey
from kfac_oracle.runner.references import ReferenceCache

FAMILY = "distributed"
#: ``(M, K)`` of the distributed convergence check.
MC_PLAN: tuple[tuple[int, int], ...] = ((1, 16), (100, 16))
#: Largest probability of identical labels on two ranks for the independence check.
COLLISION_BOUND = 1e-6


@dataclass
class DistContext:
    """The environment of one distributed check."""

    case: Case
    layer: str | None
    caller: DistributedCaller
    references: ReferenceCache

    def key(
        self, fisher_type: str, kfac_approx: str, mc_samples: int = 1, seed: int = 0
    ) -> RequestKey:
        """The request key of this case for a flavour."""
        return RequestKey(
            self.case.id, str(fisher_type), str(kfac_approx), mc_samples, seed
        )

    def results(self, key: RequestKey, layout: str = "shards") -> RankResults:
        """Every rank's validated result."""
        return self.caller.results(self.case, key, layout)

    def default_approx(self) -> str:
        """The approximation matching the case's weight sharing (expand without)."""
        return "reduce" if self.case.setting == "reduce" else "expand"

    def problem(self) -> Problem:
        """The case's problem (shared: do not modify it)."""
        return self.references.problem(self.case)

    def require(self, fisher_type: str, kfac_approx: str) -> None:
        """Raise :class:`Unsupported` unless the candidate declares this request."""
        caps = self.caller.capabilities
        allowed = caps.allowed("distributed")
        if allowed is None or "data-parallel" not in allowed:
            raise Unsupported(
                "capabilities['distributed'] does not declare 'data-parallel' "
                "(declare it if compute() works under torch.distributed)"
            )
        case = self.case
        reason = caps.excludes(
            loss=case.loss,
            reduction=case.reduction,
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            layers=case.layer_kinds,
            output_ndim=case.output_ndim,
        )
        if reason:
            raise Unsupported(reason)
        approximation = self.references.approximation
        if not approximation.supports(fisher_type):
            raise Unsupported(approximation.unsupported_reason(fisher_type))


CheckFunction = Callable[..., Outcome]


@dataclass(frozen=True)
class DistItem:
    """One distributed check on one case (and layer)."""

    check: str
    case: Case
    layer: str | None
    function: CheckFunction
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """Always ``"distributed"``."""
        return FAMILY

    @property
    def id(self) -> str:
        """``check[case-layer]`` (or ``check[case]``)."""
        return check_id(self.check, self.case.id, self.layer)


def dist_agree(ctx: DistContext, *, fisher_type: str, kfac_approx: str) -> Outcome:
    """Every rank's block equals the single-process reference over the whole data."""
    assert ctx.layer is not None
    ctx.require(fisher_type, kfac_approx)
    results = ctx.results(ctx.key(fisher_type, kfac_approx))
    module = ctx.problem().model.get_submodule(ctx.layer)
    outcomes = []
    for result in results:
        mode = result.bias[ctx.layer]
        flavour = Flavour(fisher_type, kfac_approx, reference_bias(mode))
        reference = ctx.references.blocks(ctx.case, flavour)[ctx.layer]
        outcomes.append(
            compare_blocks(result.blocks[ctx.layer], reference, mode, module, "")
        )
    failed = [r for r, o in enumerate(outcomes) if not o.passed]
    worst = max(range(len(outcomes)), key=lambda r: outcomes[r].error or 0.0)
    what = f"layer {ctx.layer}, {fisher_type}, {kfac_approx}, every rank vs reference"
    detail = outcomes[worst].message.removeprefix(": ")
    if not failed:
        return Outcome(
            "passed",
            outcomes[worst].error,
            EXACT_RTOL,
            f"{what}: {len(outcomes)} ranks, worst rank {worst}: {detail}",
        )
    per_rank = {}
    problem, shards = ctx.problem(), ctx.caller.shards(ctx.case)
    for r in failed:
        mode = results[r].bias[ctx.layer]
        flavour = Flavour(fisher_type, kfac_approx, reference_bias(mode))
        blocks = outcomes[r].blocks
        try:
            per_rank[r] = diagnose_rank(
                results[r].blocks[ctx.layer],
                problem,
                shards,
                flavour,
                ctx.layer,
                r,
                EXACT_RTOL,
                None if blocks is None else blocks[1],
            )
        except Exception as error:  # noqa: BLE001 - never break a run
            per_rank[r] = f"diagnosis failed: {error!r}"
    passed = [r for r in range(len(outcomes)) if r not in failed]
    return Outcome(
        "failed",
        outcomes[worst].error,
        EXACT_RTOL,
        f"{what}: rank(s) {', '.join(map(str, failed))} of {len(outcomes)} differ; "
        f"worst rank {worst}: {detail}",
        blocks=outcomes[worst].blocks,
        diagnosis=diagnose_ranks(per_rank, passed),
    )


def dist_ranks_agree(
    ctx: DistContext, *, fisher_type: str, kfac_approx: str
) -> Outcome:
    """Every rank returns the same blocks as rank 0, for every layer."""
    ctx.require(fisher_type, kfac_approx)
    results = ctx.results(ctx.key(fisher_type, kfac_approx))
    worst, where = 0.0, ""
    differ = set()
    for r, result in enumerate(results[1:], start=1):
        for layer in ctx.case.layers:
            first, this = results[0].blocks[layer], result.blocks[layer]
            if (
                results[0].bias[layer] != result.bias[layer]
                or first.shape != this.shape
            ):
                err = float("inf")
            else:
                err = rel_error(this, first)
            if err > EXACT_RTOL:
                differ.add(r)
            if err >= worst:
                worst, where = err, f"rank {r}, layer {layer}"
    what = f"{fisher_type}, {kfac_approx}: {len(results)} ranks vs rank 0"
    if not differ:
        return Outcome("passed", worst, EXACT_RTOL, f"{what}: largest {worst:.3e}")
    diagnosis = None
    ranks = ", ".join(map(str, sorted(differ)))
    if _local(ctx, results, fisher_type, kfac_approx, differ, rank0_reduced=True):
        diagnosis = (
            f"rank 0's factors only: rank 0 holds the all-reduced factors, rank(s) "
            f"{ranks} returned their own shard's (reduced to rank 0 without a "
            "broadcast?)"
        )
    elif _local(ctx, results, fisher_type, kfac_approx, set(range(len(results)))):
        diagnosis = (
            "factors not all-reduced: every rank returned the factors of its own shard"
        )
    return Outcome(
        "failed",
        worst,
        EXACT_RTOL,
        f"{what}: rank(s) {', '.join(map(str, sorted(differ)))} differ from rank 0; "
        f"largest relative difference {worst:.3e} ({where})",
        diagnosis=diagnosis,
    )


def _local(
    ctx: DistContext,
    results: RankResults,
    fisher_type: str,
    kfac_approx: str,
    ranks: set[int],
    rank0_reduced: bool = False,
) -> bool:
    """Whether ``ranks`` returned their own shard's factors (up to a constant).

    With ``rank0_reduced``, rank 0 must also equal the reference (*rank 0's factors
    only*).
    """
    problem, shards = ctx.problem(), ctx.caller.shards(ctx.case)
    for layer in ctx.case.layers:
        mode = results[0].bias[layer]
        flavour = Flavour(fisher_type, kfac_approx, reference_bias(mode))
        reference = ctx.references.blocks(ctx.case, flavour)[layer]
        module = problem.model.get_submodule(layer)
        if (
            rank0_reduced
            and not compare_blocks(
                results[0].blocks[layer], reference, mode, module, ""
            ).passed
        ):
            return False
        for r in ranks:
            why = diagnose_rank(
                results[r].blocks[layer], problem, shards, flavour, layer, r, EXACT_RTOL
            )
            if "not all-reduced: rank" not in why:
                return False
    return True


def collision_probability(problem: Problem) -> float:
    """``P`` that two independent MC draws (``M = 1``) give the same labels everywhere.

    ``Π Σ_c p_c²`` over data and positions (CE), ``Π (p² + (1 − p)²)`` over output
    entries (BCE), 0 for MSE (continuous labels).
    """
    if problem.loss_name == "MSELoss":
        return 0.0
    log_p = 0.0
    with torch.no_grad():
        for X, _ in problem.data:
            f = problem.model(X)
            if problem.loss_name == "CrossEntropyLoss":
                p = f.movedim(1, -1).softmax(-1)
                same = (p * p).sum(-1)
            else:
                p = f.sigmoid()
                same = p * p + (1 - p) ** 2
            log_p += float(same.clamp_min(1e-300).log().sum())
    return float(torch.tensor(log_p).exp())


def dist_mc_independent(ctx: DistContext, *, kfac_approx: str) -> Outcome:
    """Ranks do not reuse one another's MC samples (identical shards, M = 1)."""
    ctx.require(str(FisherType.MC), kfac_approx)
    problem = ctx.problem()
    X = torch.cat([X for X, _ in problem.data]).reshape(problem.num_data, -1)
    if len(torch.unique(X, dim=0)) < len(X):
        raise Unsupported("the case has repeated inputs: label sets may coincide")
    collision = collision_probability(problem)
    if collision > COLLISION_BOUND:
        raise Unsupported(
            f"two ranks draw the same labels with probability {collision:.2e} > "
            f"{COLLISION_BOUND:g}: the predictive distribution is nearly deterministic"
        )
    key = ctx.key(str(FisherType.MC), kfac_approx, 1, 0)
    results = ctx.results(key, layout="replicated")
    single = ctx.caller.single(ctx.case, key)
    proportional = {}
    for layer in ctx.case.layers:
        c = fit_scalar(results[0].blocks[layer], single.blocks[layer], EXACT_RTOL)
        if c is not None:
            proportional[layer] = c
    what = (
        f"MC ({kfac_approx}, M = 1, seed 0) with the whole data set on each of "
        f"{len(results)} ranks vs one process"
    )
    if len(proportional) < len(ctx.case.layers):
        return Outcome(
            "passed",
            None,
            EXACT_RTOL,
            f"{what}: not proportional (P(identical labels) <= {collision:.1e})",
        )
    scales = ", ".join(f"{c:.6g}" for c in proportional.values())
    return Outcome(
        "failed",
        None,
        EXACT_RTOL,
        f"{what}: every layer's block is a multiple ({scales}) of the one-process "
        "block with the same seed, as if every rank drew the same labels",
        diagnosis=(
            "every rank sampled the same MC labels: the ranks' random streams are "
            "not distinct (seed the sampler with the rank too)"
        ),
    )


def dist_mc_reproducible(ctx: DistContext, *, kfac_approx: str) -> Outcome:
    """MC over all ranks is reproducible by seed, and another seed differs.

    ``M = 1``: seed 0 asked twice gives the same blocks on every rank (1e-10); seed 1
    differs from seed 0 (relative difference > 1e-10) unless sampling has no variance
    in the case (the reference's draws do not vary).
    """
    ctx.require(str(FisherType.MC), kfac_approx)
    mc = str(FisherType.MC)
    first = ctx.results(ctx.key(mc, kfac_approx, 1, 0))
    again = ctx.caller.results(
        ctx.case, RequestKey(ctx.case.id, mc, kfac_approx, 1, 0, repeat=1)
    )
    other = ctx.results(ctx.key(mc, kfac_approx, 1, 1))
    layers = ctx.case.layers
    repeat = max(
        rel_error(b.blocks[layer], a.blocks[layer])
        for a, b in zip(first, again, strict=True)
        for layer in layers
    )
    change = max(
        rel_error(other[0].blocks[lay], first[0].blocks[lay]) for lay in layers
    )
    bias = reference_bias(first[0].bias[layers[0]])
    nulls = ctx.references.mc_nulls(ctx.case, kfac_approx, bias)
    random = not all(nulls[layer][1].zero_spread for layer in layers)
    what = f"MC ({kfac_approx}, M = 1) over {len(first)} ranks"
    detail = (
        f"seed 0 twice: largest relative difference {repeat:.3e}; seed 1 vs seed 0: "
        f"{change:.3e}"
    )
    if repeat > EXACT_RTOL:
        return Outcome(
            "failed",
            repeat,
            EXACT_RTOL,
            f"{what}: not reproducible; {detail}",
            diagnosis="MC results not reproducible by seed (a sampler not seeded "
            "from the request on some rank)",
        )
    if random and change <= EXACT_RTOL:
        return Outcome(
            "failed",
            change,
            EXACT_RTOL,
            f"{what}: another seed gives the same result; {detail}",
            diagnosis="the seed is ignored on every rank (the ranks' samplers do not "
            "depend on the request's seed)",
        )
    return Outcome("passed", repeat, EXACT_RTOL, f"{what}: {detail}")


def dist_mc_converges(ctx: DistContext, *, kfac_approx: str) -> Outcome:
    """Over all ranks, MC-KFAC is distributed as the reference's over the whole data."""
    assert ctx.layer is not None
    ctx.require(str(FisherType.MC), kfac_approx)
    if not ctx.references.approximation.mc_convergence:
        raise Unsupported("MC convergence is defined for KFAC only")
    blocks, bias = {}, None
    for M, K in MC_PLAN:
        runs = [
            ctx.results(ctx.key(str(FisherType.MC), kfac_approx, M, seed))
            for seed in st.candidate_seeds(K)
        ]
        bias = bias or runs[0][0].bias[ctx.layer]
        blocks[M] = torch.stack([r[0].blocks[ctx.layer] for r in runs])
    assert bias is not None
    nulls = ctx.references.mc_nulls(ctx.case, kfac_approx, reference_bias(bias))
    layer_nulls = {M: nulls[ctx.layer][M] for M, _ in MC_PLAN}
    verdict = st.mc_verdict(blocks, layer_nulls)
    failed = verdict.failures
    diagnosis = None
    if failed:
        names = {t.name for t in failed}
        if names & {"spread_scale", "spread_total", "spread_pooled"}:
            diagnosis = (
                "MC spread over all ranks is not that of independent samples per "
                "datum (ranks sharing samples, or samples capped or reused)"
            )
        else:
            diagnosis = "MC mean over all ranks is not type-2 KFAC of the whole data"
    return Outcome(
        "passed" if verdict.passed else "failed",
        None,
        None,
        f"layer {ctx.layer}, rank 0 over {len(MC_PLAN)} M values x 16 seeds: "
        + verdict.message,
        diagnosis=diagnosis,
    )


def dist_side_effects(ctx: DistContext) -> Outcome:
    """No rank's call on this case left anything behind (as ``side_effects``)."""
    ctx.require(str(FisherType.TYPE2), str(ctx.default_approx()))
    calls = ctx.caller.calls.get(ctx.case.id, [])
    if not calls:
        raise Unsupported("no distributed call was made for this case")
    left = [(rank, found) for rank, found in calls if found]
    if not left:
        return Outcome("passed", message=f"{len(calls)} rank calls left nothing behind")
    messages: dict[str, set[int]] = {}
    for rank, found in left:
        for message in found:
            messages.setdefault(message, set()).add(rank)
    listed = "; ".join(
        f"{m} (rank(s) {', '.join(map(str, sorted(r)))})" for m, r in messages.items()
    )
    return Outcome(
        "failed",
        float(len(left)),
        0.0,
        f"{len(left)} of {len(calls)} rank calls left side effects: {listed}",
        diagnosis="side effects of the candidate (docs/theory.md §7, pitfall 10)",
    )


def items(case: Case) -> Iterator[DistItem]:
    """The distributed checks of one case, in a fixed order."""
    for ft in deterministic_fisher_types():
        for approx in approximations(case):
            params = {"fisher_type": str(ft), "kfac_approx": str(approx)}
            for layer in case.layers:
                yield DistItem(
                    f"dist_agree_{ft}_{approx}", case, layer, dist_agree, params
                )
            yield DistItem(
                f"dist_ranks_agree_{ft}_{approx}", case, None, dist_ranks_agree, params
            )
    claims = sorted(
        {
            (layer, str(claim.kfac_approx))
            for layer in case.layers
            for claim in case.claims_for(layer)
            if claim.statement == "mc_convergence"
        }
    )
    for mc_approx in sorted({a for _, a in claims}):
        yield DistItem(
            f"dist_mc_independent_{mc_approx}",
            case,
            None,
            dist_mc_independent,
            {"kfac_approx": mc_approx},
        )
        yield DistItem(
            f"dist_mc_reproducible_{mc_approx}",
            case,
            None,
            dist_mc_reproducible,
            {"kfac_approx": mc_approx},
        )
    for layer, mc_approx in claims:
        yield DistItem(
            f"dist_mc_converges_{mc_approx}",
            case,
            layer,
            dist_mc_converges,
            {"kfac_approx": mc_approx},
        )
    yield DistItem("dist_side_effects", case, None, dist_side_effects)


__all__ = [
    "FAMILY",
    "DistContext",
    "DistItem",
    "collision_probability",
    "dist_agree",
    "dist_mc_converges",
    "dist_mc_independent",
    "dist_mc_reproducible",
    "dist_ranks_agree",
    "dist_side_effects",
    "items",
]
