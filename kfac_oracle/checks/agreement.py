"""Agreement: everywhere, the candidate equals the reference of its flavour.

For every layer and deterministic fisher type (type-2, empirical, forward-only), with
expand and, where positions share a weight, reduce: the candidate's block equals the
reference block of its approximation (KFAC, or EKFAC for EKFAC candidates) to a
relative Frobenius error of 1e-10 (float64), or, for a candidate that computes in
float32, the tolerance of the measured rounding model (:mod:`kfac_oracle.rounding`).
"""

from __future__ import annotations

from collections.abc import Iterator

from kfac_oracle.catalogue import Case
from kfac_oracle.checks.compare import compare_blocks
from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.diagnose import diagnose_layer
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.checks.registry import Target, check, family
from kfac_oracle.checks.vanishing import vanishing_reduce_block
from kfac_oracle.errors import Unsupported
from kfac_oracle.flavours import Flavour, KFACApprox, deterministic_fisher_types
from kfac_oracle.rounding import FLOOR_UNITS, ROUNDING_FACTOR, UNIT_ROUNDOFF

family(rank=2)


def approximations(case: Case) -> tuple[KFACApprox, ...]:
    """Both approximations with weight sharing; without, they coincide (expand)."""
    if case.setting == "none":
        return (KFACApprox.EXPAND,)
    return (KFACApprox.EXPAND, KFACApprox.REDUCE)


def every_flavour(case: Case) -> Iterator[Target]:
    """One target per deterministic fisher type, approximation and layer."""
    for ft in deterministic_fisher_types():
        for approx in approximations(case):
            for layer in case.layers:
                yield Target(f"agree_{ft}_{approx}", layer, str(ft), str(approx))


@check(targets=every_flavour, diagnose=diagnose_layer, matrix_free=True, float32=True)
def agree(ctx: CheckContext, *, fisher_type: str, kfac_approx: str) -> Outcome:
    """The candidate equals the reference of its approximation and flavour.

    The reference is computed from the definition (docs/theory.md §4) on the same
    model, loss and data; layers where the approximation has no unique answer (EKFAC
    with a repeated eigenvalue) are unsupported.
    """
    assert ctx.layer is not None
    result = ctx.candidate(ctx.key(fisher_type, kfac_approx))
    flavour = Flavour(
        fisher_type, kfac_approx, ctx.reference_bias(result.bias[ctx.layer])
    )
    if ctx.layer in ctx.ambiguous(flavour):
        raise Unsupported(
            "EKFAC is not unique here: a Kronecker factor has a repeated "
            "eigenvalue, so the eigenbasis (and EKFAC) depends on the solver"
        )
    reference = ctx.reference(flavour)[ctx.layer]
    title = ctx.approximation.title.removeprefix("reference ")
    what = f"layer {ctx.layer} vs reference {title} ({fisher_type}, {kfac_approx})"
    rtol, basis = ctx.block_tolerance(flavour)
    block, bias = result.blocks[ctx.layer], result.bias[ctx.layer]
    outcome = compare_blocks(block, reference, bias, ctx.module(), what, rtol, basis)
    if outcome.passed or kfac_approx != KFACApprox.REDUCE:
        return outcome
    vanishing = vanishing_reduce_block(ctx, flavour, reference)
    if vanishing is None:
        return outcome
    expand_norm, note = vanishing
    # Relative to ‖K_expand‖ the rounding of either side is at most ~u²; a float32
    # run keeps its floor tolerance (the measured spread of a vanishing block is
    # noise over noise).
    rtol = min(rtol, ROUNDING_FACTOR * FLOOR_UNITS * UNIT_ROUNDOFF)
    return compare_blocks(
        block,
        reference,
        bias,
        ctx.module(),
        what,
        rtol,
        "; ".join(filter(None, [note, basis])),
        relative_to=expand_norm,
    )
