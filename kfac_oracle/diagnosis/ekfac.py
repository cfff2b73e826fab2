r"""What an EKFAC implementation with a known pitfall returns (docs/theory.md E7, §7).

Reference EKFAC is ``Q diag(Λ) Qᵀ`` with ``Q = U_G ⊗ U_A`` (the eigenvectors of KFAC's
factors, as *columns*) and ``Λ_ij = Σ_{n,v} (U_Gᵀ Γ_{n,v} U_A)_ij²``
(:mod:`kfac_oracle.reference.ekfac`). ``torch.linalg.eigh`` returns eigenvectors as
columns; a library that reads them as rows uses ``Uᵀ`` instead of ``U``. The hypotheses:

- eigenbasis transposed, for ``U_A``, ``U_G`` or both, in the eigenvalue correction
  (``Λ`` measured in the wrong basis), in the reconstruction ``Q diag(Λ) Qᵀ``, or in
  both;
- KFAC's own eigenvalues kept (``G ⊗ A``: no correction).

Each is fitted up to a constant, like the KFAC pitfalls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kfac_oracle.conventions import kronecker_block
from kfac_oracle.diagnosis.pitfalls import Hypothesis
from kfac_oracle.flavours import BiasMode, Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.ekfac import EKFACFactors, ekfac_block
from kfac_oracle.reference.kfac import KFACSteps

Basis = tuple[Tensor, Tensor]


class _LayerGradients:
    """KFAC factors, eigenbases and per-datum statistics of one layer, computed once."""

    def __init__(self, problem: Problem, layer: str, flavour: Flavour):
        steps = KFACSteps()
        self.kfac = steps.factors(problem, flavour, [layer])[layer]
        # row-major copies: torch.kron rejects a mix of row- and column-major inputs
        self.basis: Basis = (
            torch.linalg.eigh(self.kfac.input_covariance).eigenvectors.contiguous(),
            torch.linalg.eigh(self.kfac.gradient_covariance).eigenvectors.contiguous(),
        )
        joint = {layer: self.kfac.bias == BiasMode.JOINT}
        self.stats = [
            (st[layer].inputs, st[layer].gradients)
            for st in steps.statistics(
                problem,
                [layer],
                flavour.fisher_type,
                joint,
                flavour.mc_samples,
                flavour.seed,
            )
        ]

    def block(self, correction: Basis, reconstruction: Basis) -> Tensor:
        """EKFAC with ``Λ`` measured in ``correction``, rebuilt in ``reconstruction``.

        Both are ``(U_A, U_G)``.
        """
        UA, UG = correction
        lam = lam_b = None
        for x, g in self.stats:
            assert g is not None
            gx = torch.einsum("knsi,nsj->knij", g @ UG, x @ UA).square().sum((0, 1))
            gb = (g @ UG).sum(2).square().sum((0, 1))
            lam = gx if lam is None else lam + gx
            lam_b = gb if lam_b is None else lam_b + gb
        assert lam is not None
        separate = self.kfac.bias == BiasMode.SEPARATE
        factors = EKFACFactors(
            input_eigenvectors=reconstruction[0],
            gradient_eigenvectors=reconstruction[1],
            eigenvalues=lam,
            bias=self.kfac.bias,
            bias_eigenvalues=lam_b if separate else None,
        )
        return ekfac_block(factors)


def ekfac_hypotheses(
    problem: Problem, layer: str, flavour: Flavour
) -> list[Hypothesis]:
    """The EKFAC pitfalls: a transposed eigenbasis, or no eigenvalue correction."""
    cache: dict[str, _LayerGradients] = {}

    def layer_gradients() -> _LayerGradients:
        if "g" not in cache:
            cache["g"] = _LayerGradients(problem, layer, flavour)
        return cache["g"]

    def transposed(which: str) -> Basis:
        UA, UG = layer_gradients().basis
        return (
            UA.T.contiguous() if which in ("A", "both") else UA,
            UG.T.contiguous() if which in ("G", "both") else UG,
        )

    def make(which: str, where: str) -> Callable[[], Tensor]:
        def build() -> Tensor:
            right = layer_gradients().basis
            wrong = transposed(which)
            correction = wrong if where in ("correction", "both") else right
            reconstruction = wrong if where in ("reconstruction", "both") else right
            return layer_gradients().block(correction, reconstruction)

        return build

    names = {"A": "U_A", "G": "U_G", "both": "U_A and U_G"}
    places = {
        "both": "the eigenvalue correction and the reconstruction",
        "correction": "the eigenvalue correction only",
        "reconstruction": "the reconstruction Q diag(Λ) Qᵀ only",
    }
    hyps = [
        Hypothesis(
            f"EKFAC eigenbasis transposed ({names[which]} read as rows, not columns) "
            f"in {places[where]}",
            make(which, where),
        )
        for where in places
        for which in names
    ]
    hyps.append(
        Hypothesis(
            "KFAC's eigenvalues kept (no EKFAC eigenvalue correction)",
            lambda: kronecker_block(layer_gradients().kfac),
        )
    )
    return hyps
