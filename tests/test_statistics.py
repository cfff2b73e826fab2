"""Tests of kfac_oracle.statistics: the thresholds, the verdict's parts, false alarms
and power on a small catalogue case, and the zero-variance cases where MC-KFAC is exact.

The 200-seed-set false-alarm measurement over the catalogue is marked ``slow`` and
runs only with ``-m slow`` (about 20 minutes on one core).
"""

import math

import pytest
import torch
from scipy import stats

from kfac_oracle import statistics as st
from kfac_oracle.catalogue import Case, get_case
from kfac_oracle.conventions import kronecker_block
from kfac_oracle.reference.kfac import KFACSteps
from tests.mc_candidates import (
    CappedAt3,
    OneOverMMinusOne,
    Scale5Percent,
    SeedIgnoredRandom,
    TrueLabels,
    independent_mc_kfac,
)

# Synthetic nulls: blocks G ⊗ A with a random G, as MC-KFAC ------------------------


def _synthetic(n, scale=1.0, noise=1.0, seed=0, d_out=3, d_in=4, samples=50):
    """``n`` blocks ``G ⊗ A``, ``G = scale · mean of g gᵀ`` over Gaussian ``g``."""
    g = torch.Generator().manual_seed(1234)
    L = torch.randn(d_out, d_out, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    A = A @ A.T / d_in + torch.eye(d_in, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, samples, d_out, generator=gen, dtype=torch.float64) * noise
    v = z @ L.T
    G = scale * (v.unsqueeze(-1) * v.unsqueeze(-2)).mean(1)
    G = G + (1 - noise**2) * L @ L.T  # keep the mean at L Lᵀ when the noise changes
    B = torch.kron(L @ L.T, A)
    return torch.stack([torch.kron(Gi, A) for Gi in G]), B


# M and the number of Gaussian vectors averaged in G (many: a small spread)
SYNTHETIC_SAMPLES = ((1, 1), (100, 10_000))


@pytest.fixture(scope="module")
def synthetic_nulls():
    nulls = {}
    for M, samples in SYNTHETIC_SAMPLES:
        draws, B = _synthetic(400, seed=10 + M, samples=samples)
        nulls[M] = st.null_model(draws, B, M)
    return nulls


def _synthetic_candidate(K=16, seed=1, **kw):
    return {
        M: _synthetic(K, seed=seed + M, samples=s, **kw)[0]
        for M, s in SYNTHETIC_SAMPLES
    }


def test_ratio_quantile_is_student_t_without_skew():
    for alpha, nu in ((1e-3, 50.0), (1e-9, 400.0)):
        t = st._ratio_quantile(alpha, 0.0, nu)
        assert t == pytest.approx(stats.t.isf(alpha, nu), rel=1e-4)


def test_ratio_quantile_follows_the_skewness():
    base = st._ratio_quantile(1e-9, 0.0, 400.0)
    assert st._ratio_quantile(1e-9, 0.3, 400.0) > base * 1.2
    assert st._ratio_quantile(1e-9, -0.3, 400.0) < base
    # large nu, a gamma variable: the quantile is the standardised gamma quantile
    k = 4 / 0.5**2
    gamma_q = (stats.gamma.isf(1e-6, k) - k) / math.sqrt(k)
    assert st._ratio_quantile(1e-6, 0.5, 1e7) == pytest.approx(gamma_q, rel=1e-3)


def test_frobenius_threshold_is_conservative_for_gaussian_quadratic_forms():
    """Σ λ_i Z_i² exceeds the threshold (in units of tr Σ) at most at the level."""
    gen = torch.Generator().manual_seed(3)
    lam = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)
    null = st.NullModel(
        mc_samples=1,
        mean=torch.eye(2, dtype=torch.float64),
        num_draws=10**9,
        scale_var=1.0,
        scale_skew=0.0,
        scale_kurt=3.0,
        total_var=1.0,
        total_var_var=2 * float((lam**2).sum()),
        frob_sq=float((lam**2).sum()),
        lambda_max=0.6,
        zero_spread=False,
    )
    alpha = 1e-3
    thr = st._frobenius_threshold(alpha, null)
    Q = (torch.randn(10**6, 4, generator=gen, dtype=torch.float64) ** 2 * lam).sum(1)
    assert float((Q > thr).double().mean()) <= alpha


def test_correct_synthetic_candidate_passes_and_mean_consistent_matches(
    synthetic_nulls,
):
    cand = _synthetic_candidate()
    v = st.mc_verdict(cand, synthetic_nulls)
    assert v.passed, v.message
    names = {t.name for t in v.tests}
    assert names == {
        "scale",
        "frobenius",
        "spread_scale",
        "spread_total",
        "spread_pooled",
    }
    # the diagnosis' test with the hypothesis B is the verdict's mean tests
    hyp = {M: n.mean for M, n in synthetic_nulls.items()}
    d = st.mean_consistent(cand, hyp, synthetic_nulls)
    mean_tests = [t for t in v.tests if t.name in ("scale", "frobenius")]

    def key(t):
        return (t.name, t.mc_samples, t.value, t.low, t.high, t.alpha, t.passed)

    assert [key(t) for t in d.tests] == [key(t) for t in mean_tests]


def test_scale_error_fails_and_is_diagnosed_with_its_factor(synthetic_nulls):
    cand = _synthetic_candidate(scale=1.05)
    v = st.mc_verdict(cand, synthetic_nulls)
    assert not v.passed
    assert any(t.name == "scale" and t.mc_samples == 100 for t in v.failures)
    hyp = {M: n.mean for M, n in synthetic_nulls.items()}
    assert not st.mean_consistent(cand, hyp, synthetic_nulls).passed
    c = st.fit_scale(cand[100], synthetic_nulls[100].mean)
    assert c == pytest.approx(1.05, abs=0.01)
    scaled = {M: c * h for M, h in hyp.items()}
    assert st.mean_consistent(cand, scaled, synthetic_nulls, spread_scale=c).passed


def test_spread_too_large_or_too_small_fails(synthetic_nulls):
    for noise, side in ((2.0, "too noisy"), (0.2, "too little")):
        v = st.mc_verdict(_synthetic_candidate(noise=noise), synthetic_nulls)
        spread = [t for t in v.failures if t.name.startswith("spread")]
        assert spread and side in spread[0].detail, v.message


def test_exact_parts(synthetic_nulls):
    cand = _synthetic_candidate()
    bad = {M: c.clone() for M, c in cand.items()}
    bad[1][3, 0, 0] = math.nan
    v = st.mc_verdict(bad, synthetic_nulls)
    assert [t.name for t in v.failures] == ["finite"]
    wrong_shape = {M: c[:, :-1, :-1] for M, c in cand.items()}
    assert not st.mc_verdict(wrong_shape, synthetic_nulls).passed
    ok = st.reproducibility_test(cand[100][0], cand[100][0].clone())
    assert ok.passed
    assert not st.reproducibility_test(cand[100][0], cand[100][1]).passed


def test_zero_spread_null_is_an_exact_comparison():
    B = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    null = st.null_model(B.expand(30, 3, 3), B, 2)
    assert null.zero_spread
    v = st.mc_verdict({2: B.expand(4, 3, 3)}, {2: null})
    assert v.passed and [t.name for t in v.tests] == ["exact"]
    off = B.expand(4, 3, 3) * (1 + 1e-8)
    assert not st.mc_verdict({2: off}, {2: null}).passed


def test_budget():
    alphas = st.allocate([1, 2, 3, 100])
    assert sum(alphas.values()) == pytest.approx(st.FALSE_ALARM / st.SAFETY)
    assert len(alphas) == 8


# A catalogue case: the reference, an independent implementation, wrong ones --------


def _block(problem, layer, M, seed, steps=None):
    f = (steps or KFACSteps()).factors(
        problem, "mc", [layer], kfac_approx="expand", mc_samples=M, seed=seed
    )
    return kronecker_block(f[layer])


@pytest.fixture(scope="module")
def bce_case():
    problem = get_case("mlp_tanh_bce_mean").build()
    layer = "2"
    f = KFACSteps().factors(
        problem, "type-2", [layer], kfac_approx="expand", bias="joint"
    )
    B = kronecker_block(f[layer])
    nulls = {}
    for M, _ in st.PLAN:
        draws = torch.stack(
            [_block(problem, layer, M, s) for s in st.reference_seeds()]
        )
        nulls[M] = st.null_model(draws, B, M)
    return problem, layer, nulls


def _verdict(make, nulls):
    cand = {
        M: torch.stack([make(M, s) for s in st.candidate_seeds(K)]) for M, K in st.PLAN
    }
    top = max(cand)
    return st.mc_verdict(cand, nulls, repeat=(cand[top][0], make(top, 0)))


def test_reference_and_independent_pass(bce_case):
    problem, layer, nulls = bce_case

    def independent(M, s):
        p = problem
        f = independent_mc_kfac(p.model, p.loss_func, p.data, layer, "expand", M, s)
        return kronecker_block(f)

    for make in (lambda M, s: _block(problem, layer, M, s), independent):
        v = _verdict(make, nulls)
        assert v.passed, v.message
        assert not v.gaussian_warning


@pytest.mark.parametrize(
    "wrong, failing",
    [
        (Scale5Percent, "scale"),
        (OneOverMMinusOne, "finite"),
        (CappedAt3, "spread_total"),
        (TrueLabels, "scale"),
        (SeedIgnoredRandom, "reproducible"),
    ],
)
def test_wrong_candidates_fail(bce_case, wrong, failing):
    problem, layer, nulls = bce_case
    steps = wrong()
    v = _verdict(lambda M, s: _block(problem, layer, M, s, steps), nulls)
    assert failing in {t.name for t in v.failures}, v.message


def test_independent_equals_reference_on_the_same_stream():
    """With the reference's seed stream, CE draws the same labels: equal blocks."""
    p = get_case("seq_ce_mean").build()
    for M, seed in ((1, 0), (7, 5)):
        f = independent_mc_kfac(
            p.model, p.loss_func, p.data, "2", "expand", M, seed, False
        )
        ref = _block(p, "2", M, seed)
        assert ((kronecker_block(f) - ref).norm() / ref.norm()).item() < 1e-12


# Zero-variance cases: MC-KFAC equals type-2 KFAC for every M and seed ---------------


def _zero_logit_problem(loss, out, reduction, seq=False):
    """A tanh MLP whose last Linear is zero: CE with two classes at equal logits, or
    BCE at logit 0, where every sampled gradient's outer product is the Hessian."""
    model = [("Linear", 4, 5), ("Tanh",), ("Linear", 5, out)]
    if seq and loss == "CrossEntropyLoss":
        model.append(("Permute", 0, 2, 1))
    case = Case(
        id="zero_logits",
        family="mc_exact",
        model=model,
        input_shape=(3, 4) if seq else (4,),
        loss=loss,
        reduction=reduction,
        batch_sizes=(3, 2),
        targets="binary",
        setting="expand" if seq else "none",
        seed=7,
    )
    problem = case.build()
    with torch.no_grad():
        problem.model[2].weight.zero_()
        problem.model[2].bias.zero_()
    return problem


ZERO_VARIANCE = [
    ("CrossEntropyLoss", 2, False),
    ("BCEWithLogitsLoss", 1, False),
    ("CrossEntropyLoss", 2, True),
    ("BCEWithLogitsLoss", 1, True),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss, out, seq", ZERO_VARIANCE)
def test_zero_variance_mc_equals_type2(loss, out, seq, reduction):
    p = _zero_logit_problem(loss, out, reduction, seq)
    f = KFACSteps().factors(p, "type-2", ["2"], kfac_approx="expand", bias="joint")
    B = kronecker_block(f["2"])
    assert B.norm() > 0
    for M, seed in ((1, 0), (2, 3), (3, 11), (17, 5)):
        C = _block(p, "2", M, seed)
        assert ((C - B).norm() / B.norm()).item() <= 1e-10
        ind = independent_mc_kfac(p.model, p.loss_func, p.data, "2", "expand", M, seed)
        assert ((kronecker_block(ind) - B).norm() / B.norm()).item() <= 1e-10
    # every MC scale error is an exact mismatch there
    for wrong, M, factor in ((Scale5Percent, 4, 1.05), (OneOverMMinusOne, 3, 1.5)):
        C = _block(p, "2", M, 1, wrong())
        assert ((C - factor * B).norm() / B.norm()).item() <= 1e-10


def test_zero_variance_verdict_is_exact():
    p = _zero_logit_problem("CrossEntropyLoss", 2, "mean")
    B = kronecker_block(KFACSteps().factors(p, "type-2", ["2"])["2"])
    plan = ((1, 4), (3, 4))
    nulls = {
        M: st.null_model(torch.stack([_block(p, "2", M, s) for s in range(20)]), B, M)
        for M, _ in plan
    }
    assert all(n.zero_spread for n in nulls.values())
    good = {M: torch.stack([_block(p, "2", M, s) for s in range(K)]) for M, K in plan}
    assert st.mc_verdict(good, nulls).passed
    steps = Scale5Percent()
    bad = {
        M: torch.stack([_block(p, "2", M, s, steps) for s in range(K)]) for M, K in plan
    }
    v = st.mc_verdict(bad, nulls)
    assert [t.name for t in v.failures] == ["exact", "exact"]


# The 200-seed-set measurement -------------------------------------------------------


@pytest.mark.slow
def test_no_false_alarms_over_many_seed_sets():
    """No false alarm for the reference and an independent MC-KFAC over 50 seed sets
    on every MC target (the full 200-set measurement: benchmarks/mc_calibration.py,
    results in docs/monte-carlo.md)."""
    from benchmarks.mc_calibration import Target, false_alarms, targets

    torch.set_num_threads(1)
    rows = false_alarms(
        [Target(*t) for t in targets()], sets=50, pools=5, log=lambda *a: None
    )
    failed = [(r[0], r[1], r[3]) for r in rows if r[3]]
    assert not failed, failed
    assert len(rows) >= 2 * 9
