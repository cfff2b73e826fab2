"""Fitting a candidate block to a hypothesis up to a constant, and rounding."""

from __future__ import annotations

import torch
from torch import Tensor

FIT_RTOL = 1e-10
# A mismatch this small (relative) is rounding, not a pitfall: float32 has eps 1.2e-7,
# and accumulating n terms in float32 gives errors up to about n·eps.
FLOAT32_LEVEL = 1e-5


def precision_diagnosis(error: float, tolerance: float) -> str | None:
    """Name rounding as the cause of a failed comparison, if the error is that small.

    A float64 candidate that computes in float32 (or accumulates in a lower precision)
    agrees with the reference to about float32 rounding; say so, instead of naming a
    pitfall that does not apply.
    """
    if not tolerance < error <= FLOAT32_LEVEL:
        return None
    eps = torch.finfo(torch.float32).eps
    return (
        f"agrees with the reference to {error:.1e}, the size of float32 rounding "
        f"(eps {eps:.1e}): computed in float32 (or a lower precision) although the "
        "problem is float64?"
    )


def fit_scalar(C: Tensor, B: Tensor, rtol: float = FIT_RTOL) -> float | None:
    """``c`` with ``C = c · B`` to a relative Frobenius residual ``rtol``, or ``None``.

    Diagnoses fit at the tolerance of the check that failed, so a failed record is
    never explained as "matches the reference".
    """
    if C.shape != B.shape:
        return None
    denom = (B * B).sum()
    if denom == 0:
        return None
    c = ((C * B).sum() / denom).item()
    if (C - c * B).norm() <= rtol * max(C.norm().item(), 1e-300):
        return c
    return None
