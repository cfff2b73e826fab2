"""The provable equivalences (docs/theory.md §5), driven by the catalogue's claims.

Every (case, layer, claim) of the catalogue becomes one test; nothing is hand-picked.
Positive claims hold to a relative Frobenius error of 1e-10 in float64; negative
claims show a gap of at least 1e-3, so an oracle that always says "equal" fails.
"""

import math

import pytest
import torch

from kfac_oracle.conventions import kronecker_block
from kfac_oracle.reference.ekfac import (
    eigenvalue_vector,
    ekfac,
    ekfac_block,
    kronecker_eigenbasis,
)
from kfac_oracle.reference.exact import curvature_block
from kfac_oracle.reference.kfac import KFACSteps, kfac
from tests.utils import CASES, EXACT_RTOL, NEGATIVE_GAP, assert_close, rel_error

KIND = {"type-2": "ggn", "empirical": "empirical", "mc": "mc"}
MC_SAMPLES, SEED = 3, 7

CLAIMS = [
    (case, layer, claim)
    for case in CASES
    for layer in case.layers
    for claim in case.claims_for(layer)
]
CLAIM_IDS = [f"{case.id}-{layer}-{claim.id}" for case, layer, claim in CLAIMS]


def mc_convergence(problem, layer, kfac_approx, M=400, delta=1e-3):
    """E6 on the reference: the MC gradient factor's mean over M samples vs type-2.

    With X_m the single-sample gradient factors (iid), Chebyshev gives
    P(‖mean − G‖_F ≥ t) ≤ σ²/(M t²); δ = 1e-3, σ² estimated from the samples.
    Returns (error, bound).
    """
    steps = KFACSteps()
    G2 = kfac(problem, "type-2", layers=[layer], kfac_approx=kfac_approx)[
        layer
    ].gradient_covariance
    bias_cols = {layer: True}
    samples = 0
    for stats in steps.statistics(problem, [layer], "mc", bias_cols, M, SEED):
        g = steps.reduce_gradients(stats[layer].gradients, kfac_approx)  # (M, B, S, D)
        g = g.reshape(M, -1, g.shape[-1])
        samples = samples + torch.einsum("mki,mkj->mij", g, g) * M
    mean = samples.mean(0)
    sigma2 = ((samples - mean) ** 2).sum((1, 2)).sum() / (M - 1)
    bound = math.sqrt(sigma2 / (M * delta))
    return (mean - G2).norm().item(), bound


@pytest.mark.parametrize("case, layer, claim", CLAIMS, ids=CLAIM_IDS)
def test_claim(case, layer, claim):
    """The claim holds for the reference KFAC and the exact references."""
    problem = case.build()
    if claim.statement == "kfac":
        factors = kfac(
            problem,
            claim.fisher_type,
            kfac_approx=claim.kfac_approx,
            mc_samples=MC_SAMPLES,
            seed=SEED,
            layers=[layer],
        )
        ours = kronecker_block(factors[layer])
        exact = curvature_block(
            problem, layer, KIND[claim.fisher_type], MC_SAMPLES, SEED
        )
    elif claim.statement == "hessian":
        ours = curvature_block(problem, layer, "hessian")
        exact = curvature_block(problem, layer, "ggn")
    elif claim.statement == "mc_convergence":
        err, bound = mc_convergence(problem, layer, claim.kfac_approx)
        assert err <= bound, f"MC mean off by {err:.3e} > bound {bound:.3e}"
        return
    elif claim.statement == "mc_exact":
        exact = kronecker_block(
            kfac(problem, "type-2", layers=[layer], kfac_approx=claim.kfac_approx)[
                layer
            ]
        )
        for M, seed in ((1, 0), (3, 5)):
            mc = kfac(
                problem,
                "mc",
                [layer],
                kfac_approx=claim.kfac_approx,
                mc_samples=M,
                seed=seed,
            )
            assert_close(kronecker_block(mc[layer]), exact, what=f"M={M}")
        return
    else:
        raise AssertionError(f"unknown statement {claim.statement}")
    err = rel_error(ours, exact)
    if claim.holds:
        assert err <= EXACT_RTOL, f"{claim.id}: relative error {err:.3e}"
    else:
        assert err >= NEGATIVE_GAP, f"{claim.id}: expected a gap, got {err:.3e}"


EKFAC_PARAMS = [
    (case, layer, ft, approx)
    for case in CASES
    for layer in case.layers
    for ft in ("type-2", "empirical", "mc")
    for approx in (("expand",) if case.setting == "none" else ("expand", "reduce"))
]


@pytest.mark.parametrize(
    "case, layer, fisher_type, approx",
    EKFAC_PARAMS,
    ids=[f"{c.id}-{la}-{ft}-{ap}" for c, la, ft, ap in EKFAC_PARAMS],
)
def test_ekfac_diagonal_is_exact_in_kronecker_basis(case, layer, fisher_type, approx):
    """E7: EKFAC's eigenvalues are diag(Qᵀ B Q) of the exact block, any network."""
    problem = case.build()
    f = ekfac(
        problem, fisher_type, kfac_approx=approx, mc_samples=MC_SAMPLES, seed=SEED
    )[layer]
    B = curvature_block(problem, layer, KIND[fisher_type], MC_SAMPLES, SEED)
    Q = kronecker_eigenbasis(f)
    assert_close(Q.T @ Q, torch.eye(Q.shape[1], dtype=Q.dtype), what="Q orthogonal")
    assert_close(eigenvalue_vector(f), torch.diag(Q.T @ B @ Q), what="E7")


EXACT_CLAIMS = [
    (case, layer, claim)
    for case, layer, claim in CLAIMS
    if claim.statement == "kfac" and claim.holds
]


@pytest.mark.parametrize(
    "case, layer, claim",
    EXACT_CLAIMS,
    ids=[f"{c.id}-{la}-{cl.id}" for c, la, cl in EXACT_CLAIMS],
)
def test_ekfac_equals_exact_block_where_kfac_is_exact(case, layer, claim):
    """Where KFAC is exact, B is diagonal in the Kronecker basis, so EKFAC = B."""
    problem = case.build()
    f = ekfac(
        problem,
        claim.fisher_type,
        kfac_approx=claim.kfac_approx,
        mc_samples=MC_SAMPLES,
        seed=SEED,
    )[layer]
    B = curvature_block(problem, layer, KIND[claim.fisher_type], MC_SAMPLES, SEED)
    assert_close(ekfac_block(f), B, what="EKFAC")
