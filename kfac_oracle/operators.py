r"""Curvature blocks too large to densify, as linear operators on ``[rvec(W), b]``.

A block of ``P`` parameters has ``P²`` entries: beyond :data:`DENSE_LIMIT` the oracle
never builds it and works with products instead (docs/theory.md §3 conventions):

- :class:`KroneckerOperator`: ``(G ⊗ A) rvec(V) = rvec(G V Aᵀ)`` for ``V`` the
  ``(d_out, d_in)`` weight view (joint bias: ``[V | v_b]`` against ``Ã``; separate:
  ``G V Aᵀ`` and ``G_b v_b``), ``O(d_out² d_in + d_out d_in²)`` per product;
- :class:`DenseOperator`: a dense matrix (a candidate's ``DenseBlock``);
- :class:`ProbedOperator`: a candidate's ``MatVecBlock`` known only by its products
  with the oracle's probe vectors (computed where the candidate runs);
- :class:`ExactOperator`: an exact curvature block (GGN, empirical Fisher, ...)
  restricted to one module's parameters, by JVP/VJP over the data
  (:class:`~kfac_oracle.reference.exact.CurvatureOperator`);
- :class:`MaskedOperator`: weight-bias cross terms removed (``bias="separate"``).

Every operator has ``size`` (``P``) and ``matmat(V)`` for ``V`` of shape ``(P, k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.conventions import kronecker_block, weight_shape_2d

#: Blocks with more parameters than this are compared matrix-free (``P² · 8`` bytes
#: of a float64 block: 128 MiB at the limit).
DENSE_LIMIT = 4096
#: Gaussian probe vectors per matrix-free comparison.
PROBES = 16
#: Seed of the probes (fixed: verdicts are deterministic).
PROBE_SEED = 20240917


def block_size(module: Any) -> int:
    """``P``: the entries of a module's ``[weight, bias]``."""
    d_out, d_in = weight_shape_2d(module)
    has_bias = getattr(module, "bias", None) is not None
    return d_out * d_in + (d_out if has_bias else 0)


def too_large(size: int) -> bool:
    """Whether a block of ``size`` parameters is compared matrix-free."""
    return size > DENSE_LIMIT


def gaussian_probes(
    size: int,
    count: int = PROBES,
    dtype: torch.dtype = torch.float64,
    device: Any = "cpu",
    seed: int = PROBE_SEED,
) -> Tensor:
    """``count`` probe vectors ``z ~ N(0, I_P)`` as columns ``(P, count)`` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    Z = torch.randn(size, count, generator=generator, dtype=torch.float64)
    return Z.to(dtype=dtype, device=device)


@dataclass
class KroneckerOperator:
    """``G ⊗ A`` (with its bias treatment) applied without forming it.

    Attributes:
        factors: The factors; ``bias`` is ``"joint"``, ``"separate"`` or ``"none"``.
        d_out: Rows of the weight's 2-D view.
        d_in: Columns of the weight's 2-D view.
    """

    factors: KroneckerFactors
    d_out: int
    d_in: int

    @property
    def size(self) -> int:
        """``P`` of the canonical block (no bias entries for ``bias="none"``)."""
        n_w = self.d_out * self.d_in
        return n_w if self.factors.bias == "none" else n_w + self.d_out

    @property
    def bias_block(self) -> Tensor:
        """``G_b`` of ``bias="separate"`` (``bias_covariance``, default ``G``)."""
        f = self.factors
        return f.gradient_covariance if f.bias_covariance is None else f.bias_covariance

    def matmat(self, V: Tensor) -> Tensor:
        """``K V`` for columns ``V`` of shape ``(P, k)`` in canonical layout.

        Computed in the wider of the factors' and ``V``'s dtypes (a float32 block
        applied to float64 probes is applied exactly).
        """
        A, G = self.factors.input_covariance, self.factors.gradient_covariance
        dtype = torch.promote_types(A.dtype, V.dtype)
        A, G, V = A.to(dtype), G.to(dtype), V.to(dtype)
        d_out, d_in, k = self.d_out, self.d_in, V.shape[1]
        n_w = d_out * d_in
        W = V[:n_w].T.reshape(k, d_out, d_in)
        if self.factors.bias == "joint":
            Wb = torch.cat([W, V[n_w:].T.unsqueeze(-1)], dim=-1)
            out = G @ Wb @ A.T
            weight, bias = out[..., :d_in], out[..., d_in]
            return torch.cat([weight.reshape(k, n_w), bias], dim=1).T
        weight = (G @ W @ A.T).reshape(k, n_w)
        if self.factors.bias == "none":
            return weight.T
        bias = V[n_w:].T @ self.bias_block.to(dtype).T
        return torch.cat([weight, bias], dim=1).T

    def dense(self) -> Tensor:
        """The dense block (small blocks and tests only)."""
        return kronecker_block(self.factors)


@dataclass
class DenseOperator:
    """A dense block as an operator."""

    matrix: Tensor

    @property
    def size(self) -> int:
        """``P``."""
        return int(self.matrix.shape[0])

    def matmat(self, V: Tensor) -> Tensor:
        """``M V`` (in the wider of the two dtypes)."""
        dtype = torch.promote_types(self.matrix.dtype, V.dtype)
        return self.matrix.to(dtype) @ V.to(dtype)


@dataclass
class ProbedOperator:
    """An operator known only by its products ``K Z`` with fixed probes ``Z``.

    Attributes:
        probes: ``Z``, ``(P, k)``, canonical layout.
        products: ``K Z``, ``(P, k)``, canonical layout.
    """

    probes: Tensor
    products: Tensor

    @property
    def size(self) -> int:
        """``P``."""
        return int(self.probes.shape[0])

    def matmat(self, V: Tensor) -> Tensor:
        """``K V`` for ``V`` equal to the stored probes (or a subset of columns).

        Raises:
            ValueError: For vectors other than the probes.
        """
        if V.shape == self.probes.shape and torch.equal(V, self.probes):
            return self.products
        raise ValueError("a probed operator is known on its probe vectors only")


class ExactOperator:
    """An exact curvature block of one module, by JVP/VJP (never densified).

    Args:
        problem: Model, loss and data.
        layer: The module's name.
        kind: ``"ggn"``, ``"empirical"``, ``"mc"``, ``"hessian"``.
    """

    def __init__(self, problem: Any, layer: str, kind: str):
        from kfac_oracle.reference.exact import (
            CurvatureOperator,
            module_parameter_names,
        )

        names = module_parameter_names(problem.model, layer)
        self.operator = CurvatureOperator(problem, kind, names)
        self.kind = kind

    @property
    def size(self) -> int:
        """``P``."""
        return self.operator.shape[0]

    def matmat(self, V: Tensor) -> Tensor:
        """One pass over the data per column of ``V`` (in the problem's dtype)."""
        return self.operator.matmat(V)


@dataclass
class MaskedOperator:
    """``operator`` with its weight-bias cross terms removed (``bias="separate"``).

    ``[K_ww V_w; K_bb V_b]``: the weight and bias parts of ``V`` are applied apart.
    """

    operator: Any
    n_weight: int

    @property
    def size(self) -> int:
        """``P``."""
        return int(self.operator.size)

    def matmat(self, V: Tensor) -> Tensor:
        """Two products: the weight part alone, then the bias part alone."""
        n = self.n_weight
        Vw, Vb = V.clone(), V.clone()
        Vw[n:] = 0
        Vb[:n] = 0
        out_w, out_b = self.operator.matmat(Vw), self.operator.matmat(Vb)
        return torch.cat([out_w[:n], out_b[n:]])


BlockOperator = (
    KroneckerOperator | DenseOperator | ProbedOperator | ExactOperator | MaskedOperator
)
OPERATOR_TYPES = (
    KroneckerOperator,
    DenseOperator,
    ProbedOperator,
    ExactOperator,
    MaskedOperator,
)


def is_operator(block: object) -> bool:
    """Whether ``block`` is an operator rather than a dense tensor."""
    return isinstance(block, OPERATOR_TYPES)


def kronecker_or_dense(factors: KroneckerFactors, module: nn.Module) -> Any:
    """The canonical block of factors: dense when small, else a Kronecker operator."""
    d_out, d_in = weight_shape_2d(module)
    op = KroneckerOperator(factors, d_out, d_in)
    return op if too_large(op.size) else kronecker_block(factors)


def exact_or_dense(problem: Any, layer: str, kind: str) -> Any:
    """The exact block of ``layer``: dense when small, else an :class:`ExactOperator`.

    Small blocks come from :func:`~kfac_oracle.reference.exact.curvature_block`.
    """
    from kfac_oracle.reference.exact import curvature_block

    if too_large(block_size(problem.model.get_submodule(layer))):
        return ExactOperator(problem, layer, kind)
    return curvature_block(problem, layer, kind)


def layer_sizes(case: Any) -> dict[str, int]:
    """``{layer: P}`` of a case's layers (cached on the case)."""
    cached = case.__dict__.get("_block_sizes")
    if cached is None:
        model = case.build_model()
        cached = {n: block_size(model.get_submodule(n)) for n in case.layers}
        case.__dict__["_block_sizes"] = cached
    return cached


def dense_only_reason(case: Any, layer: str | None) -> str | None:
    """Why a check that needs dense blocks cannot run on ``layer`` (or the case).

    ``None`` when every block concerned is small enough to densify.
    """
    sizes = layer_sizes(case)
    names = list(sizes) if layer is None else [layer]
    large = {n: sizes[n] for n in names if too_large(sizes[n])}
    if not large:
        return None
    listed = ", ".join(f"{n!r} ({p} parameters)" for n, p in list(large.items())[:3])
    more = f" and {len(large) - 3} more" if len(large) > 3 else ""
    return (
        f"the check needs dense blocks; {listed}{more} exceed the dense limit of "
        f"{DENSE_LIMIT} parameters (only matrix-free checks run on such blocks)"
    )


def keep_one_result(case: Any) -> bool:
    """Whether caches keep one result per case only (it has a matrix-free block)."""
    return any(too_large(p) for p in layer_sizes(case).values())


__all__ = [
    "DENSE_LIMIT",
    "OPERATOR_TYPES",
    "PROBES",
    "PROBE_SEED",
    "BlockOperator",
    "DenseOperator",
    "ExactOperator",
    "KroneckerOperator",
    "MaskedOperator",
    "ProbedOperator",
    "block_size",
    "dense_only_reason",
    "exact_or_dense",
    "gaussian_probes",
    "is_operator",
    "keep_one_result",
    "kronecker_or_dense",
    "layer_sizes",
    "too_large",
]
