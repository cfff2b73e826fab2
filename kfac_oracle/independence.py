"""Per-datum independence: the model treats each datum of a batch on its own.

The exact references (docs/theory.md §1) write the loss as ``L = R Σ_n ℓ_n`` with
``ℓ_n`` a function of datum ``n`` alone and vectorise per datum with
``torch.func.vmap``; KFAC's factors are sums over data. Both need
``f(X)_n = f(x_n)``: the output for a datum must not depend on the other data of its
batch, and must be deterministic.

Two checks, each raising :class:`~kfac_oracle.errors.ProblemError`:

- :func:`check_modes`: no module in training mode that mixes or randomises data
  (BatchNorm, which normalises with batch statistics; active Dropout);
- :func:`check_per_datum`: numerically, the batch's output equals the outputs of each
  datum run alone, to a relative error of ``1e4 · eps`` of the dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kfac_oracle.errors import ProblemError

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def mixing_modules(model: nn.Module) -> list[str]:
    """Modules in training mode that make data points dependent or random.

    Returns one description per offending module, e.g.
    ``"'bn1' (BatchNorm2d in training mode: batch statistics)"``.
    """
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            what = "in training mode: normalises with the batch's statistics"
        elif isinstance(m, _DROPOUT) and m.p > 0:
            what = f"active with p={m.p}: a random mask per call"
        else:
            continue
        found.append(f"{name or '<model>'!r} ({type(m).__name__} {what})")
    return found


def check_modes(model: nn.Module) -> None:
    """Raise :class:`ProblemError` naming every module that mixes or randomises data."""
    found = mixing_modules(model)
    if found:
        raise ProblemError(
            "the exact references need each datum treated independently and "
            f"deterministically; {'; '.join(found)}. Put these modules in eval mode "
            "(model.eval(), or module.eval() on each)"
        )


def check_per_datum(model: nn.Module, X: Tensor, b: int = 0) -> None:
    """Raise :class:`ProblemError` unless ``model(X)[n] == model(X[n:n+1])[0]``.

    Compared at a relative Frobenius error of ``1e4 · eps`` (batched and single
    products may round differently).
    """
    if X.shape[0] < 2:
        return
    with torch.no_grad():
        batch = model(X)
        alone = torch.cat([model(X[n : n + 1]) for n in range(X.shape[0])])
    if batch.shape != alone.shape:
        raise ProblemError(
            f"batch {b}: the output's shape depends on the batch: "
            f"{tuple(batch.shape)} for the batch, {tuple(alone.shape)} for its data "
            "run one at a time"
        )
    if not batch.dtype.is_floating_point:
        return
    scale = alone.norm().item()
    err = (batch - alone).norm().item() / (scale if scale > 0 else 1.0)
    tol = 1e4 * torch.finfo(batch.dtype).eps
    if not err <= tol:
        raise ProblemError(
            f"batch {b}: the model does not treat data points independently: the "
            f"output of the batch differs from the outputs of its data run one at a "
            f"time (relative error {err:.3e} > {tol:.0e}); the exact references "
            "need f(X)_n = f(x_n) (no batch statistics, no randomness, no mixing "
            "across the batch dimension)"
        )


__all__ = ["check_modes", "check_per_datum", "mixing_modules"]
