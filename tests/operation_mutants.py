"""Candidates for the ``operations`` checks: a reference EKFAC and planted mistakes.

Each mutant is the reference with one mistake in its damped operations; the tests
require the ``operations`` checks to catch it with the diagnosis in
``expected_diagnosis``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from kfac_oracle.contract import (
    FULL_CAPABILITIES,
    OPERATION_CAPABILITIES,
    DenseBlock,
    KFACRequest,
)
from kfac_oracle.damping import factor_shifts
from kfac_oracle.flavours import BiasMode, Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.reference.ekfac import (
    eigenvalue_vector,
    ekfac,
    ekfac_block,
    kronecker_eigenbasis,
)
from kfac_oracle.reference.exact import per_datum_gradients
from kfac_oracle.reference.operations import (
    EigenbasisOperations,
    KroneckerOperations,
    with_data_scores,
)


def _caps(*conventions: str) -> dict:
    return {**FULL_CAPABILITIES, **OPERATION_CAPABILITIES, "damping": set(conventions)}


def operations_mutant(operations_cls, name, conventions, diagnosis):
    """A ReferenceKFAC whose operations are ``operations_cls``."""
    return type(
        name,
        (ReferenceKFAC,),
        {
            "name": name,
            "operations_class": operations_cls,
            "capabilities": _caps(*conventions),
            "expected_diagnosis": diagnosis,
        },
    )


class _PerFactorAsProduct(KroneckerOperations):
    """Declares ``product`` but damps each factor by √λ."""

    def damped_eigenvalues(self, damping):
        root = math.sqrt(damping)
        return (self.gamma[:, None] + root) * (self.alpha[None, :] + root)


class _InputFactorOnly(KroneckerOperations):
    """Declares ``per_factor`` but damps ``A`` only."""

    def damped_eigenvalues(self, damping):
        A, G = self.factors.input_covariance, self.factors.gradient_covariance
        a, _ = factor_shifts(self.convention, damping, A, G)
        return self.gamma[:, None] * (self.alpha[None, :] + a)


class _Undamped(KroneckerOperations):
    """Ignores λ."""

    def damped_eigenvalues(self, damping):
        return self.gamma[:, None] * self.alpha[None, :]


class _DampedTwice(KroneckerOperations):
    """Adds λ in the optimizer and again in the preconditioner."""

    def damped_eigenvalues(self, damping):
        return super().damped_eigenvalues(2 * damping)


class _PiAsPerFactor(KroneckerOperations):
    """Declares π-damping but uses π = 1."""

    def damped_eigenvalues(self, damping):
        root = math.sqrt(damping)
        return (self.gamma[:, None] + root) * (self.alpha[None, :] + root)


class ReferenceEKFAC(ReferenceKFAC):
    """The reference EKFAC as a candidate: dense blocks, eigenbasis operations."""

    name = "reference-ekfac"
    capabilities = {
        **FULL_CAPABILITIES,
        **OPERATION_CAPABILITIES,
        "approximation": {"ekfac"},
        "fisher_type": {"type-2", "mc", "empirical"},
        "bias": {"joint"},
        "damping": {"product", "mean_eigenvalue"},
    }
    transposed = False

    def compute(self, request: KFACRequest):
        problem = Problem(
            request.model, request.loss_func, request.data, check_outputs=False
        )
        flavour = Flavour(
            request.fisher_type,
            request.kfac_approx,
            BiasMode.JOINT,
            request.mc_samples,
            request.seed,
        )
        factors = ekfac(problem, flavour, list(request.layers))
        if request.operations is None:
            return {name: DenseBlock(ekfac_block(f)) for name, f in factors.items()}
        out = {}
        for name, f in factors.items():
            if self.transposed:
                f = dataclasses.replace(
                    f,
                    input_eigenvectors=f.input_eigenvectors.T,
                    gradient_eigenvectors=f.gradient_eigenvectors.T,
                )
            ops = EigenbasisOperations(
                kronecker_eigenbasis(f),
                eigenvalue_vector(f),
                request.operations.convention,
            )
            out[name] = ops.layer_operations()
            if "data_scores" in request.operations.operations:
                out[name] = with_data_scores(
                    out[name], per_datum_gradients(problem, name)
                )
        return out


class TransposedEigenbasis(ReferenceEKFAC):
    """EKFAC whose damped inverse uses ``U_Aᵀ`` and ``U_Gᵀ`` as eigenbases."""

    name = "ekfac-transposed-eigenbasis"
    transposed = True
    expected_diagnosis = "transposed eigenbasis"


class _DiagonalCvec(KroneckerOperations):
    """The diagonal of ``A ⊗ G`` in the joint rvec order (a cvec/rvec mix-up)."""

    def diagonal(self):
        A, G = self.factors.input_covariance, self.factors.gradient_covariance
        return torch.outer(A.diagonal(), G.diagonal()).reshape(-1)[self.perm]


class _EigenvaluesSummed(KroneckerOperations):
    """The eigenvalues of the Kronecker *sum* ``γ_i + α_j`` instead of ``γ_i α_j``."""

    def spectrum(self):
        return (self.gamma[:, None] + self.alpha[None, :]).reshape(-1)


class _DiagonalScaled(KroneckerOperations):
    """The diagonal of ``K`` times the data count ``N`` (a sum for a mean)."""

    scale = 3.0

    def diagonal(self):
        return self.scale * super().diagonal()


#: Mistakes in the undamped operations: (candidate, check that must fail).
SPECTRAL_MUTANTS = [
    (
        operations_mutant(_DiagonalCvec, "diagonal-cvec", ("product",), ""),
        "op_diagonal",
    ),
    (
        operations_mutant(_EigenvaluesSummed, "eigenvalues-summed", ("product",), ""),
        "op_eigenvalues",
    ),
    (
        operations_mutant(
            _DiagonalScaled, "diagonal-times-3", ("product",), "a constant factor 3"
        ),
        "op_diagonal",
    ),
]

OPERATION_MUTANTS = [
    operations_mutant(
        _PerFactorAsProduct,
        "per-factor-declared-product",
        ("product",),
        "the per_factor convention",
    ),
    operations_mutant(
        _InputFactorOnly,
        "damping-on-A-only",
        ("per_factor",),
        "one factor only: A damped, G not",
    ),
    operations_mutant(
        _Undamped, "undamped-inverse", ("product",), "the undamped block"
    ),
    operations_mutant(
        _DampedTwice, "damping-twice", ("product",), "damping applied twice"
    ),
    operations_mutant(
        _PiAsPerFactor, "pi-without-pi", ("pi",), "the per_factor convention"
    ),
]


class _DataScoresMutant(ReferenceKFAC):
    """The reference whose ``data_scores`` are post-processed by :meth:`wrong`."""

    capabilities = _caps("product", "per_factor")

    def compute(self, request: KFACRequest):
        out = super().compute(request)
        if request.operations is None:
            return out
        return {
            name: dataclasses.replace(
                ops,
                data_scores=lambda lam, f=ops.data_scores: self.wrong(f(lam), request),
            )
            for name, ops in out.items()
        }

    def wrong(self, S, request):
        raise NotImplementedError


class GradientsOfReducedLoss(_DataScoresMutant):
    """Gradients of ``R·ℓ_n`` (the reduced loss per datum): scores times ``R²``."""

    name = "data-scores-of-reduced-loss"
    expected_diagnosis = "= R² (gradients of R·ℓ_n"

    def wrong(self, S, request):
        return request.reduction_factor**2 * S


class DataReversed(_DataScoresMutant):
    """Data points numbered from the last to the first."""

    name = "data-scores-reversed"
    expected_diagnosis = "data points in another order"

    def wrong(self, S, request):
        return S.flip(0).flip(1)


#: Mistakes in the data scores (``op_data_scores`` fails, the rest passes).
DATA_SCORES_MUTANTS = [GradientsOfReducedLoss, DataReversed]
