r"""Reference EKFAC (George et al. 2018): eigenvalue-corrected KFAC, theory E7.

KFAC's factors ``A = U_A diag(α) U_Aᵀ`` and ``G = U_G diag(γ) U_Gᵀ`` define the
Kronecker eigenbasis ``Q = U_G ⊗ U_A`` (rvec). EKFAC keeps ``Q`` and replaces KFAC's
eigenvalues ``γ ⊗ α`` by the exact second moments of the per-datum gradients in that
basis:

    Λ_ij = Σ_{n,v} (U_Gᵀ Γ_{n,v} U_A)_ij²,   Γ_{n,v} = Σ_s g_{n,s,v} ã_{n,s}ᵀ,

with ``g`` the layer-output gradients of the flavour's backpropagated vectors
(:mod:`kfac_oracle.reference.kfac`, already carrying ``√R``) and ``Γ_{n,v}`` the datum's
weight gradient summed over shared positions. Since the exact block of the flavour is
``B = Σ_{n,v} rvec(Γ) rvec(Γ)ᵀ``, ``Λ = diag(Qᵀ B Q)`` for *any* network (E7), and EKFAC
``= Q diag(Λ) Qᵀ`` equals ``B`` wherever KFAC is exact (then ``B`` is diagonal in
``Q``). Bias: joint uses ``ã = [a; 1]``; separate adds ``Λ_b = Σ (U_Gᵀ Σ_s g)²``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kfac_oracle.conventions import joint_to_canonical_permutation
from kfac_oracle.flavours import BiasMode, Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.kfac import KFACSteps


@dataclass
class EKFACFactors:
    """EKFAC for one layer.

    Attributes:
        input_eigenvectors: ``U_A`` (columns), ``(D_in', D_in')``.
        gradient_eigenvectors: ``U_G``, ``(D_out, D_out)``.
        eigenvalues: ``Λ`` for the weight (joint: over ``[W | b]``), ``(D_out, D_in')``.
        bias: ``"joint"``, ``"separate"`` or ``"none"``.
        bias_eigenvalues: ``Λ_b`` with ``bias="separate"``, ``(D_out,)``.
    """

    input_eigenvectors: Tensor
    gradient_eigenvectors: Tensor
    eigenvalues: Tensor
    bias: str
    bias_eigenvalues: Tensor | None = None


def kronecker_eigenbasis(factors: EKFACFactors) -> Tensor:
    """``Q`` in the canonical ``[rvec(W), b]`` layout, one column per eigenvalue.

    Column order matches :func:`eigenvalue_vector`.
    """
    UA, UG = factors.input_eigenvectors, factors.gradient_eigenvectors
    Q = torch.kron(UG, UA)
    if factors.bias == "joint":
        perm = joint_to_canonical_permutation(UG.shape[0], UA.shape[0] - 1)
        return Q[perm]
    if factors.bias == "separate":
        return torch.block_diag(Q, UG)
    return Q


def eigenvalue_vector(factors: EKFACFactors) -> Tensor:
    """``Λ`` flattened in the column order of :func:`kronecker_eigenbasis`."""
    lam = factors.eigenvalues.reshape(-1)
    if factors.bias == "separate":
        assert factors.bias_eigenvalues is not None
        lam = torch.cat([lam, factors.bias_eigenvalues])
    return lam


def ekfac_block(factors: EKFACFactors) -> Tensor:
    """The dense EKFAC block ``Q diag(Λ) Qᵀ`` over ``[rvec(W), b]``."""
    Q = kronecker_eigenbasis(factors)
    return (Q * eigenvalue_vector(factors)) @ Q.T


def ekfac(
    problem: Problem,
    flavour: Flavour | str | None = None,
    layers: Sequence[str] | None = None,
    **fields: object,
) -> dict[str, EKFACFactors]:
    """Reference EKFAC per layer (formulas in the module docstring).

    The eigenbasis comes from the KFAC factors of the flavour's ``kfac_approx``; the
    eigenvalue correction uses the exact per-datum gradients (summed over shared
    positions) of its ``fisher_type`` with the same MC samples as KFAC. Arguments as
    for :func:`kfac_oracle.reference.kfac.kfac`.
    """
    flavour = Flavour.of(flavour, **fields)
    if not flavour.fisher_type.info.backpropagates:
        raise ValueError(f"EKFAC needs gradients; {flavour.fisher_type} has none")
    steps = KFACSteps()
    kfac_factors = steps.factors(problem, flavour, layers)
    layers = list(kfac_factors)
    bases = {}
    for name, f in kfac_factors.items():
        UA = torch.linalg.eigh(f.input_covariance).eigenvectors
        UG = torch.linalg.eigh(f.gradient_covariance).eigenvectors
        bases[name] = (UA, UG)
    bias_columns = {name: f.bias == BiasMode.JOINT for name, f in kfac_factors.items()}
    lam: dict[str, Tensor] = {}
    lam_b: dict[str, Tensor] = {}
    for stats in steps.statistics(
        problem,
        layers,
        flavour.fisher_type,
        bias_columns,
        flavour.mc_samples,
        flavour.seed,
    ):
        for name, st in stats.items():
            UA, UG = bases[name]
            x = st.inputs @ UA  # (B, S, D_in')
            g = st.gradients @ UG  # (K, B, S, D_out)
            rotated = torch.einsum("knsi,nsj->knij", g, x)
            _add(lam, name, rotated.square().sum((0, 1)))
            if kfac_factors[name].bias == BiasMode.SEPARATE:
                _add(lam_b, name, g.sum(2).square().sum((0, 1)))
    return {
        name: EKFACFactors(
            input_eigenvectors=bases[name][0],
            gradient_eigenvectors=bases[name][1],
            eigenvalues=lam[name],
            bias=kfac_factors[name].bias,
            bias_eigenvalues=lam_b.get(name),
        )
        for name in layers
    }


def _add(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
    sums[name] = value if name not in sums else sums[name] + value
