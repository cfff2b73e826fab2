"""The registry of Kronecker approximations the oracle has a reference for.

An :class:`Approximation` names what a candidate computes (``capabilities
["approximation"]``; KFAC when absent) and gives the checks everything that depends on
it: the reference blocks of a flavour, which fisher types it defines, which layers have
no unique answer, and whether the Monte-Carlo convergence theorem applies. The checks
ask the registry; they never branch on an approximation's name.

Adding an approximation (say KFOC) means one reference module and one
:func:`register` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from kfac_oracle.conventions import kronecker_block
from kfac_oracle.errors import Unsupported
from kfac_oracle.flavours import FisherType, Flavour
from kfac_oracle.operators import block_size, kronecker_or_dense, too_large
from kfac_oracle.problem import Problem
from kfac_oracle.reference.ekfac import ekfac, ekfac_block
from kfac_oracle.reference.kfac import KFACSteps


class Approximation:
    """KFAC: ``G ⊗ A`` per layer (docs/theory.md §4).

    Attributes:
        name: The capability value, e.g. ``"kfac"``.
        title: How messages name its reference, e.g. ``"reference KFAC"``.
        mc_convergence: Whether MC results converge to the type-2 block of the same
            approximation (E6), so that the Monte-Carlo checks apply.
    """

    name = "kfac"
    title = "reference KFAC"
    mc_convergence = True
    #: The block is ``G ⊗ A`` of the reference factors (so factor damping applies).
    kronecker_product = True

    def supports(self, fisher_type: str) -> bool:
        """Whether the approximation is defined for this fisher type."""
        return True

    def unsupported_reason(self, fisher_type: str) -> str:
        """Why :meth:`supports` is false for ``fisher_type``."""
        return f"{self.name} is not defined for fisher_type {fisher_type!r}"

    def blocks(
        self, problem: Problem, flavour: Flavour, layers: Sequence[str]
    ) -> dict[str, Tensor]:
        """Canonical reference blocks ``{layer: block}`` of a flavour."""
        factors = KFACSteps().factors(problem, flavour, layers)
        model = problem.model
        return {
            name: kronecker_or_dense(f, model.get_submodule(name))
            for name, f in factors.items()
        }

    def ambiguous(
        self, problem: Problem, flavour: Flavour, layers: Sequence[str]
    ) -> set[str]:
        """Layers whose result is not unique (then no comparison is meaningful)."""
        return set()

    def transposed_eigenbasis(
        self, problem: Problem, flavour: Flavour, layers: Sequence[str]
    ) -> dict[str, Tensor]:
        """The blocks rebuilt with each factor's eigenbasis transposed (a pitfall).

        ``A = U_A diag(α) U_Aᵀ`` becomes ``U_Aᵀ diag(α) U_A``, likewise ``G``.
        """
        factors = KFACSteps().factors(problem, flavour, layers)
        out = {}
        for name, f in factors.items():
            swapped = []
            for M in (f.input_covariance, f.gradient_covariance):
                ev, U = torch.linalg.eigh(M)
                swapped.append((U.T * ev) @ U)
            out[name] = kronecker_block(
                dataclasses.replace(
                    f, input_covariance=swapped[0], gradient_covariance=swapped[1]
                )
            )
        return out


class EKFACApproximation(Approximation):
    """EKFAC (George et al. 2018): KFAC's eigenbasis, exact eigenvalues (E7).

    Where ``A`` or ``G`` has a repeated eigenvalue the eigenbasis, and with it EKFAC,
    is not unique: such layers are :meth:`ambiguous`.
    """

    name = "ekfac"
    title = "reference EKFAC"
    mc_convergence = False
    kronecker_product = False

    def supports(self, fisher_type: str) -> bool:
        """EKFAC needs gradients: no forward-only flavour."""
        return FisherType.parse(fisher_type) is not FisherType.FORWARD_ONLY

    def unsupported_reason(self, fisher_type: str) -> str:
        """EKFAC has no forward-only flavour."""
        return "EKFAC has no forward-only flavour"

    def blocks(
        self, problem: Problem, flavour: Flavour, layers: Sequence[str]
    ) -> dict[str, Tensor]:
        """Dense EKFAC blocks ``Q diag(Λ) Qᵀ``.

        Raises:
            Unsupported: For a block too large to densify (no EKFAC operator yet).
        """
        for name in layers:
            size = block_size(problem.model.get_submodule(name))
            if too_large(size):
                raise Unsupported(
                    f"layer {name!r}: the EKFAC reference is dense and its block "
                    f"({size} parameters) too large to densify"
                )
        factors = ekfac(problem, flavour, layers)
        return {name: ekfac_block(f) for name, f in factors.items()}

    def transposed_eigenbasis(
        self, problem: Problem, flavour: Flavour, layers: Sequence[str]
    ) -> dict[str, Tensor]:
        """``Q' diag(Λ) Q'ᵀ`` with ``Q'`` built from ``U_Aᵀ`` and ``U_Gᵀ``."""
        out = {}
        for name, f in ekfac(problem, flavour, layers).items():
            swapped = dataclasses.replace(
                f,
                input_eigenvectors=f.input_eigenvectors.T,
                gradient_eigenvectors=f.gradient_eigenvectors.T,
            )
            out[name] = ekfac_block(swapped)
        return out

    def ambiguous(
        self, problem: Problem, flavour: Flavour, layers: Sequence[str]
    ) -> set[str]:
        """Layers whose KFAC factors have (numerically) repeated eigenvalues."""
        factors = KFACSteps().factors(problem, flavour, layers)
        return {name for name, f in factors.items() if _repeated_eigenvalue(f)}


def _repeated_eigenvalue(factors, rtol: float = 1e-8) -> bool:
    """Whether ``A`` or ``G`` has (numerically) repeated eigenvalues."""
    for M in (factors.input_covariance, factors.gradient_covariance):
        ev = torch.linalg.eigvalsh(M)
        gaps = ev[1:] - ev[:-1]
        if len(gaps) and gaps.min() <= rtol * ev.abs().max():
            return True
    return False


_REGISTRY: dict[str, Approximation] = {}


def register(approximation: Approximation) -> Approximation:
    """Add an approximation to the registry (by its ``name``)."""
    _REGISTRY[approximation.name] = approximation
    return approximation


def approximation(name: str) -> Approximation:
    """The registered approximation ``name``."""
    return _REGISTRY[name]


def approximation_names() -> tuple[str, ...]:
    """Names of every registered approximation."""
    return tuple(_REGISTRY)


register(Approximation())
register(EKFACApproximation())

__all__ = [
    "Approximation",
    "EKFACApproximation",
    "approximation",
    "approximation_names",
    "register",
]
