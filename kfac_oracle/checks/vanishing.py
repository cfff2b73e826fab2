"""KFAC-reduce blocks that vanish in exact arithmetic, and what they are compared with.

A relative error against a block that is rounding noise is noise over noise; such a
block is compared relative to the norm of the expand block of the same gradients
(:func:`vanishing_reduce_block`). Used by the agreement and invariance checks.
"""

from __future__ import annotations

from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.matrixfree import frobenius_norm
from kfac_oracle.flavours import Flavour, KFACApprox

#: A reduce block this much smaller than the expand block vanishes identically.
VANISHING_RATIO = 1e-20


def vanishing_reduce_block(
    ctx: CheckContext, flavour: Flavour, reference: object
) -> tuple[float, str] | None:
    """``(‖K_expand‖, note)`` where the reference KFAC-reduce block vanishes, else None.

    KFAC-reduce sums each datum's output gradients over the shared positions before
    the outer product, ``G = Σ_n (Σ_s g_ns)(Σ_s g_ns)ᵀ``. Where the loss is invariant
    under one shift of the layer's output at every position — the keys of softmax
    attention: ``qᵀ(k_s + c)`` moves all scores of a query by ``qᵀc`` — the sum is
    identically zero, so ``G`` is rounding noise (``‖K_reduce‖/‖K_expand‖ ≈ eps²``)
    and a relative error against it is noise over noise. Such a block is compared
    relative to the expand block of the same gradients (no cancellation), which it
    must be negligible against.
    """
    assert ctx.layer is not None
    expand = Flavour(flavour.fisher_type, KFACApprox.EXPAND, flavour.bias)
    blocks = ctx.approximation.blocks(ctx.problem(), expand, [ctx.layer])
    expand_norm = frobenius_norm(blocks[ctx.layer])
    reduce_norm = frobenius_norm(reference)
    if expand_norm == 0 or reduce_norm > VANISHING_RATIO * expand_norm:
        return None
    note = (
        f"the reference KFAC-reduce block vanishes in exact arithmetic (‖K_reduce‖ "
        f"= {reduce_norm / expand_norm:.1e} ‖K_expand‖: the layer's output gradients "
        "sum to zero over the positions), so the error is relative to ‖K_expand‖"
    )
    return expand_norm, note


def vanishes(reduce_block: object, expand_block: object) -> bool:
    """``‖K_reduce‖ ≤ VANISHING_RATIO · ‖K_expand‖`` (and ``K_expand ≠ 0``)."""
    scale = frobenius_norm(expand_block)
    return scale > 0 and frobenius_norm(reduce_block) <= VANISHING_RATIO * scale


def vanishing_layers(ctx: CheckContext, flavour: Flavour) -> dict[str, float]:
    """``{layer: mean eigenvalue of K_expand}`` of the case's vanishing reduce blocks.

    Empty unless ``flavour`` is reduce; uses the cached dense references (small
    cases).
    """
    if flavour.kfac_approx != KFACApprox.REDUCE:
        return {}
    expand = Flavour(flavour.fisher_type, KFACApprox.EXPAND, flavour.bias)
    reduce_blocks, expand_blocks = ctx.reference(flavour), ctx.reference(expand)
    return {
        layer: expand_blocks[layer].diagonal().sum().item()
        / expand_blocks[layer].shape[0]
        for layer, block in reduce_blocks.items()
        if vanishes(block, expand_blocks[layer])
    }


__all__ = ["VANISHING_RATIO", "vanishes", "vanishing_layers", "vanishing_reduce_block"]
