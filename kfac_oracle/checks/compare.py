"""Comparing a candidate's canonical block with a reference block.

With ``bias="separate"`` a candidate drops the weight-bias cross terms on purpose: the
diagonal sub-blocks (weight-weight, bias-bias) of joint and separate KFAC coincide, so
the comparison masks the cross terms of the reference. A module with a bias whose
result declares ``bias="none"`` fails: the bias block is missing. Blocks too large to
densify (operators) are compared matrix-free (:mod:`kfac_oracle.checks.matrixfree`).
"""

from __future__ import annotations

import math
from dataclasses import replace

from torch import Tensor, nn

from kfac_oracle.checks.matrixfree import (
    compare_operators,
)
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.conventions import weight_shape_2d
from kfac_oracle.flavours import BiasMode
from kfac_oracle.operators import (
    is_operator,
)

EXACT_RTOL = 1e-10


def rel_error(candidate: Tensor, reference: Tensor) -> float:
    """``‖C − B‖_F / ‖B‖_F`` (absolute error when ``B = 0``)."""
    diff = (candidate - reference).norm().item()
    scale = reference.norm().item()
    return diff / scale if scale > 0 else diff


def block_distance(
    candidate: object, reference: object, bias_mode: str, module: nn.Module
) -> float:
    """``‖C − B‖_F / ‖B‖_F`` of dense blocks or operators (matrix-free if need be)."""
    if is_operator(candidate) or is_operator(reference):
        outcome = compare_operators(
            candidate, reference, bias_mode, module, "", math.inf
        )
        return math.inf if outcome.error is None else outcome.error
    assert isinstance(candidate, Tensor) and isinstance(reference, Tensor)
    return rel_error(candidate.to(reference.dtype), reference)


def masked_reference(reference: Tensor, bias_mode: str, module: nn.Module) -> Tensor:
    """The reference with the weight-bias cross terms zeroed for ``"separate"``."""
    if bias_mode != BiasMode.SEPARATE:
        return reference
    d_out, d_in = weight_shape_2d(module)
    n_w = d_out * d_in
    out = reference.clone()
    out[:n_w, n_w:] = 0
    out[n_w:, :n_w] = 0
    return out


def compare_blocks(
    candidate: Tensor,
    reference: Tensor,
    bias_mode: str,
    module: nn.Module,
    what: str,
    rtol: float = EXACT_RTOL,
    basis: str = "",
    relative_to: float | None = None,
) -> Outcome:
    """Compare one block with a reference block at relative Frobenius error ``rtol``.

    ``basis`` says where the tolerance comes from (appended to the message; a
    float32 run's :meth:`~kfac_oracle.rounding.RoundingTolerance.describe`).
    ``relative_to``, when given, replaces ``‖B‖_F`` as the norm the error is
    relative to (for a reference block that vanishes in exact arithmetic). The
    outcome carries both blocks (for plots) when the comparison fails.
    """
    outcome = _compare(candidate, reference, bias_mode, module, what, rtol, relative_to)
    if basis:
        outcome = replace(outcome, message=f"{outcome.message}; {basis}")
    return outcome


def _compare(
    candidate: Tensor,
    reference: Tensor,
    bias_mode: str,
    module: nn.Module,
    what: str,
    rtol: float,
    relative_to: float | None,
) -> Outcome:
    if is_operator(candidate) or is_operator(reference):
        return compare_operators(
            candidate, reference, bias_mode, module, what, rtol, relative_to=relative_to
        )
    has_bias = getattr(module, "bias", None) is not None
    if has_bias and bias_mode == BiasMode.NONE:
        d_out, d_in = weight_shape_2d(module)
        n_w = d_out * d_in
        err = rel_error(candidate, reference[:n_w, :n_w])
        return Outcome(
            "failed",
            None,
            rtol,
            f"{what}: the module has a bias but the result has no bias block "
            f"(weight block alone: relative error {err:.3e})",
        )
    reference = masked_reference(reference, bias_mode, module)
    if relative_to is None:
        err = rel_error(candidate, reference)
    else:
        err = (candidate - reference).norm().item() / relative_to
    if err <= rtol:
        return Outcome("passed", err, rtol, f"{what}: relative error {err:.3e}")
    diff = (candidate - reference).abs()
    worst = divmod(int(diff.argmax()), diff.shape[1])
    return Outcome(
        "failed",
        err,
        rtol,
        f"{what}: relative Frobenius error {err:.3e} > {rtol:.0e}; max abs error "
        f"{diff.max().item():.3e} at entry {worst} (candidate "
        f"{candidate[worst].item():.6g}, reference {reference[worst].item():.6g}); "
        f"block {tuple(candidate.shape)}",
        blocks=(candidate, reference),
    )
