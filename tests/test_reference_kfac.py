"""The reference KFAC: every check passes, invariances (docs/theory.md §6), bad
input."""

import collections

import pytest
import torch
from torch import nn

from kfac_oracle.checks import checks, family_names
from kfac_oracle.conventions import kronecker_block
from kfac_oracle.problem import Problem
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.reference.kfac import UnsupportedLayerError, kfac, supported_layers
from kfac_oracle.runner.run import run
from tests.utils import CASES, assert_close, rel_error


@pytest.fixture(scope="module")
def reference_records():
    return run(ReferenceKFAC(operations=True), CASES)


def test_reference_passes_every_check(reference_records):
    """The reference passes every applicable conformance check (all families)."""
    bad = [r for r in reference_records if r.status not in ("passed", "unsupported")]
    assert not bad, "\n".join(f"{r.id}: {r.status} {r.message}" for r in bad[:10])
    families = collections.Counter(r.family for r in reference_records)
    assert set(families) == set(family_names())


@pytest.mark.parametrize("spec", checks(), ids=lambda spec: spec.name)
def test_every_check_ran_and_passed_on_the_reference(reference_records, spec):
    """Each registered check applies to at least two cases and passes on each."""
    names = {t.name for case in CASES for t in spec.targets(case)}
    records = [r for r in reference_records if r.check in names]
    assert len({r.case for r in records}) >= 2, spec.name
    assert all(r.status == "passed" for r in records)


@pytest.mark.parametrize("case", CASES[::7], ids=str)
def test_joint_and_separate_bias_share_the_weight_block(case):
    """Joint and separate bias give the same weight block and bias block."""
    problem = case.build()
    joint, sep = kfac(problem, bias="joint"), kfac(problem, bias="separate")
    for layer in case.layers:
        J, S = kronecker_block(joint[layer]), kronecker_block(sep[layer])
        n_w = (
            sep[layer].input_covariance.shape[0]
            * sep[layer].gradient_covariance.shape[0]
        )
        assert_close(S[:n_w, :n_w], J[:n_w, :n_w])
        assert_close(S[n_w:, n_w:], J[n_w:, n_w:]) if S.shape[0] > n_w else None


def test_excluded_parameters_and_layer_subsets():
    """Frozen layers are not KFAC'd; the others' factors do not change."""
    case = next(c for c in CASES if c.id == "mlp_tanh_cro_mean")
    problem = case.build()
    full = kfac(problem)
    problem.model[0].weight.requires_grad_(False)
    assert supported_layers(problem.model) == ["2"]
    part = kfac(problem)
    assert list(part) == ["2"]
    assert_close(kronecker_block(part["2"]), kronecker_block(full["2"]))


def test_mc_is_reproducible_and_seeded():
    problem = next(c for c in CASES if c.id == "seq_ce_mean").build()
    a, b, c = (kfac(problem, "mc", mc_samples=3, seed=s)["0"] for s in (4, 4, 5))
    assert torch.equal(a.gradient_covariance, b.gradient_covariance)
    assert rel_error(a.gradient_covariance, c.gradient_covariance) > 1e-3


def test_weight_tying_raises_clear_error():
    shared = nn.Linear(3, 3).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    problem = Problem(
        model, nn.MSELoss(), [(torch.randn(4, 3).double(), torch.randn(4, 3).double())]
    )
    with pytest.raises(UnsupportedLayerError, match="more than once"):
        kfac(problem)


def test_grouped_convolution_is_rejected():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten()).double()
    X = torch.randn(2, 2, 5, 5).double()
    problem = Problem(model, nn.MSELoss(), [(X, torch.randn(2, 36).double())])
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        kfac(problem)


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).double()
    problem = Problem(
        model, nn.MSELoss(), [(torch.randn(4, 3).double(), torch.randn(4, 3).double())]
    )
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        kfac(problem, layers=["1"])


def test_bad_flavour_is_named():
    problem = next(c for c in CASES if c.id == "mlp_tanh_cro_mean").build()
    with pytest.raises(ValueError, match="fisher_type"):
        kfac(problem, fisher_type="type-3")
    with pytest.raises(ValueError, match="mc_samples"):
        kfac(problem, fisher_type="mc", mc_samples=0)


def test_forward_only_has_identity_gradient_factor():
    problem = next(c for c in CASES if c.id == "conv_stack_pool_mse_mean").build()
    f = kfac(problem, "forward-only", kfac_approx="reduce")["1"]
    assert torch.equal(f.gradient_covariance, torch.eye(3, dtype=torch.float64))
    assert_close(
        f.input_covariance,
        kfac(problem, "type-2", kfac_approx="reduce")["1"].input_covariance,
    )


def test_float32_kfac_within_derived_tolerance():
    """float32 reference KFAC vs float64: bound 2·n·u with n the longest contraction."""
    case = next(c for c in CASES if c.id == "cnn_tanh_ce_mean")
    p64, p32 = case.build(torch.float64), case.build(torch.float32)
    k64, k32 = kfac(p64), kfac(p32)
    n = p64.num_data * 25 * 3 + 25 * 18  # data × positions × classes, plus conv patches
    tol = 2 * n * torch.finfo(torch.float32).eps / 2
    for layer in case.layers:
        err = rel_error(
            kronecker_block(k32[layer]).double(), kronecker_block(k64[layer])
        )
        assert err <= tol, (layer, err, tol)
