r"""Inner products of Kronecker-factored blocks: statistics without densifying.

Every statistic of :mod:`kfac_oracle.statistics` is a function of Frobenius inner
products ``⟨X, Y⟩ = tr(XᵀY) = Σ_ij X_ij Y_ij`` between canonical blocks. For blocks
given by Kronecker factors (:class:`~kfac_oracle.operators.KroneckerOperator`) they
come from the factors, at ``O(d_out² + d_in²)`` per pair instead of ``O(P²)``::

    ⟨G₁ ⊗ A₁, G₂ ⊗ A₂⟩ = tr(G₁ᵀG₂) · tr(A₁ᵀA₂) = ⟨G₁, G₂⟩ ⟨A₁, A₂⟩.

Joint bias permutes rows and columns of ``G ⊗ Ã`` alike on both sides (a permutation
preserves inner products); separate bias is ``blockdiag(G ⊗ A, G_b)``, so
``⟨K₁, K₂⟩ = ⟨G₁, G₂⟩⟨A₁, A₂⟩ + ⟨G_b₁, G_b₂⟩``.

**Differences without cancellation.** ``‖C − B‖²`` from ``‖C‖² − 2⟨C, B⟩ + ‖B‖²``
loses the digits that ``C`` and ``B`` share. A difference is instead written as a sum
of two Kronecker products whose factors are themselves small::

    G₁ ⊗ A₁ − G₂ ⊗ A₂ = (G₁ − G₂) ⊗ A₁ + G₂ ⊗ (A₁ − A₂),

(the second term vanishes where both share one ``A``, as MC draws do), and inner
products of such sums are sums of products of small numbers: as accurate as the dense
computation, to rounding.

A block is held as :class:`KroneckerTerms` (``Σ_i G_i ⊗ A_i`` on the weight entries,
``Σ_j G_b,j`` on the bias entries); :func:`gram` gives every inner product of a list
of them with two matrix products (``[vec G_i]`` and ``[vec A_i]`` stacked).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.operators import KroneckerOperator


@dataclass(frozen=True)
class KroneckerTerms:
    """``Σ_i G_i ⊗ A_i`` on the weight entries plus ``Σ_j G_b,j`` on the bias entries.

    Attributes:
        weight: Pairs ``(G_i, A_i)``; every ``A_i`` of one block has one shape.
        bias: The bias-bias blocks ``G_b,j`` (``bias="separate"`` only).
    """

    weight: tuple[tuple[Tensor, Tensor], ...]
    bias: tuple[Tensor, ...] = ()


def terms(op: KroneckerOperator, scale: float = 1.0) -> KroneckerTerms:
    """``scale · K`` of a Kronecker operator as terms (the scale on ``G``)."""
    f = op.factors
    G = _cpu(f.gradient_covariance)
    A = _cpu(f.input_covariance)
    bias = (scale * _cpu(op.bias_block),) if f.bias == "separate" else ()
    return KroneckerTerms(((scale * G, A),), bias)


def difference(c: KroneckerOperator, r: KroneckerOperator) -> KroneckerTerms:
    """``K_c − K_r`` as ``(G_c − G_r) ⊗ A_c + G_r ⊗ (A_c − A_r)`` (no cancellation).

    Raises:
        ValueError: If the two blocks differ in layout (bias mode or factor shapes).
    """
    require_same_layout(c, r)
    G_c, A_c = _cpu(c.factors.gradient_covariance), _cpu(c.factors.input_covariance)
    G_r, A_r = _cpu(r.factors.gradient_covariance), _cpu(r.factors.input_covariance)
    weight: tuple[tuple[Tensor, Tensor], ...] = ((G_c - G_r, A_c),)
    if not torch.equal(A_c, A_r):
        weight += ((G_r, A_c - A_r),)
    bias: tuple[Tensor, ...] = ()
    if c.factors.bias == "separate":
        bias = (_cpu(c.bias_block) - _cpu(r.bias_block),)
    return KroneckerTerms(weight, bias)


def gram(
    left: Sequence[KroneckerTerms], right: Sequence[KroneckerTerms] | None = None
) -> Tensor:
    """``Γ_kl = ⟨X_k, Y_l⟩`` for blocks ``X`` (``left``) and ``Y`` (default ``X``).

    ``Γ = O_X ((G_X G_Yᵀ) ∘ (A_X A_Yᵀ)) O_Yᵀ + (bias part)`` with the rows of ``G_X``
    the flattened ``G_i`` of every term, ``∘`` the entrywise product and ``O_X`` the 0/1
    matrix assigning terms to blocks.
    """
    right = left if right is None else right

    def stacked(blocks: Sequence[KroneckerTerms], part: str):
        rows, owners = [], []
        for k, X in enumerate(blocks):
            items = X.weight if part == "weight" else [(Gb, None) for Gb in X.bias]
            for G, A in items:
                rows.append((G.reshape(-1), None if A is None else A.reshape(-1)))
                owners.append(k)
        return rows, owners

    out = torch.zeros(len(left), len(right), dtype=torch.float64)
    for part in ("weight", "bias"):
        rows_l, own_l = stacked(left, part)
        rows_r, own_r = stacked(right, part)
        if not rows_l or not rows_r:
            continue
        GG = torch.stack([g for g, _ in rows_l]) @ torch.stack([g for g, _ in rows_r]).T
        if part == "weight":
            AA = (
                torch.stack([a for _, a in rows_l])
                @ torch.stack([a for _, a in rows_r]).T
            )
            GG = GG * AA
        O_l = torch.zeros(len(left), len(rows_l), dtype=torch.float64)
        O_l[own_l, torch.arange(len(rows_l))] = 1.0
        O_r = torch.zeros(len(right), len(rows_r), dtype=torch.float64)
        O_r[own_r, torch.arange(len(rows_r))] = 1.0
        out += O_l @ GG @ O_r.T
    return out


def inner(X: KroneckerTerms, Y: KroneckerTerms) -> float:
    """``⟨X, Y⟩``."""
    return float(gram([X], [Y])[0, 0])


def layout(op: KroneckerOperator) -> tuple:
    """What two blocks must share to be compared: shape, bias mode, factor shapes."""
    f = op.factors
    return (
        op.d_out,
        op.d_in,
        str(f.bias),
        tuple(f.input_covariance.shape),
        tuple(f.gradient_covariance.shape),
        tuple(op.bias_block.shape) if f.bias == "separate" else None,
    )


def require_same_layout(c: KroneckerOperator, r: KroneckerOperator) -> None:
    """Raise ``ValueError`` unless ``c`` and ``r`` have one layout."""
    if layout(c) != layout(r):
        raise ValueError(
            f"Kronecker blocks of different layouts: {layout(c)} vs {layout(r)}"
        )


def scaled(op: KroneckerOperator, c: float) -> KroneckerOperator:
    """``c · K`` as a Kronecker operator (``c`` on ``G`` and the bias block)."""
    f = op.factors
    bias_cov = None if f.bias_covariance is None else c * f.bias_covariance
    return KroneckerOperator(
        KroneckerFactors(
            f.input_covariance, c * f.gradient_covariance, f.bias, bias_cov
        ),
        op.d_out,
        op.d_in,
    )


@dataclass(frozen=True)
class KroneckerBlocks:
    """``K`` canonical blocks given by Kronecker factors (one layer, one ``M``).

    The quantities :mod:`kfac_oracle.statistics` needs, each from inner products of
    factors (module docstring); ``C̄ = (1/K) Σ_k C_k``.
    """

    blocks: tuple[KroneckerOperator, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    def layout(self) -> tuple | None:
        """The common layout, or ``None`` when the blocks differ in layout."""
        layouts = {layout(b) for b in self.blocks}
        return next(iter(layouts)) if len(layouts) == 1 else None

    def nonfinite(self) -> int:
        """How many blocks have a NaN or inf in a factor."""
        return sum(
            not all(
                bool(torch.isfinite(t).all())
                for t in (
                    b.factors.input_covariance,
                    b.factors.gradient_covariance,
                    b.bias_block,
                )
            )
            for b in self.blocks
        )

    def along(self, B: KroneckerOperator) -> Tensor:
        """``(⟨C_k, B⟩)_k``."""
        return gram([terms(b) for b in self.blocks], [terms(B)])[:, 0]

    def mean_deviation_sq(self, H: KroneckerOperator) -> float:
        """``‖C̄ − H‖²_F = (1/K²) Σ_kl ⟨C_k − H, C_l − H⟩``."""
        Gamma = gram([difference(b, H) for b in self.blocks])
        return float(Gamma.sum()) / len(self) ** 2

    def spread_sq(self) -> float:
        """``Σ_k ‖C_k − C̄‖²_F = tr Γ − 1ᵀΓ1/K``, ``Γ_kl = ⟨C_k − C_1, C_l − C_1⟩``."""
        first = self.blocks[0]
        Gamma = gram([difference(b, first) for b in self.blocks])
        return max(float(Gamma.trace() - Gamma.sum() / len(self)), 0.0)

    def deviations(self, center: KroneckerOperator) -> Tensor:
        """``(‖C_k − center‖_F)_k``."""
        sq = [inner(d, d) for d in (difference(b, center) for b in self.blocks)]
        return torch.tensor(sq, dtype=torch.float64).clamp_min(0).sqrt()

    def norms(self) -> Tensor:
        """``(‖C_k‖_F)_k``."""
        sq = [inner(terms(b), terms(b)) for b in self.blocks]
        return torch.tensor(sq, dtype=torch.float64).clamp_min(0).sqrt()


def fit_scalar(C: KroneckerOperator, B: KroneckerOperator, rtol: float) -> float | None:
    """``c = ⟨C, B⟩/⟨B, B⟩`` if ``‖C − c B‖ ≤ rtol ‖C‖``, else ``None`` (factors)."""
    if layout(C) != layout(B):
        return None
    bb = inner(terms(B), terms(B))
    if bb == 0:
        return None
    c = inner(terms(C), terms(B)) / bb
    residual = float(KroneckerBlocks((C,)).deviations(scaled(B, c))[0])
    return c if residual <= rtol * max(norm(C), 1e-300) else None


def norm(op: KroneckerOperator) -> float:
    """``‖K‖_F = ‖G‖ ‖A‖`` (separate bias: ``√(‖G‖²‖A‖² + ‖G_b‖²)``)."""
    return math.sqrt(max(inner(terms(op), terms(op)), 0.0))


@dataclass(frozen=True)
class DrawMoments:
    """Inner products of ``R`` reference draws ``D_r`` about the mean ``B``.

    Attributes:
        gram: ``Γ_rs = ⟨Y_r, Y_s⟩`` with ``Y_r = D_r − B``, ``(R, R)``.
        along: ``⟨Y_r, B⟩``, ``(R,)``.
        mean_sq: ``⟨B, B⟩``.
    """

    gram: Tensor
    along: Tensor
    mean_sq: float


def draw_moments(
    draws: Tensor,
    input_covariance: Tensor,
    mean: KroneckerOperator,
    bias_draws: Tensor | None = None,
) -> DrawMoments:
    r"""Inner products of draws ``D_r = G_r ⊗ A`` (one ``A``) about ``B = G_B ⊗ A_B``.

    With ``ΔG_r = G_r − G_B`` and ``δA = A − A_B`` (rounding level for MC draws, whose
    ``A`` is type-2 KFAC's), ``Y_r = ΔG_r ⊗ A + G_B ⊗ δA`` and::

        ⟨Y_r, Y_s⟩ = ⟨ΔG_r, ΔG_s⟩‖A‖² + (⟨ΔG_r, G_B⟩ + ⟨ΔG_s, G_B⟩)⟨A, δA⟩
                     + ‖G_B‖²‖δA‖²  (+ ⟨ΔG_b,r, ΔG_b,s⟩ for separate bias),
        ⟨Y_r, B⟩ = ⟨ΔG_r, G_B⟩⟨A, A_B⟩ + ‖G_B‖²⟨δA, A_B⟩  (+ ⟨ΔG_b,r, G_b,B⟩).

    The ``R × R`` matrix ``[⟨ΔG_r, ΔG_s⟩]`` is one product of the ``(R, d_out²)``
    stack with its transpose; ``draws`` is overwritten by ``ΔG``.

    Args:
        draws: ``(R, d_out, d_out)`` gradient factors ``G_r`` (modified in place).
        input_covariance: ``A``, shared by every draw.
        mean: ``B``, type-2 KFAC.
        bias_draws: ``(R, d_out, d_out)`` bias blocks of separate bias (default: the
            draws' ``G_r``, as KFAC's).
    """
    f = mean.factors
    G_B, A_B = _cpu(f.gradient_covariance), _cpu(f.input_covariance)
    A = _cpu(input_covariance)
    if A.shape != A_B.shape or draws.shape[1:] != G_B.shape:
        raise ValueError(
            f"draws with factors {tuple(draws.shape[1:])} ⊗ {tuple(A.shape)}, mean "
            f"{tuple(G_B.shape)} ⊗ {tuple(A_B.shape)}"
        )
    R = draws.shape[0]
    separate = f.bias == "separate"
    if separate and bias_draws is None:
        bias_draws = draws.clone()
    dA = A - A_B
    aa, a_da, da_da = _dot(A, A), _dot(A, dA), _dot(dA, dA)
    a_ab, da_ab = _dot(A, A_B), _dot(dA, A_B)
    gB_sq = _dot(G_B, G_B)
    dG = draws.sub_(G_B).reshape(R, -1)
    dG_gB = dG @ G_B.reshape(-1)
    Gamma = (dG @ dG.T) * aa
    Gamma += (dG_gB[:, None] + dG_gB[None, :]) * a_da + gB_sq * da_da
    along = dG_gB * a_ab + gB_sq * da_ab
    mean_sq = gB_sq * _dot(A_B, A_B)
    if separate:
        assert bias_draws is not None
        Gb = _cpu(mean.bias_block)
        dGb = bias_draws.sub_(Gb).reshape(R, -1)
        Gamma += dGb @ dGb.T
        along += dGb @ Gb.reshape(-1)
        mean_sq += _dot(Gb, Gb)
    return DrawMoments(Gamma, along, mean_sq)


def _dot(X: Tensor, Y: Tensor) -> float:
    return float((X * Y).sum())


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64)


__all__ = [
    "DrawMoments",
    "KroneckerBlocks",
    "KroneckerTerms",
    "difference",
    "draw_moments",
    "fit_scalar",
    "gram",
    "inner",
    "layout",
    "norm",
    "require_same_layout",
    "scaled",
    "terms",
]
