"""Comparing a candidate's canonical block with a reference block.

With ``bias="separate"`` a candidate drops the weight-bias cross terms on purpose: the
diagonal sub-blocks (weight-weight, bias-bias) of joint and separate KFAC coincide, so
the comparison masks the cross terms of the reference. A module with a bias whose
result declares ``bias="none"`` fails: the bias block is missing.
"""

from __future__ import annotations

from torch import Tensor

from kfac_oracle.checks.base import EXACT_RTOL, rel_error
from kfac_oracle.conventions import weight_shape_2d


def masked_reference(reference: Tensor, bias_mode: str, module) -> Tensor:
    """The reference with the weight-bias cross terms zeroed for ``"separate"``."""
    if bias_mode != "separate":
        return reference
    d_out, d_in = weight_shape_2d(module)
    n_w = d_out * d_in
    out = reference.clone()
    out[:n_w, n_w:] = 0
    out[n_w:, :n_w] = 0
    return out


def compare_layer(session, case, layer: str, result, reference: Tensor, what: str):
    """Compare one layer of a candidate's result with a reference block.

    Keeps both blocks for ``--plots`` (dropped again unless the check fails).
    """
    module = session.problem(case).model.get_submodule(layer)
    session.plot_blocks[session.current_item] = (result.blocks[layer], reference)
    return compare_blocks(
        result.blocks[layer], reference, result.bias[layer], module, what
    )


def compare_blocks(
    candidate: Tensor,
    reference: Tensor,
    bias_mode: str,
    module,
    what: str,
    rtol: float = EXACT_RTOL,
) -> tuple[str, float | None, float, str]:
    """``(status, relative error, tolerance, message)`` of one block comparison."""
    has_bias = getattr(module, "bias", None) is not None
    if has_bias and bias_mode == "none":
        d_out, d_in = weight_shape_2d(module)
        n_w = d_out * d_in
        err = rel_error(candidate, reference[:n_w, :n_w])
        return (
            "failed",
            None,
            rtol,
            f"{what}: the module has a bias but the result has no bias block "
            f"(weight block alone: relative error {err:.3e})",
        )
    reference = masked_reference(reference, bias_mode, module)
    err = rel_error(candidate, reference)
    if err <= rtol:
        return "passed", err, rtol, f"{what}: relative error {err:.3e}"
    diff = (candidate - reference).abs()
    worst = divmod(int(diff.argmax()), diff.shape[1])
    return (
        "failed",
        err,
        rtol,
        f"{what}: relative Frobenius error {err:.3e} > {rtol:.0e}; max abs error "
        f"{diff.max().item():.3e} at entry {worst} (candidate "
        f"{candidate[worst].item():.6g}, reference {reference[worst].item():.6g}); "
        f"block {tuple(candidate.shape)}",
    )
