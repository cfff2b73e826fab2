"""The Monte-Carlo statistics from Kronecker factors equal the dense computation.

Small random factors, every bias treatment: inner products, differences, the null model
of reference draws and every test of the verdict agree with the dense blocks to
rounding (1e-12 relative); a perturbed factor is seen.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kfac_oracle import kronecker_statistics as ks
from kfac_oracle import statistics as st
from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.conventions import kronecker_block
from kfac_oracle.operators import KroneckerOperator

D_OUT, D_IN = 3, 4
BIASES = ["joint", "separate", "none"]


def spd(n, gen, scale=1.0):
    X = torch.randn(n, n + 2, generator=gen, dtype=torch.float64)
    return scale * X @ X.T / n


def operator(bias, G, A, Gb=None):
    return KroneckerOperator(KroneckerFactors(A, G, bias, Gb), D_OUT, D_IN)


def dense(op):
    return kronecker_block(op.factors)


def a_dim(bias):
    return D_IN + 1 if bias == "joint" else D_IN


def close(x, y, rtol=1e-12):
    return abs(x - y) <= rtol * max(abs(x), abs(y), 1e-300)


@pytest.mark.parametrize("bias", BIASES)
def test_inner_products_and_differences_equal_the_dense_ones(bias):
    gen = torch.Generator().manual_seed(1)
    n = a_dim(bias)
    ops = [
        operator(bias, spd(D_OUT, gen), spd(n, gen), spd(D_OUT, gen)) for _ in range(4)
    ]
    Ks = [dense(op) for op in ops]
    for i, (a, Ka) in enumerate(zip(ops, Ks)):
        for b, Kb in zip(ops[i:], Ks[i:]):
            assert close(ks.inner(ks.terms(a), ks.terms(b)), float((Ka * Kb).sum()))
            d = ks.difference(a, b)
            assert close(ks.inner(d, d), float(((Ka - Kb) ** 2).sum()))
        assert close(ks.norm(a), float(Ka.norm()))
    Gamma = ks.gram([ks.terms(op) for op in ops])
    dense_gram = torch.stack([K.reshape(-1) for K in Ks])
    assert torch.allclose(Gamma, dense_gram @ dense_gram.T, rtol=1e-12, atol=0)


def test_a_difference_of_nearly_equal_blocks_keeps_its_digits():
    """``(G₁ − G₂) ⊗ A₁ + G₂ ⊗ (A₁ − A₂)``: no cancellation of the shared digits."""
    gen = torch.Generator().manual_seed(2)
    G, A = spd(D_OUT, gen), spd(D_IN + 1, gen)
    E = spd(D_OUT, gen) * 1e-9
    a, b = operator("joint", G + E, A), operator("joint", G, A)
    d = ks.difference(a, b)
    E = a.factors.gradient_covariance - G  # exact (Sterbenz): the stored difference
    exact = float((torch.kron(E, A) ** 2).sum())
    assert close(ks.inner(d, d), exact, 1e-12)
    ta, tb = ks.terms(a), ks.terms(b)
    naive = ks.inner(ta, ta) - 2 * ks.inner(ta, tb) + ks.inner(tb, tb)
    assert not close(naive, exact, 1e-3)


def draws_about(bias, gen, R=40, spread=0.3):
    """R draws ``G_r ⊗ A`` about ``B = G_B ⊗ A_B`` (``A_B`` = ``A`` to rounding)."""
    n = a_dim(bias)
    A = spd(n, gen)
    A_B = A + 1e-15 * spd(n, gen)
    G_B = spd(D_OUT, gen)
    G = torch.stack([G_B + spread * spd(D_OUT, gen) for _ in range(R)])
    G -= G.mean(0) - G_B
    return G, A, operator(bias, G_B, A_B)


NULL_FIELDS = (
    "scale_var",
    "scale_skew",
    "scale_kurt",
    "total_var",
    "total_var_var",
    "frob_sq",
    "lambda_max",
)


@pytest.mark.parametrize("bias", BIASES)
def test_the_null_model_from_factors_is_the_dense_one(bias):
    gen = torch.Generator().manual_seed(3)
    G, A, B = draws_about(bias, gen)
    D = torch.stack([dense(operator(bias, g, A)) for g in G])
    want = st.null_model(D, dense(B), 7)
    got = st.kronecker_null_model(G.clone(), A, B, 7)
    for name in NULL_FIELDS:
        assert close(getattr(got, name), getattr(want, name)), name
    assert (got.num_draws, got.mc_samples, got.zero_spread) == (40, 7, False)


def test_the_null_model_sees_a_perturbed_draw():
    gen = torch.Generator().manual_seed(4)
    G, A, B = draws_about("joint", gen)
    D = torch.stack([dense(operator("joint", g, A)) for g in G])
    want = st.null_model(D, dense(B), 7)
    G[5, 0, 0] += 1e-6
    got = st.kronecker_null_model(G, A, B, 7)
    assert not all(close(getattr(got, n), getattr(want, n)) for n in NULL_FIELDS)


def test_zero_spread_draws_are_recognised_from_factors():
    gen = torch.Generator().manual_seed(5)
    _, A, B = draws_about("joint", gen)
    G = B.factors.gradient_covariance.expand(30, D_OUT, D_OUT).clone()
    assert st.kronecker_null_model(G, A, B, 1).zero_spread


def candidate(bias, gen, K, scale=1.0, spread=0.3, A=None, G_B=None):
    n = a_dim(bias)
    A = spd(n, gen) if A is None else A
    return [
        operator(bias, scale * (G_B + spread * spd(D_OUT, gen) - spread), A)
        for _ in range(K)
    ]


def nulls_for(bias, seed):
    """Dense and Kronecker null models at M = 1 and 5 from the same draws."""
    gen = torch.Generator().manual_seed(seed)
    dense_nulls, kron_nulls, means = {}, {}, {}
    for M in (1, 5):
        G, A, B = draws_about(bias, gen, R=60, spread=0.5 / math.sqrt(M))
        D = torch.stack([dense(operator(bias, g, A)) for g in G])
        dense_nulls[M] = st.null_model(D, dense(B), M)
        kron_nulls[M] = st.kronecker_null_model(G, A, B, M)
        means[M] = (A, B)
    return dense_nulls, kron_nulls, means


def candidate_blocks(bias, means, gen, scale=1.0):
    out = {}
    for M, (A, B) in means.items():
        G_B = B.factors.gradient_covariance
        spread = 0.5 / math.sqrt(M)
        out[M] = [
            operator(bias, scale * (G_B + spread * (spd(D_OUT, gen) - torch.eye(3))), A)
            for _ in range(8)
        ]
    return out


def same_verdict(dense_verdict, kron_verdict, rtol=1e-12):
    assert [t.name for t in dense_verdict.tests] == [t.name for t in kron_verdict.tests]
    for a, b in zip(dense_verdict.tests, kron_verdict.tests):
        assert a.passed == b.passed, (a.detail, b.detail)
        assert close(a.value, b.value, rtol), (a.detail, b.detail)
        assert close(a.high, b.high, 1e-9), (a.detail, b.detail)  # root finding


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_every_test_of_the_verdict_equals_the_dense_one(bias, scale):
    dense_nulls, kron_nulls, means = nulls_for(bias, 6)
    gen = torch.Generator().manual_seed(7)
    ops = candidate_blocks(bias, means, gen, scale)
    blocks = {M: torch.stack([dense(o) for o in ops[M]]) for M in ops}
    want = st.mc_verdict(blocks, dense_nulls)
    got = st.mc_verdict(ops, kron_nulls)
    same_verdict(want, got)
    assert got.passed == want.passed
    hyp_dense = {M: 1.1 * dense_nulls[M].mean for M in blocks}
    hyp_kron = {M: st.scaled(kron_nulls[M].mean, 1.1) for M in ops}
    same_verdict(
        st.mean_consistent(blocks, hyp_dense, dense_nulls, 1.1),
        st.mean_consistent(ops, hyp_kron, kron_nulls, 1.1),
    )
    for M in ops:
        assert close(
            st.fit_scale(ops[M], kron_nulls[M].mean),
            st.fit_scale(blocks[M], dense_nulls[M].mean),
        )


def test_a_scaled_candidate_fails_from_factors():
    dense_nulls, kron_nulls, means = nulls_for("joint", 8)
    gen = torch.Generator().manual_seed(9)
    ops = candidate_blocks("joint", means, gen, 2.0)
    verdict = st.mc_verdict(ops, kron_nulls)
    assert not verdict.passed
    assert "scale" in {t.name for t in verdict.failures}


def test_a_perturbed_candidate_factor_changes_the_statistics():
    dense_nulls, kron_nulls, means = nulls_for("joint", 10)
    gen = torch.Generator().manual_seed(11)
    ops = candidate_blocks("joint", means, gen)
    blocks = {M: torch.stack([dense(o) for o in ops[M]]) for M in ops}
    f = ops[5][0].factors
    G = f.gradient_covariance.clone()
    G[1, 2] += 1e-7
    G[2, 1] += 1e-7
    ops[5][0] = KroneckerOperator(dataclasses.replace(f, gradient_covariance=G), 3, 4)
    want = st.mc_verdict(blocks, dense_nulls)
    got = st.mc_verdict(ops, kron_nulls)
    with pytest.raises(AssertionError):
        same_verdict(want, got, 1e-12)


def test_kronecker_blocks_of_another_layout_fail_the_shape_test():
    _, kron_nulls, means = nulls_for("joint", 12)
    gen = torch.Generator().manual_seed(13)
    ops = candidate_blocks("joint", means, gen)
    A = spd(D_IN, gen)
    ops[1] = [operator("separate", o.factors.gradient_covariance, A) for o in ops[1]]
    verdict = st.mc_verdict(ops, kron_nulls)
    assert "shape" in {t.name for t in verdict.failures}


def test_zero_spread_blocks_must_equal_the_mean_from_factors():
    gen = torch.Generator().manual_seed(14)
    _, A, B = draws_about("joint", gen)
    G = B.factors.gradient_covariance.expand(30, D_OUT, D_OUT).clone()
    null = st.kronecker_null_model(G, A, B, 1)
    good = [operator("joint", B.factors.gradient_covariance, A) for _ in range(4)]
    bad = [operator("joint", 1.01 * B.factors.gradient_covariance, A)] * 4
    assert all(t.passed for t in st.mean_tests(good, B, null, 1e-9))
    (result,) = st.mean_tests(bad, B, null, 1e-9)
    assert result.name == "exact" and not result.passed
