"""Damping conventions: which matrix a "damped inverse of KFAC" inverts (theory §10).

For a layer's block ``K = G ⊗ A`` (canonical ``[rvec(W), b]`` layout, ``P`` entries,
joint bias: ``A`` acts on ``[a; 1]``) and a damping ``λ ≥ 0``:

=====================  =============================================================
``product``            ``K + λ I``
``per_factor``         ``(G + √λ I) ⊗ (A + √λ I)``
``pi``                 ``(G + (√λ/π) I) ⊗ (A + π√λ I)``,
                       ``π = sqrt((tr A / dim A) / (tr G / dim G))``
                       (Martens & Grosse 2015, §6.3; undefined if a trace is
                       zero: the checks skip such cases, :func:`pi_factor` uses 1)
``mean_eigenvalue``    ``K + λ · (tr K / P) · I`` (λ relative to the mean eigenvalue)
=====================  =============================================================

``per_factor`` and ``pi`` are defined through the Kronecker factors: they need a block
that *is* ``G ⊗ A`` (:attr:`DampingConvention.needs_factors`). The other two act on any
symmetric block (EKFAC's included). The reference operations and the ``operations``
checks both take the definitions from here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kfac_oracle.flavours import Vocabulary

if TYPE_CHECKING:  # the contract's vocabulary is read from here: import it lazily
    from kfac_oracle.contract import KroneckerFactors


class DampingConvention(Vocabulary):
    """How a damping ``λ`` enters the damped block (module docstring)."""

    PRODUCT = "product"
    PER_FACTOR = "per_factor"
    PI = "pi"
    MEAN_EIGENVALUE = "mean_eigenvalue"

    @property
    def needs_factors(self) -> bool:
        """Whether the convention damps the Kronecker factors (not the block)."""
        return self in (DampingConvention.PER_FACTOR, DampingConvention.PI)

    @property
    def formula(self) -> str:
        """The damped matrix, as messages write it."""
        return _FORMULAS[self]


_FORMULAS = {
    DampingConvention.PRODUCT: "K + λI",
    DampingConvention.PER_FACTOR: "(G + √λ I) ⊗ (A + √λ I)",
    DampingConvention.PI: "(G + √λ/π I) ⊗ (A + π√λ I)",
    DampingConvention.MEAN_EIGENVALUE: "K + λ·(tr K / P)·I",
}


def pi_factor(A: Tensor, G: Tensor) -> float:
    """``π = sqrt((tr A / dim A) / (tr G / dim G))``.

    Undefined where a trace is zero; ``1`` is returned there (the ``operations``
    checks do not compare ``pi`` damping on such layers).
    """
    mean_a = A.diagonal().sum().item() / A.shape[0]
    mean_g = G.diagonal().sum().item() / G.shape[0]
    if mean_a <= 0 or mean_g <= 0:
        return 1.0
    return math.sqrt(mean_a / mean_g)


def factor_shifts(
    convention: DampingConvention | str, damping: float, A: Tensor, G: Tensor
) -> tuple[float, float]:
    """``(a, g)`` with the damped factors ``A + a I`` and ``G + g I``.

    Raises:
        ValueError: For a convention that does not damp the factors.
    """
    convention = DampingConvention.parse(convention, "damping convention")
    root = math.sqrt(damping)
    if convention is DampingConvention.PER_FACTOR:
        return root, root
    if convention is DampingConvention.PI:
        pi = pi_factor(A, G)
        return pi * root, root / pi
    raise ValueError(f"{convention} damping does not damp the Kronecker factors")


def block_shift(
    convention: DampingConvention | str, damping: float, trace: float, size: int
) -> float:
    """``c`` with the damped block ``K + c I`` (``product`` and ``mean_eigenvalue``).

    Raises:
        ValueError: For a convention that damps the factors instead.
    """
    convention = DampingConvention.parse(convention, "damping convention")
    if convention is DampingConvention.PRODUCT:
        return damping
    if convention is DampingConvention.MEAN_EIGENVALUE:
        return damping * trace / size
    raise ValueError(f"{convention} damping damps the Kronecker factors, not K")


def shifted_factors(factors: KroneckerFactors, a: float, g: float) -> KroneckerFactors:
    """``A + a I`` and ``G + g I`` (bias mode kept; a separate bias is not damped)."""
    A, G = factors.input_covariance, factors.gradient_covariance
    return dataclasses.replace(
        factors,
        input_covariance=A + a * torch.eye(A.shape[0], dtype=A.dtype, device=A.device),
        gradient_covariance=G
        + g * torch.eye(G.shape[0], dtype=G.dtype, device=G.device),
    )


def damped_block(
    convention: DampingConvention | str,
    damping: float,
    block: Tensor,
    factors: KroneckerFactors | None = None,
) -> Tensor:
    """The dense damped matrix of a canonical block under a convention.

    Args:
        convention: The damping convention.
        damping: ``λ ≥ 0``.
        block: ``K`` in the canonical layout.
        factors: ``A`` and ``G`` with ``K = G ⊗ A`` (joint or no bias); required by
            ``per_factor`` and ``pi``.

    Raises:
        ValueError: A factor convention without factors, or a negative ``λ``.
    """
    from kfac_oracle.conventions import kronecker_block

    convention = DampingConvention.parse(convention, "damping convention")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    if convention.needs_factors:
        if factors is None:
            raise ValueError(f"{convention} damping needs the Kronecker factors")
        a, g = factor_shifts(
            convention, damping, factors.input_covariance, factors.gradient_covariance
        )
        return kronecker_block(shifted_factors(factors, a, g))
    size = block.shape[0]
    shift = block_shift(convention, damping, block.diagonal().sum().item(), size)
    return block + shift * torch.eye(size, dtype=block.dtype, device=block.device)


__all__ = [
    "DampingConvention",
    "block_shift",
    "damped_block",
    "factor_shifts",
    "pi_factor",
    "shifted_factors",
]
