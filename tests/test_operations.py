"""The damping conventions, the reference operations and the ``operations`` checks."""

import dataclasses
import math

import pytest
import torch

from kfac_oracle.capabilities import Capabilities
from kfac_oracle.contract import (
    OPERATION_CAPABILITIES,
    KroneckerFactors,
    LayerOperations,
)
from kfac_oracle.damping import DampingConvention, damped_block, pi_factor
from kfac_oracle.errors import CapabilityError
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.runner.run import Session, run
from tests.operation_mutants import (
    DATA_SCORES_MUTANTS,
    OPERATION_MUTANTS,
    SPECTRAL_MUTANTS,
    ReferenceEKFAC,
    TransposedEigenbasis,
)
from tests.utils import CASES

BY_ID = {c.id: c for c in CASES}
# small cases whose type-2 KFAC blocks are nonsingular (the undamped inverse exists)
# and whose factors have distinct eigenvalues (EKFAC is unique)
NONSINGULAR = "seq_bce_soft_mean"
FAST = [NONSINGULAR, "deep_linear_d2_bias_mse_mean", "cnn_tanh_ce_mean"]


def _records(impl, case_ids, checks=None):
    session = Session.start(impl, isolation="none")
    cases = [BY_ID[c] for c in case_ids]
    return run(None, cases, checks=checks, families=["operations"], session=session)


# -- the conventions -------------------------------------------------------------


def test_worked_example_of_the_readme():
    """A = diag(4, 1), G = diag(1, 1), no bias, λ = 0.25 (README, docs §10)."""
    A = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    G = torch.eye(2, dtype=torch.float64)
    f = KroneckerFactors(A, G, "none")
    K = torch.kron(G, A)
    lam = 0.25
    eig = {
        c: torch.linalg.eigvalsh(damped_block(c, lam, K, f)) for c in DampingConvention
    }
    assert pi_factor(A, G) == pytest.approx(math.sqrt(2.5))
    expected = {
        "product": [1.25, 1.25, 4.25, 4.25],
        "per_factor": [1.5 * 1.5, 1.5 * 1.5, 1.5 * 4.5, 1.5 * 4.5],
        "mean_eigenvalue": [1.625, 1.625, 4.625, 4.625],
    }
    for c, values in expected.items():
        assert eig[DampingConvention(c)].tolist() == pytest.approx(values)
    pi = math.sqrt(2.5)
    g, a = 0.5 / pi, 0.5 * pi
    pi_values = sorted([(1 + g) * (1 + a), (1 + g) * (4 + a)] * 2)
    assert eig[DampingConvention.PI].tolist() == pytest.approx(pi_values)
    assert pi_values[0] == pytest.approx(2.3568, abs=1e-4)


def test_conventions_differ_and_coincide_where_they_should():
    torch.manual_seed(0)
    X = torch.randn(3, 3, dtype=torch.float64)
    A = X @ X.T
    G = torch.eye(2, dtype=torch.float64) * 3
    f = KroneckerFactors(A, G, "none")
    K = torch.kron(G, A)
    blocks = {c: damped_block(c, 0.5, K, f) for c in DampingConvention}
    for c in DampingConvention:
        for d in DampingConvention:
            if c is not d:
                assert not torch.allclose(blocks[c], blocks[d]), (c, d)
    # with equal mean eigenvalues of A and G, π = 1 and pi equals per_factor
    A1 = A / (A.trace() / 3)
    f1 = KroneckerFactors(A1, torch.eye(2, dtype=torch.float64), "none")
    K1 = torch.kron(f1.gradient_covariance, A1)
    assert torch.allclose(
        damped_block("pi", 0.3, K1, f1), damped_block("per_factor", 0.3, K1, f1)
    )


def test_factor_conventions_need_factors_and_reject_bad_input():
    K = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs the Kronecker factors"):
        damped_block("pi", 0.1, K)
    with pytest.raises(ValueError, match=">= 0"):
        damped_block("product", -1.0, K)
    with pytest.raises(ValueError, match="product, per_factor, pi, mean_eigenvalue"):
        damped_block("tikhonov", 0.1, K)


# -- capabilities ----------------------------------------------------------------


def test_operations_capabilities_are_validated():
    with pytest.raises(
        CapabilityError, match="allowed: inverse, logdet, trace, scores"
    ):
        Capabilities.from_mapping(
            {"operations": {"inverse_product"}, "damping": {"pi"}}
        )
    with pytest.raises(CapabilityError, match="allowed: product, per_factor, pi"):
        Capabilities.from_mapping({"operations": {"inverse"}, "damping": {"tikhonov"}})
    with pytest.raises(CapabilityError, match="no 'damping' convention"):
        Capabilities.from_mapping({"operations": {"logdet"}})
    caps = Capabilities.from_mapping({"operations": {"trace"}})
    assert caps.operations == {"trace"} and caps.damping is None


def test_without_operations_the_checks_are_unsupported():
    records = _records(ReferenceKFAC(), [NONSINGULAR])
    assert records and {r.status for r in records} == {"unsupported"}
    by_check = {r.check: r.message for r in records}
    assert "capabilities['operations']" in by_check["op_inverse"]


# -- the reference ---------------------------------------------------------------


def test_reference_passes_every_operation_check():
    records = _records(ReferenceKFAC(operations=True), FAST)
    checks = {r.check for r in records}
    assert {
        "op_inverse",
        "op_logdet",
        "op_scores",
        "op_data_scores",
        "op_trace",
        "op_spd",
    } <= checks
    assert any(c.startswith("op_exact_") for c in checks)
    bad = [(r.id, r.status, r.message) for r in records if r.status != "passed"]
    assert not bad, bad


@pytest.mark.slow
def test_reference_passes_every_operation_check_on_the_catalogue():
    session = Session.start(ReferenceKFAC(operations=True), isolation="none")
    records = run(None, CASES, families=["operations"], session=session)
    bad = [(r.id, r.status, r.message) for r in records if r.status != "passed"]
    assert not bad, bad


def test_reference_ekfac_passes_and_factor_conventions_are_unsupported():
    impl = ReferenceEKFAC()
    impl.capabilities = {**impl.capabilities, "damping": {"product", "pi"}}
    records = _records(impl, [NONSINGULAR])
    bad = [(r.id, r.status, r.message) for r in records if r.status != "passed"]
    assert not bad, bad
    only_pi = ReferenceEKFAC()
    only_pi.capabilities = {**only_pi.capabilities, "damping": {"pi"}}
    records = _records(only_pi, [NONSINGULAR], checks="op_inverse")
    assert [r.status for r in records] == ["unsupported"]
    assert "need a Kronecker product block" in records[0].message


# -- the mutants -----------------------------------------------------------------


@pytest.mark.parametrize(
    "mutant", [*OPERATION_MUTANTS, TransposedEigenbasis], ids=lambda m: m.name
)
def test_operation_mutant_is_caught_with_its_diagnosis(mutant):
    records = _records(mutant(), [NONSINGULAR])
    failed = [r for r in records if r.status == "failed"]
    assert failed, [(r.id, r.status, r.message) for r in records]
    damped = [
        r
        for r in failed
        if r.check in ("op_inverse", "op_logdet", "op_scores", "op_data_scores")
    ]
    assert damped, [r.id for r in failed]
    # the data scores go through the same damped inverse
    assert any(r.check == "op_data_scores" for r in damped), [r.id for r in failed]
    for r in damped:
        assert mutant.expected_diagnosis in (r.diagnosis or ""), (r.id, r.diagnosis)


@pytest.mark.parametrize(
    ("mutant", "check_name"), SPECTRAL_MUTANTS, ids=lambda m: getattr(m, "name", m)
)
def test_spectral_mutant_is_caught(mutant, check_name):
    records = _records(mutant(), [NONSINGULAR])
    mine = [r for r in records if r.check == check_name]
    assert mine and all(r.status == "failed" for r in mine), [
        (r.id, r.status) for r in mine
    ]
    others = [r for r in records if r.check in ("op_inverse", "op_logdet", "op_trace")]
    assert all(r.status == "passed" for r in others)
    for r in mine:
        assert mutant.expected_diagnosis in (r.diagnosis or "")


@pytest.mark.parametrize("mutant", DATA_SCORES_MUTANTS, ids=lambda m: m.name)
def test_data_scores_mutant_is_caught_with_its_diagnosis(mutant):
    records = _records(mutant(), [NONSINGULAR])
    mine = [r for r in records if r.check == "op_data_scores"]
    assert mine and all(r.status == "failed" for r in mine), [
        (r.id, r.status, r.message) for r in mine
    ]
    for r in mine:
        assert mutant.expected_diagnosis in (r.diagnosis or ""), (r.id, r.diagnosis)
    others = [r for r in records if r.check != "op_data_scores"]
    assert others and all(r.status == "passed" for r in others), [
        (r.id, r.status) for r in others if r.status != "passed"
    ]


def test_data_scores_are_the_scores_of_the_per_datum_gradients():
    """``data_scores`` equal ``scores`` of the per-datum gradients, N × N."""
    from kfac_oracle.contract import KFACRequest, OperationsRequest
    from kfac_oracle.reference.exact import per_datum_gradients
    from kfac_oracle.runner.caller import build_problem

    problem = build_problem(BY_ID["mlp_tanh_cro_mean"])
    layer = BY_ID["mlp_tanh_cro_mean"].layers[0]
    request = KFACRequest(
        problem.model,
        problem.loss_func,
        list(problem.data),
        fisher_type="empirical",
        layers=(layer,),
        operations=OperationsRequest("product", {layer: (0.1,)}, {}),
    )
    ops = ReferenceKFAC(operations=True).compute(request)[layer]
    S = ops.data_scores(0.1)
    G = per_datum_gradients(problem, layer)
    assert S.shape == (request.num_data, request.num_data)
    assert torch.allclose(S, ops.scores(G.T, G.T, 0.1))
    # g_n is the gradient of ℓ_n without R: one datum's cross-entropy term
    X, y = problem.data[0]
    model = problem.model
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(X[:1]), y[:1], reduction="sum").backward()
    module = model.get_submodule(layer)
    g0 = torch.cat([module.weight.grad.reshape(-1), module.bias.grad])
    assert torch.allclose(G[0], g0)
    model.zero_grad()


# -- the contract ----------------------------------------------------------------


class _MissingLogdet(ReferenceKFAC):
    name = "missing-logdet"

    def __init__(self):
        super().__init__(operations=True)

    def compute(self, request):
        out = super().compute(request)
        if request.operations is None:
            return out
        return {
            n: LayerOperations(inverse_product=o.inverse_product)
            for n, o in out.items()
        }


class _WrongShape(ReferenceKFAC):
    name = "wrong-shape"

    def __init__(self):
        super().__init__(operations=True)

    def compute(self, request):
        out = super().compute(request)
        if request.operations is None:
            return out
        return {
            n: LayerOperations(
                inverse_product=lambda V, lam, o=o: o.inverse_product(V, lam)[:-1],
                logdet=o.logdet,
                trace=o.trace,
                scores=o.scores,
            )
            for n, o in out.items()
        }


class _DataScoresOfOneBatch(ReferenceKFAC):
    """``data_scores`` of the first batch only: ``(B, B)`` instead of ``(N, N)``."""

    name = "data-scores-one-batch"

    def __init__(self):
        super().__init__(operations=True)

    def compute(self, request):
        out = super().compute(request)
        if request.operations is None:
            return out
        B = len(request.data[0][0])
        return {
            n: dataclasses.replace(
                o, data_scores=lambda lam, f=o.data_scores: f(lam)[:B, :B]
            )
            for n, o in out.items()
        }


def test_data_scores_of_the_wrong_size_are_errors():
    case = "mlp_tanh_cro_mean"  # batches of unequal sizes
    assert len(set(BY_ID[case].batch_sizes)) > 1
    records = _records(_DataScoresOfOneBatch(), [case], checks="op_data_scores")
    assert records and all(r.status == "error" for r in records)
    assert "data_scores has shape" in records[0].message
    assert f"expected ({BY_ID[case].num_data}, {BY_ID[case].num_data})" in (
        records[0].message
    )


def test_malformed_operations_are_errors_naming_the_problem():
    records = _records(_MissingLogdet(), [NONSINGULAR], checks="op_inverse")
    assert records[0].status == "error"
    assert "LayerOperations.logdet is None" in records[0].message
    records = _records(_WrongShape(), [NONSINGULAR], checks="op_inverse")
    assert records[0].status == "error"
    assert "inverse_product has shape" in records[0].message


def test_conventions_undefined_on_a_case_are_not_compared():
    """π is undefined where a factor has zero trace, mean_eigenvalue on a zero block."""
    impl = ReferenceKFAC(operations=True)
    impl.capabilities = {**impl.capabilities, "damping": {"pi", "mean_eigenvalue"}}
    records = _records(impl, ["mc_zero_variance_ce2_mean"], checks="op_inverse")
    assert records and {r.status for r in records} == {"unsupported"}
    assert "π is undefined" in records[0].message
    assert "zero block" in records[0].message
    impl.capabilities = {**impl.capabilities, "damping": {"pi", "product"}}
    records = _records(impl, ["mc_zero_variance_ce2_mean"], checks="op_inverse")
    assert {r.status for r in records} == {"passed"}
    assert all("pi damping" not in r.message for r in records)


def test_operations_of_a_wrong_block_are_diagnosed_as_the_block():
    from tests.mutants import _ReductionIgnored

    class WrongBlock(ReferenceKFAC):
        name = "wrong-block"
        steps_class = _ReductionIgnored

    impl = WrongBlock(operations=True)
    impl.capabilities = {**impl.capabilities, "damping": {"product"}}
    records = _records(impl, [NONSINGULAR], checks="op_inverse")
    assert records[0].status == "failed"
    assert "the candidate's own block" in records[0].diagnosis


class _PlainNumbers(ReferenceKFAC):
    """``logdet`` and ``trace`` as Python floats, the inverse as numpy arrays."""

    name = "plain-numbers"

    def __init__(self):
        super().__init__(operations=True)

    def compute(self, request):
        out = super().compute(request)
        if request.operations is None:
            return out
        return {
            n: LayerOperations(
                inverse_product=lambda V, lam, o=o: o.inverse_product(V, lam).numpy(),
                logdet=lambda lam, o=o: float(o.logdet(lam)),
                trace=float(o.trace()),
                scores=o.scores,
                diagonal=o.diagonal().numpy(),
                eigenvalues=lambda o=o: o.eigenvalues().numpy(),
                data_scores=lambda lam, o=o: o.data_scores(lam).numpy(),
            )
            for n, o in out.items()
        }


def test_numbers_and_numpy_arrays_are_accepted_and_tolerances_are_stated():
    records = _records(_PlainNumbers(), [NONSINGULAR])
    assert {r.status for r in records} == {"passed"}, [r.message for r in records]
    for r in records:
        if r.check in ("op_inverse", "op_logdet", "op_scores", "op_data_scores"):
            assert "10·P·κ·eps" in r.message and "κ = " in r.message
            assert r.tolerance is not None and r.error <= r.tolerance


# -- the separate-bias block ------------------------------------------------------


class _SeparateOnly(ReferenceKFAC):
    """Offers the separate-bias block only (as laplace's Kron groups do)."""

    name = "separate-only"
    capabilities = {
        **ReferenceKFAC.capabilities,
        **OPERATION_CAPABILITIES,
        "bias": {"separate"},
        "damping": {"product", "mean_eigenvalue"},
    }


class _JointForSeparate(_SeparateOnly):
    """Answers a separate-bias operations request on the joint block."""

    name = "joint-for-separate"

    def compute(self, request):
        if request.operations is not None:
            request = dataclasses.replace(
                request,
                operations=dataclasses.replace(request.operations, bias="joint"),
            )
        return super().compute(request)


BIASED = ["mlp_tanh_cro_mean", "cnn_tanh_ce_mean"]


def test_a_separate_bias_candidate_is_checked_on_the_separate_block():
    records = _records(_SeparateOnly(), BIASED)
    ran = [r for r in records if r.status != "unsupported"]
    assert {r.check for r in ran} >= {"op_inverse", "op_logdet", "op_trace"}
    assert ran and all(r.status == "passed" for r in ran), [
        (r.id, r.message) for r in ran if r.status != "passed"
    ]


def test_the_joint_block_for_a_separate_request_fails():
    records = _records(_JointForSeparate(), BIASED)
    failed = [r for r in records if r.status == "failed"]
    # trace and diagonal coincide: the joint and separate blocks share their
    # diagonal blocks
    assert {r.check for r in failed} >= {"op_inverse", "op_logdet", "op_scores"}


def test_a_hypothesis_with_uninformative_tolerances_explains_nothing():
    from kfac_oracle.checks.operations import Worst, explains

    singular = Worst()
    singular.add(1e-14, 1e-12, "λ = 1")
    singular.add(0.3, 0.5, "λ = 1e-6 (κ huge)")  # matches, but 10·P·κ·eps = 0.5
    assert not explains(singular)
    informative = Worst()
    informative.add(1e-14, 1e-12, "λ = 1")
    assert explains(informative)
