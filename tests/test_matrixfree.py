"""Matrix-free comparisons: Kronecker operators, the factor-level distance, probes.

Small blocks are forced through the matrix-free path (``DENSE_LIMIT = 0``) so that its
verdicts can be compared with the dense ones: equal for the reference and for every
planted pitfall caught by agreement and exactness.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfac_oracle import operators
from kfac_oracle.catalogue import load_cases
from kfac_oracle.checks.matrixfree import (
    chernoff_chi2,
    compare_operators,
    kronecker_distance,
    miss_probability,
)
from kfac_oracle.contract import KroneckerFactors, MatVecBlock
from kfac_oracle.conventions import kronecker_block
from kfac_oracle.operators import (
    ExactOperator,
    KroneckerOperator,
    MaskedOperator,
    ProbedOperator,
    gaussian_probes,
)
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.reference.exact import curvature_block
from kfac_oracle.reference.kfac import kfac
from kfac_oracle.runner.run import run
from kfac_oracle.runner.validate import LayerShape, materialize, validate
from tests import mutants as m


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
    return X @ X.T / n


def factors(bias, d_out=3, d_in=4, seed=0, Gb=None):
    d_a = d_in + 1 if bias == "joint" else d_in
    return KroneckerFactors(spd(d_a, seed), spd(d_out, seed + 1), bias, Gb)


def module(d_out=3, d_in=4, bias=True):
    return nn.Linear(d_in, d_out, bias=bias).double()


@pytest.mark.parametrize("bias", ["joint", "separate", "none"])
def test_kronecker_operator_applies_the_canonical_block(bias):
    f = factors(bias, Gb=spd(3, 9) if bias == "separate" else None)
    op = KroneckerOperator(f, 3, 4)
    K = kronecker_block(f)
    V = gaussian_probes(op.size, 5)
    assert op.size == K.shape[0]
    torch.testing.assert_close(op.matmat(V), K @ V, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", ["joint", "separate", "none"])
@pytest.mark.parametrize("scale", [1.0, 1.0 + 1e-6, 3.0])
def test_factor_level_distance_equals_the_dense_one(bias, scale):
    Gb = spd(3, 9) if bias == "separate" else None
    f1 = factors(bias, seed=0, Gb=Gb)
    # the same product with a scalar moved between the factors, perturbed by scale
    f2 = KroneckerFactors(
        f1.input_covariance * 2.5,
        f1.gradient_covariance / 2.5 * scale,
        bias,
        Gb,
    )
    diff, ref = kronecker_distance(
        KroneckerOperator(f1, 3, 4), KroneckerOperator(f2, 3, 4)
    )
    K1, K2 = kronecker_block(f1), kronecker_block(f2)
    assert math.isclose(ref, float(K2.norm()), rel_tol=1e-12)
    assert math.isclose(
        diff, float((K1 - K2).norm()), rel_tol=1e-6, abs_tol=1e-14 * ref
    )
    if scale == 1.0:
        assert diff <= 1e-14 * ref  # no cancellation: equal products give ~0


def test_chernoff_bound_is_a_bound_and_decays():
    # P(chi2_k / k <= t) for k=16, t=0.1 by simulation is far below the bound
    assert chernoff_chi2(1.0, 16) == 1.0
    assert chernoff_chi2(0.01, 16) < 1e-12
    assert miss_probability(16, 10, False) < miss_probability(16, 10, True) < 1e-4
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(200_000, 4, generator=g).pow(2).mean(1)
    for t in (0.2, 0.5, 2.0, 3.0):
        empirical = float(
            (samples <= t).double().mean() if t < 1 else (samples >= t).double().mean()
        )
        assert empirical <= chernoff_chi2(t, 4)


LAYER = module()


def _compare(candidate, reference, bias="joint"):
    return compare_operators(candidate, reference, bias, LAYER, "layer", 1e-10)


def test_reference_passes_and_mutants_fail_at_factor_level():
    f = factors("joint")
    ref = KroneckerOperator(f, 3, 4)
    assert _compare(KroneckerOperator(f, 3, 4), ref).passed
    scaled = KroneckerFactors(f.input_covariance, f.gradient_covariance * 1.001)
    out = _compare(KroneckerOperator(scaled, 3, 4), ref)
    assert not out.passed and "exact, from the Kronecker factors" in out.message
    assert out.error == pytest.approx(1e-3, rel=1e-6)
    assert out.diagnosis and "constant factor 1.001" in out.diagnosis


def test_transposed_factors_fail():
    """A ⊗ G instead of G ⊗ A (a cvec/rvec mix-up) on a square layer."""
    square = nn.Linear(4, 4, bias=False).double()
    A, G = spd(4, 0), spd(4, 1)
    ref = KroneckerOperator(KroneckerFactors(A, G, "none"), 4, 4)
    swapped = KroneckerOperator(KroneckerFactors(G, A, "none"), 4, 4)
    out = compare_operators(swapped, ref, "none", square, "layer", 1e-10)
    assert not out.passed
    dense = kronecker_block(KroneckerFactors(G, A, "none")) - kronecker_block(
        ref.factors
    )
    assert out.error == pytest.approx(
        float(dense.norm() / kronecker_block(ref.factors).norm()), rel=1e-8
    )


def _probed(K, bias="joint"):
    """A MatVecBlock of a dense K, read as the harness reads a large one."""
    shape = LayerShape(3, 4, True)
    block = MatVecBlock(lambda v: K @ v, K.shape[0])
    plain = materialize({"0": block}, {"0": shape}, torch.float64, "cpu")
    return plain, shape


def test_matvec_block_is_probed_and_compared(monkeypatch):
    monkeypatch.setattr(operators, "DENSE_LIMIT", 0)
    f = factors("joint")
    K = kronecker_block(f)
    ref = KroneckerOperator(f, 3, 4)
    for candidate_K, passes in ((K, True), (K * 1.01, False)):
        plain, shape = _probed(candidate_K)
        assert plain["0"].kind == "probed"
        result = validate(plain, {"0": shape}, torch.float64, "cpu")
        op = result.blocks["0"]
        assert isinstance(op, ProbedOperator)
        out = _compare(op, ref)
        assert out.passed is passes
        if not passes:
            assert out.diagnosis and "constant factor 1.01" in out.diagnosis
        assert "16 Gaussian probes" in out.message and "probability" in out.message


def test_probed_cvec_layout_is_converted(monkeypatch):
    monkeypatch.setattr(operators, "DENSE_LIMIT", 0)
    from kfac_oracle.conventions import cvec_to_rvec_permutation

    f = factors("joint")
    K = kronecker_block(f)
    perm = cvec_to_rvec_permutation(3, 4, True)
    Kc = torch.empty_like(K)
    Kc[perm.unsqueeze(1), perm.unsqueeze(0)] = K  # rvec = cvec[perm][:, perm]
    shape = LayerShape(3, 4, True)
    plain = materialize(
        {"0": MatVecBlock(lambda v: Kc @ v, K.shape[0], "cvec")},
        {"0": shape},
        torch.float64,
        "cpu",
    )
    result = validate(plain, {"0": shape}, torch.float64, "cpu")
    assert _compare(result.blocks["0"], KroneckerOperator(f, 3, 4)).passed


def test_separate_bias_masks_the_exact_cross_terms():
    f = factors("joint")
    K = kronecker_block(f)
    n_w = 12
    masked = MaskedOperator(operators.DenseOperator(K), n_w)
    V = gaussian_probes(K.shape[0], 3)
    Km = K.clone()
    Km[:n_w, n_w:] = 0
    Km[n_w:, :n_w] = 0
    torch.testing.assert_close(masked.matmat(V), Km @ V)


def _deep_linear():
    (case,) = load_cases("deep_linear_d2_bias_mse_mean")
    return case


def test_exact_operator_matches_the_dense_block_and_kfac_in_an_exact_case():
    case = _deep_linear()
    problem = case.build()
    layer = case.layers[0]
    exact = ExactOperator(problem, layer, "ggn")
    dense = curvature_block(problem, layer, "ggn")
    V = gaussian_probes(exact.size, 3)
    torch.testing.assert_close(exact.matmat(V), dense @ V, rtol=1e-10, atol=1e-12)
    f = kfac(problem, "type-2", layers=[layer])[layer]
    mod = problem.model.get_submodule(layer)
    d_out, d_in = mod.weight.shape
    out = compare_operators(
        KroneckerOperator(f, d_out, d_in), exact, f.bias, mod, "E2", 1e-10
    )
    assert out.passed, out.message
    wrong = KroneckerFactors(f.input_covariance, f.gradient_covariance / 2, f.bias)
    out = compare_operators(
        KroneckerOperator(wrong, d_out, d_in), exact, f.bias, mod, "E2", 1e-10
    )
    assert not out.passed and out.error == pytest.approx(0.5, rel=0.5)


SMALL = (
    "deep_linear_d2_bias_mse_mean,conv_stack_pool_mse_mean,seq_reduce_meanpool_mse_mean"
)
DETERMINISTIC = [m.MSEHalf, m.SwappedOrder, m.BiasFirst, m.ExpandNormInReduce]


def _verdicts(impl, monkeypatch, limit):
    monkeypatch.setattr(operators, "DENSE_LIMIT", limit)
    records = run(impl, SMALL, families=["agreement", "exactness"], isolation="none")
    return {r.id: r.status for r in records}, records


@pytest.mark.parametrize("impl", [ReferenceKFAC, *DETERMINISTIC], ids=lambda c: c.name)
def test_matrix_free_verdicts_equal_the_dense_ones(impl, monkeypatch):
    dense, dense_records = _verdicts(impl(), monkeypatch, operators.DENSE_LIMIT)
    free, free_records = _verdicts(impl(), monkeypatch, 0)
    assert free == dense
    assert all("matrix-free" not in r.message for r in dense_records)
    assert any("Gaussian probes" in r.message for r in free_records)
    if impl is ReferenceKFAC:  # factors: exact at factor level in agreement
        assert any("Kronecker factors" in r.message for r in free_records)
        assert set(dense.values()) == {"passed"}
    else:
        assert "failed" in dense.values()


def test_dense_only_checks_are_unsupported_on_large_blocks(monkeypatch):
    monkeypatch.setattr(operators, "DENSE_LIMIT", 0)
    records = run(
        ReferenceKFAC(),
        "deep_linear_d2_bias_mse_mean",
        families=["operations"],
        isolation="none",
    )
    assert records and all(r.status == "unsupported" for r in records)
    assert "exceed the dense limit of 0 parameters" in records[0].message


# MC convergence (MSE, expand), zero variance (two-class CE at equal logits).
MC_SMALL = "mlp_tanh_mse_mean,mc_zero_variance_ce2_mean"
STATISTICAL = ["mc", "invariance"]


def _statistical(impl, monkeypatch, limit):
    monkeypatch.setattr(operators, "DENSE_LIMIT", limit)
    records = run(impl, MC_SMALL, families=STATISTICAL, isolation="none")
    return {r.id: r for r in records}


def _same_records(dense, free):
    assert dense.keys() == free.keys()
    for key, d in dense.items():
        f = free[key]
        assert f.status == d.status, (key, d.message, f.message)
        if d.error is None or not math.isfinite(d.error):
            continue
        assert f.error == pytest.approx(d.error, rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize(
    "impl", [ReferenceKFAC, m.MCNoOneOverM, m.StaleParameters], ids=lambda c: c.name
)
def test_mc_and_invariance_verdicts_matrix_free_equal_the_dense_ones(impl, monkeypatch):
    """The MC statistics from factors and the invariances by operators."""
    dense = _statistical(impl(), monkeypatch, operators.DENSE_LIMIT)
    free = _statistical(impl(), monkeypatch, 0)
    _same_records(dense, free)
    statuses = {r.status for r in free.values()}
    assert "unsupported" not in statuses
    ran = {r.check for r in free.values()}
    assert {"mc_converges_expand", "mc_variance_expand", "mc_exact_expand"} <= ran
    if impl is ReferenceKFAC:
        assert statuses == {"passed"}
    else:
        assert "failed" in statuses


def test_mc_checks_need_factors_for_blocks_too_large_to_densify(monkeypatch):
    """A large MC block known by products only cannot enter the statistics."""
    from tests.candidates import Dense

    matvec = type("MatVecReference", (Dense,), {"form": "matvec"})
    monkeypatch.setattr(operators, "DENSE_LIMIT", 0)
    records = run(
        matvec(),
        "mlp_tanh_mse_mean",
        checks="mc_converges*",
        isolation="none",
    )
    assert records and all(r.status == "unsupported" for r in records)
    assert "not Kronecker factors (ProbedOperator)" in records[0].message


@pytest.mark.slow
@pytest.mark.parametrize("impl", m.MUTANTS, ids=lambda c: c.name)
def test_every_mutant_gets_the_same_verdicts_matrix_free(impl, monkeypatch):
    dense, _ = _verdicts(impl(), monkeypatch, operators.DENSE_LIMIT)
    free, _ = _verdicts(impl(), monkeypatch, 0)
    assert free == dense


def test_caches_keep_one_result_per_case_with_large_blocks(monkeypatch):
    from kfac_oracle.runner.run import Session

    monkeypatch.setattr(operators, "DENSE_LIMIT", 0)
    session = Session.start(ReferenceKFAC(), isolation="none")
    try:
        records = run(
            None,
            "deep_linear_d2_bias_mse_mean",
            families=["agreement"],
            session=session,
        )
        assert {r.status for r in records} == {"passed"}
        kept = [k for k in session.caller._cache if k.case == records[0].case]
        assert len(kept) == 1
        assert len(session.references._blocks) == 1
    finally:
        session.close()


def test_large_factor_semi_definiteness_by_cholesky():
    from kfac_oracle.errors import CandidateError
    from kfac_oracle.runner.validate import CHOLESKY_FROM, validate_matrix

    n = CHOLESKY_FROM + 10
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, n // 2, generator=g, dtype=torch.float64)
    M = X @ X.T  # semi-definite, rank n/2
    validate_matrix("A", M, torch.float64, "cpu")
    v = torch.randn(n, generator=g, dtype=torch.float64)
    bad = M - 1e-3 * M.norm() * torch.outer(v, v) / v.dot(v)
    with pytest.raises(CandidateError, match="not positive semi-definite"):
        validate_matrix("A", bad, torch.float64, "cpu")


def test_a_matrix_free_failure_says_which_factor_differs():
    from kfac_oracle.checks.matrixfree import factor_localisation
    from kfac_oracle.contract import KroneckerFactors
    from kfac_oracle.operators import KroneckerOperator

    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = A @ A.T
    G = torch.randn(3, 3, generator=g, dtype=torch.float64)
    G = G @ G.T
    G2 = G + 0.1 * torch.eye(3, dtype=torch.float64)
    ref = KroneckerOperator(KroneckerFactors(A, G), 3, 4)
    other_g = KroneckerOperator(KroneckerFactors(2 * A, G2 / 2), 3, 4)
    message = factor_localisation(other_g, ref, 1e-10)
    assert "input factor A agrees up to scale" in message
    assert "gradient factor G" in message
    both = KroneckerOperator(KroneckerFactors(A + torch.eye(5).double(), G2), 3, 4)
    assert "both factors differ" in factor_localisation(both, ref, 1e-10)
