r"""Reference operations on a damped block: inverse products, log-determinants, scores.

Two independent computations of the same quantities (docs/theory.md §10):

- :class:`KroneckerOperations`, what the reference candidate returns: with
  ``A = U_A diag(α) U_Aᵀ`` and ``G = U_G diag(γ) U_Gᵀ``, every convention's damped
  matrix is diagonal in ``U_G ⊗ U_A``, with eigenvalues

      product          γ_i α_j + λ
      mean_eigenvalue  γ_i α_j + λ · mean(γ ⊗ α)
      per_factor, pi   (γ_i + g)(α_j + a),   (a, g) from :func:`~kfac_oracle.damping.
                                             factor_shifts`

  so ``K_λ⁻¹ V``, ``log det K_λ = Σ log`` of them, and ``tr K = (Σ γ)(Σ α)`` cost two
  small eigendecompositions.
- :class:`DenseOperations`, what the ``operations`` checks compare with: a Cholesky
  factorization of the dense damped matrix in float64, with its condition number.

:class:`EigenbasisOperations` does the same as :class:`KroneckerOperations` for a block
given as an orthonormal eigenbasis and eigenvalues (EKFAC: ``Q diag(Λ) Qᵀ``); it
offers ``product`` and ``mean_eigenvalue`` only.

:func:`with_data_scores` adds the data's pairwise scores ``S = G K_λ⁻¹ Gᵀ`` (rows of
``G``: the per-datum gradients) to any of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kfac_oracle.contract import KroneckerFactors, LayerOperations
from kfac_oracle.conventions import joint_to_canonical_permutation
from kfac_oracle.damping import DampingConvention, block_shift, factor_shifts

#: Probe vectors per layer (columns of ``V``).
PROBES = 4
_PROBE_SEED = 2015


def probe_vectors(
    shapes: Mapping[str, object], dtype: torch.dtype, device: object = "cpu"
) -> dict[str, Tensor]:
    """Fixed Gaussian probe vectors ``V`` of shape ``(P, PROBES)`` per layer.

    Deterministic in the layer's position and size, so that the harness and the
    checks draw the same ones.

    Args:
        shapes: ``{layer: LayerShape}`` (anything with a ``size``), in request order.
        dtype: The problem's dtype.
        device: The problem's device.
    """
    out = {}
    for k, (layer, shape) in enumerate(shapes.items()):
        size = int(shape.size)  # type: ignore[attr-defined]
        generator = torch.Generator().manual_seed(_PROBE_SEED + 7919 * k + size)
        V = torch.randn(size, PROBES, generator=generator, dtype=torch.float64)
        out[layer] = V.to(dtype=dtype, device=device)  # type: ignore[call-overload]
    return out


def contract_form(ops: Any) -> LayerOperations:
    """``LayerOperations`` of a reference operations object (its bound methods)."""
    return LayerOperations(
        inverse_product=ops.inverse_product,
        logdet=ops.logdet,
        trace=ops.trace,
        scores=ops.scores,
        diagonal=ops.diagonal,
        eigenvalues=ops.spectrum,
    )


class KroneckerOperations:
    """Operations of ``K = G ⊗ A`` (joint or no bias) under a damping convention.

    Args:
        factors: The layer's factors (``bias`` ``"joint"`` or ``"none"``).
        convention: The damping convention.

    Raises:
        ValueError: For separate-bias factors (operations act on the joint block).
    """

    def __init__(self, factors: KroneckerFactors, convention: DampingConvention | str):
        if factors.bias not in ("joint", "none"):
            raise ValueError(
                f"operations act on the joint block; got bias={factors.bias!r}"
            )
        self.factors = factors
        self.convention = DampingConvention.parse(convention, "damping convention")
        A, G = factors.input_covariance, factors.gradient_covariance
        self.alpha, self.UA = torch.linalg.eigh(A)
        self.gamma, self.UG = torch.linalg.eigh(G)
        d_out, d_a = G.shape[0], A.shape[0]
        self.shape = (d_out, d_a)
        if factors.bias == "joint":
            self.perm = joint_to_canonical_permutation(d_out, d_a - 1)
        else:
            self.perm = torch.arange(d_out * d_a)
        self.perm = self.perm.to(A.device)

    @property
    def size(self) -> int:
        """``P``, the entries of ``[rvec(W), b]``."""
        return self.shape[0] * self.shape[1]

    def damped_eigenvalues(self, damping: float) -> Tensor:
        """Eigenvalues of ``K_λ`` in ``U_G ⊗ U_A``, shape ``(d_out, d_a)``."""
        kfac = self.gamma[:, None] * self.alpha[None, :]
        if self.convention.needs_factors:
            A = self.factors.input_covariance
            G = self.factors.gradient_covariance
            a, g = factor_shifts(self.convention, damping, A, G)
            return (self.gamma[:, None] + g) * (self.alpha[None, :] + a)
        trace = kfac.sum().item()
        return kfac + block_shift(self.convention, damping, trace, self.size)

    def inverse_product(self, V: Tensor, damping: float) -> Tensor:
        """``K_λ⁻¹ V`` for ``V`` of shape ``(P, k)`` (canonical layout)."""
        k = V.shape[1]
        X = torch.empty_like(V)
        X[self.perm] = V
        X = X.reshape(*self.shape, k)
        rotated = torch.einsum("pi,pqk,qj->ijk", self.UG, X, self.UA)
        rotated = rotated / self.damped_eigenvalues(damping)[..., None]
        Y = torch.einsum("ip,pqk,jq->ijk", self.UG, rotated, self.UA)
        return Y.reshape(self.size, k)[self.perm]

    def logdet(self, damping: float) -> Tensor:
        """``log det K_λ``."""
        return self.damped_eigenvalues(damping).log().sum()

    def trace(self) -> Tensor:
        """``tr K = tr G · tr A``."""
        return self.gamma.sum() * self.alpha.sum()

    def scores(self, U: Tensor, V: Tensor, damping: float) -> Tensor:
        """``Uᵀ K_λ⁻¹ V``."""
        return U.T @ self.inverse_product(V, damping)

    def diagonal(self) -> Tensor:
        """``diag K``: ``diag(G ⊗ A) = diag G ⊗ diag A``, canonical layout."""
        A, G = self.factors.input_covariance, self.factors.gradient_covariance
        return torch.outer(G.diagonal(), A.diagonal()).reshape(-1)[self.perm]

    def spectrum(self) -> Tensor:
        """The eigenvalues of ``K``: ``γ_i α_j`` for every pair (ascending)."""
        return torch.outer(self.gamma, self.alpha).reshape(-1).sort().values

    def layer_operations(self) -> LayerOperations:
        """These operations in the contract's form."""
        return contract_form(self)


class SeparateBiasOperations:
    """Operations of the separate-bias block ``blockdiag(G ⊗ A, G_b)``.

    The weight part is diagonal in ``U_G ⊗ U_A`` (eigenvalues ``γ_i α_j``), the bias
    part in the eigenbasis of ``G_b`` (eigenvalues ``β_k``); a block convention
    (``product``, ``mean_eigenvalue``) shifts both by the same ``c``, computed from
    ``tr K = (Σ γ)(Σ α) + Σ β`` and ``P``. Factor conventions are defined on the joint
    block only.

    Args:
        factors: Separate-bias factors (``bias_covariance`` ``None`` means ``G``).
        convention: ``product`` or ``mean_eigenvalue``.

    Raises:
        ValueError: For other factors or a factor convention.
    """

    def __init__(self, factors: KroneckerFactors, convention: DampingConvention | str):
        if factors.bias != "separate":
            raise ValueError(f"expected separate-bias factors, got {factors.bias!r}")
        self.convention = DampingConvention.parse(convention, "damping convention")
        if self.convention.needs_factors:
            raise ValueError(
                f"{self.convention} damping is defined on the joint-bias block only"
            )
        A, G = factors.input_covariance, factors.gradient_covariance
        Gb = G if factors.bias_covariance is None else factors.bias_covariance
        self.factors = factors
        self.alpha, self.UA = torch.linalg.eigh(A)
        self.gamma, self.UG = torch.linalg.eigh(G)
        self.beta, self.UB = torch.linalg.eigh(Gb)
        self.n_weight = G.shape[0] * A.shape[0]

    @property
    def size(self) -> int:
        """``P = d_out · d_in + d_out``."""
        return self.n_weight + self.beta.numel()

    def trace(self) -> Tensor:
        """``tr K = tr G · tr A + tr G_b``."""
        return self.gamma.sum() * self.alpha.sum() + self.beta.sum()

    def _shift(self, damping: float) -> float:
        return block_shift(self.convention, damping, self.trace().item(), self.size)

    def inverse_product(self, V: Tensor, damping: float) -> Tensor:
        """``K_λ⁻¹ V``: weight rows in ``U_G ⊗ U_A``, bias rows in ``G_b``'s basis."""
        c, k, n = self._shift(damping), V.shape[1], self.n_weight
        d_out, d_in = self.gamma.numel(), self.alpha.numel()
        X = V[:n].reshape(d_out, d_in, k)
        rotated = torch.einsum("pi,pqk,qj->ijk", self.UG, X, self.UA)
        rotated = rotated / (self.gamma[:, None] * self.alpha[None, :] + c)[..., None]
        weight = torch.einsum("ip,pqk,jq->ijk", self.UG, rotated, self.UA)
        bias = self.UB @ ((self.UB.T @ V[n:]) / (self.beta + c)[:, None])
        return torch.cat([weight.reshape(n, k), bias])

    def logdet(self, damping: float) -> Tensor:
        """``Σ log(γ_i α_j + c) + Σ log(β_k + c)``."""
        c = self._shift(damping)
        weight = (torch.outer(self.gamma, self.alpha) + c).log().sum()
        return weight + (self.beta + c).log().sum()

    def scores(self, U: Tensor, V: Tensor, damping: float) -> Tensor:
        """``Uᵀ K_λ⁻¹ V``."""
        return U.T @ self.inverse_product(V, damping)

    def diagonal(self) -> Tensor:
        """``[diag G ⊗ diag A, diag G_b]``."""
        A, G = self.factors.input_covariance, self.factors.gradient_covariance
        Gb = G if self.factors.bias_covariance is None else self.factors.bias_covariance
        return torch.cat(
            [torch.outer(G.diagonal(), A.diagonal()).reshape(-1), Gb.diagonal()]
        )

    def spectrum(self) -> Tensor:
        """``γ_i α_j`` and ``β_k``, ascending."""
        values = torch.cat([torch.outer(self.gamma, self.alpha).reshape(-1), self.beta])
        return values.sort().values

    def layer_operations(self) -> LayerOperations:
        """These operations in the contract's form."""
        return contract_form(self)


class EigenbasisOperations(KroneckerOperations):
    """Operations of ``Q diag(Λ) Qᵀ`` (orthonormal ``Q``), block conventions only.

    ``product`` or ``mean_eigenvalue`` damping: ``Q diag(Λ + c) Qᵀ``.

    Args:
        eigenbasis: ``Q`` (columns), in the canonical layout.
        eigenvalues: ``Λ``, in the column order of ``Q``.
        convention: ``product`` or ``mean_eigenvalue``.

    Raises:
        ValueError: For a convention that damps Kronecker factors.
    """

    def __init__(
        self,
        eigenbasis: Tensor,
        eigenvalues: Tensor,
        convention: DampingConvention | str,
    ):
        self.convention = DampingConvention.parse(convention, "damping convention")
        if self.convention.needs_factors:
            raise ValueError(
                f"{self.convention} damping needs Kronecker factors; an eigenbasis "
                "block has none"
            )
        self.Q, self.eigenvalues = eigenbasis, eigenvalues
        self.shape = (eigenvalues.numel(), 1)

    def damped_eigenvalues(self, damping: float) -> Tensor:
        """``Λ + c``, ``c`` the convention's shift."""
        trace = self.eigenvalues.sum().item()
        return self.eigenvalues + block_shift(
            self.convention, damping, trace, self.size
        )

    def inverse_product(self, V: Tensor, damping: float) -> Tensor:
        """``Q diag(1 / (Λ + c)) Qᵀ V``."""
        return self.Q @ ((self.Q.T @ V) / self.damped_eigenvalues(damping)[:, None])

    def trace(self) -> Tensor:
        """``Σ Λ``."""
        return self.eigenvalues.sum()

    def diagonal(self) -> Tensor:
        """``diag(Q diag(Λ) Qᵀ)_i = Σ_j Q_ij² Λ_j``."""
        return (self.Q**2) @ self.eigenvalues

    def spectrum(self) -> Tensor:
        """``Λ``, ascending."""
        return self.eigenvalues.sort().values


def with_data_scores(operations: LayerOperations, gradients: Tensor) -> LayerOperations:
    """``operations`` with ``data_scores(λ) = G K_λ⁻¹ Gᵀ`` from its inverse product.

    Args:
        operations: A layer's operations (``inverse_product`` offered).
        gradients: ``G``, the per-datum gradients ``g_n`` as rows, ``(N, P)``
            (:func:`~kfac_oracle.reference.exact.per_datum_gradients`).
    """
    inverse = operations.inverse_product
    assert inverse is not None

    def data_scores(damping: float) -> Tensor:
        return gradients @ inverse(gradients.T.contiguous(), damping)

    return dataclasses.replace(operations, data_scores=data_scores)


class DenseOperations:
    """Exact operations of a dense symmetric positive definite ``M`` (float64).

    Attributes:
        matrix: ``M``.
        eigenvalues: Its eigenvalues, ascending.
    """

    def __init__(self, matrix: Tensor):
        self.matrix = matrix.to(torch.float64)
        self.eigenvalues = torch.linalg.eigvalsh(self.matrix)
        self._cholesky: Tensor | None = None

    @property
    def cholesky(self) -> Tensor:
        """The lower Cholesky factor of ``M``."""
        if self._cholesky is None:
            self._cholesky = torch.linalg.cholesky(self.matrix)
        return self._cholesky

    @property
    def condition(self) -> float:
        """``κ(M) = λ_max / λ_min`` (``inf`` if ``M`` is singular)."""
        low, high = self.eigenvalues[0].item(), self.eigenvalues[-1].item()
        return high / low if low > 0 else math.inf

    def inverse_product(self, V: Tensor) -> Tensor:
        """``M⁻¹ V``."""
        return torch.cholesky_solve(V.to(torch.float64), self.cholesky)

    def logdet(self) -> float:
        """``log det M = 2 Σ log L_ii``."""
        return 2 * self.cholesky.diagonal().log().sum().item()

    def scores(self, U: Tensor, V: Tensor) -> Tensor:
        """``Uᵀ M⁻¹ V``."""
        return U.to(torch.float64).T @ self.inverse_product(V)


__all__ = [
    "PROBES",
    "DenseOperations",
    "EigenbasisOperations",
    "KroneckerOperations",
    "probe_vectors",
    "with_data_scores",
]
