"""Exactness: where the catalogue claims KFAC is exact, so must the candidate be.

Positive claims of the catalogue (docs/theory.md §5, E1–E5) name a flavour for which
KFAC provably equals an exact curvature block: type-2 ↔ GGN, empirical ↔ empirical
Fisher. The candidate's block must match it to a relative Frobenius error of 1e-10
(float64); a float32 candidate to the measured rounding tolerance of the claimed
flavour's KFAC (:mod:`kfac_oracle.rounding`), which the claim makes the same matrix.
Claims about MC-KFAC for the *same* samples need the oracle's own sampling; they are
checked on the reference (the tests), and a candidate's MC statistically
(the ``mc`` family).
"""

from __future__ import annotations

from collections.abc import Iterator

from kfac_oracle.catalogue import Case
from kfac_oracle.checks.compare import compare_blocks
from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.diagnose import diagnose_layer
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.checks.registry import Target, check, family
from kfac_oracle.flavours import FisherType, Flavour

family(rank=1)


def positive_claims(case: Case) -> Iterator[Target]:
    """One target per layer and positive ``kfac`` claim with an exact counterpart."""
    for layer in case.layers:
        for claim in case.claims_for(layer):
            if claim.statement != "kfac" or not claim.holds:
                continue
            kind = FisherType.parse(claim.fisher_type).exact_curvature
            if kind is None:
                continue
            yield Target(
                f"exact_{claim.equivalence}_{claim.fisher_type}_{claim.kfac_approx}",
                layer,
                claim.fisher_type,
                claim.kfac_approx,
                {"kind": kind, "claim": claim.id},
            )


@check(targets=positive_claims, diagnose=diagnose_layer, matrix_free=True, float32=True)
def exact(
    ctx: CheckContext, *, fisher_type: str, kfac_approx: str, kind: str, claim: str
) -> Outcome:
    """KFAC of the claimed flavour equals the exact block (type-2 ↔ GGN, EF ↔ EF).

    Holds exactly under the conditions of the claimed equivalence (E1 one datum, E2
    affine tail and MSE, E3 expand setting, E4 reduce setting, E5 convolutions).
    """
    assert ctx.layer is not None
    result = ctx.candidate(ctx.key(fisher_type, kfac_approx))
    reference = ctx.references.exact_block(ctx.case, ctx.layer, kind)
    what = f"layer {ctx.layer} vs exact {kind} block ({claim})"
    bias = ctx.reference_bias(result.bias[ctx.layer])
    rtol, basis = ctx.block_tolerance(Flavour(fisher_type, kfac_approx, bias))
    return compare_blocks(
        result.blocks[ctx.layer],
        reference,
        result.bias[ctx.layer],
        ctx.module(),
        what,
        rtol,
        basis,
    )
