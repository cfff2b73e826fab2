"""Naming the data-parallel pitfall behind a distributed mismatch.

Rank ``k`` holds ``N_k`` of the ``N`` data; its *local* factors ``(A_k, G_k)`` are the
reference KFAC of its shard alone (normalised by ``N_k``, ``G_k`` with the shard's
``R``), and ``(A, G)`` is the reference over the whole data set. The hypotheses for a
rank's block (docs/theory.md §4; all compared in canonical form, fitted at the failed
check's tolerance):

- *mean-then-SUM*: ``A = Σ_k A_k``, ``G = Σ_k G_k`` — the ranks' means added instead
  of their sums (about ``W`` times too large per mean factor);
- *equal-weight average of per-rank means*: ``A = (1/W) Σ_k A_k``,
  ``G = (1/W) Σ_k G_k`` — right for equal shards only;
- *nothing reduced*: ``(A_r, G_r)``, up to a constant — rank ``r`` returned its own
  shard's factors (with rank 0 right: *rank 0's factors only*, a reduce to rank 0
  without a broadcast);
- *one factor not reduced*: ``(A_r, G)`` or ``(A, G_r)``, up to a constant (tried
  after *nothing reduced*: where ``G_r ∝ G``, e.g. a last layer under MSE, the two
  coincide and the broader one is named).

The first two must hold exactly (they differ from each other only by a constant);
the others may carry a constant factor, which is named. If no hypothesis fits, the
single-process pitfalls are tried (:func:`kfac_oracle.diagnosis.diagnose`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.conventions import kronecker_block
from kfac_oracle.diagnosis import diagnose, fit_scalar
from kfac_oracle.distributed.shards import Batches
from kfac_oracle.flavours import BiasMode, Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.kfac import KFACSteps

Hypothesis = tuple[str, Callable[[], Tensor], bool]


def _factors(problem: Problem, data: Batches, flavour: Flavour, layer: str):
    shard = Problem(problem.model, problem.loss_func, data, check_outputs=False)
    return KFACSteps().factors(shard, flavour, [layer])[layer]


def _block(A: Tensor, G: Tensor, bias: str) -> Tensor:
    return kronecker_block(KroneckerFactors(A, G, bias))


def hypotheses(
    problem: Problem,
    shards: Sequence[Batches],
    flavour: Flavour,
    layer: str,
    rank: int,
) -> list[Hypothesis]:
    """``(why, block, exact scale required)`` for rank ``rank``'s block of ``layer``."""
    W = len(shards)
    sizes = [sum(len(X) for X, _ in s) for s in shards]
    local = [_factors(problem, s, flavour, layer) for s in shards]
    whole = _factors(problem, problem.data, flavour, layer)
    bias = whole.bias
    A_k = [f.input_covariance for f in local]
    G_k = [f.gradient_covariance for f in local]
    A, G = whole.input_covariance, whole.gradient_covariance
    own = f"rank {rank}'s own shard ({sizes[rank]} of {sum(sizes)} data)"
    return [
        (
            "mean-then-SUM: the ranks' normalised factors (per-rank means) were "
            f"all-reduced with SUM instead of their sums (about W = {W} times too "
            "large per mean factor)",
            lambda: _block(sum(A_k), sum(G_k), bias),
            True,
        ),
        (
            "equal-weight average of per-rank means: the ranks' normalised factors "
            f"were averaged (SUM / W) over unequal shards of sizes {sizes}; each "
            "rank's sum must be weighted by its number of data",
            lambda: _block(sum(A_k) / W, sum(G_k) / W, bias),
            True,
        ),
        (
            f"factors not all-reduced: rank {rank} returned the factors of {own}",
            lambda: _block(A_k[rank], G_k[rank], bias),
            False,
        ),
        (
            f"A (input covariance) not all-reduced: it is of {own}",
            lambda: _block(A_k[rank], G, bias),
            False,
        ),
        (
            f"G (gradient covariance) not all-reduced: it is of {own}",
            lambda: _block(A, G_k[rank], bias),
            False,
        ),
    ]


def diagnose_rank(
    candidate: Tensor,
    problem: Problem,
    shards: Sequence[Batches],
    flavour: Flavour,
    layer: str,
    rank: int,
    tolerance: float,
    reference: Tensor | None = None,
) -> str:
    """The pitfall that explains rank ``rank``'s block of ``layer``, or why none does.

    Args:
        candidate: The rank's canonical block.
        problem: The whole problem (every rank's data).
        shards: Every rank's batches.
        flavour: The request's flavour, with the candidate's declared bias.
        layer: Module name.
        rank: The rank.
        tolerance: The failed check's tolerance.
        reference: The block the check compared with.
    """
    for why, make, exact in hypotheses(problem, shards, flavour, layer, rank):
        try:
            B = make()
        except Exception:  # noqa: BLE001 - a hypothesis that cannot be built
            continue
        c = fit_scalar(candidate, B, tolerance)
        if c is None:
            continue
        if abs(c - 1) <= tolerance:
            return why
        if not exact:
            return f"{why}, up to a constant factor {_name_share(c, shards, rank)}"
    return diagnose(
        candidate,
        problem,
        layer,
        str(flavour.fisher_type),
        str(flavour.kfac_approx),
        str(flavour.bias),
        flavour.mc_samples,
        flavour.seed,
        tolerance=tolerance,
        reference=reference,
    )


def _name_share(c: float, shards: Sequence[Batches], rank: int) -> str:
    """``c``, named when it is the rank's share ``N_r/N`` of the data, or its square."""
    sizes = [sum(len(X) for X, _ in s) for s in shards]
    share = sizes[rank] / sum(sizes)
    for value, name in ((share, "N_r/N"), (share**2, "(N_r/N)²")):
        if abs(c - value) <= 1e-8 * value:
            return (
                f"{c:.6g} = {name} (the shard's sums normalised by the whole data "
                "set's counts)"
            )
    return f"{c:.6g}"


def diagnose_ranks(per_rank: dict[int, str], passed: Sequence[int]) -> str:
    """One line for every failing rank's diagnosis; names *rank 0's factors only*."""
    if (
        0 in passed
        and per_rank
        and all("not all-reduced" in d for d in per_rank.values())
    ):
        ranks = ", ".join(str(r) for r in sorted(per_rank))
        return (
            f"rank 0's factors only: rank 0 is right, rank(s) {ranks} returned "
            "their own shard's factors (reduced to rank 0 without a broadcast?); "
            + "; ".join(f"rank {r}: {d}" for r, d in sorted(per_rank.items()))
        )
    distinct = set(per_rank.values())
    if len(distinct) == 1 and len(per_rank) > 1:
        return distinct.pop()
    return "; ".join(f"rank {r}: {d}" for r, d in sorted(per_rank.items()))


def reference_bias(mode: str) -> BiasMode:
    """The bias mode a declared mode is compared with (``none`` → joint)."""
    return BiasMode.JOINT if mode == BiasMode.NONE else BiasMode.parse(mode)


__all__ = ["diagnose_rank", "diagnose_ranks", "hypotheses", "reference_bias"]
