"""Diagnoses of combined and squared pitfalls (docs/theory.md, "Combined pitfalls").

Each new diagnosis is named for a mutant that has it (one pitfall, or two at once), on
a case where it shows; coinciding explanations are reported as ambiguous; and over
every mutant, no diagnosis names a wrong cause (tests/diagnosis_readings.py).
"""

from __future__ import annotations

import pytest
import torch

from kfac_oracle.catalogue import get_case
from kfac_oracle.diagnosis import (
    describe_constant,
    diagnose,
    scale_atoms,
    scale_explanations,
)
from kfac_oracle.problem import Problem
from kfac_oracle.runner.run import run
from tests import mutants as m
from tests.diagnosis_readings import Reading, names_a_cause, readings, wrong_cause

BLOCK_CHECKS = ["agree_*", "exact_*"]

# mutant -> a case where its diagnosis shows
WITNESS = {
    m.ConvNoStride: "conv_pool_k3_stride2_mse_mean",
    m.ConvNoDilation: "conv_pixel_k3_dilation2_mse_mean",
    m.MSEMeanInBothFactors: "conv_pool_k3_stride2_mse_mean",
    m.SumsEverywhere: "mlp_tanh_cro_mean",
    m.BiasJointLayout: "mlp_tanh_cro_mean",
    m.SummedBatches: "mlp_tanh_cro_mean",
    m.EKFACTransposedBasis: "mlp_tanh_cro_mean",
    m.EKFACTransposedRebuild: "mlp_tanh_cro_mean",
    m.PerBatchReduction: "mlp_tanh_cro_mean",
    m.EqualBatchWeights: "mlp_tanh_cro_mean",
    m.FirstBatchOnly: "mlp_tanh_cro_mean",
    m.BiasMissingOne: "mlp_tanh_cro_mean",
    m.ExpandNormInReduce: "seq_reduce_meanpool_mse_mean",
    m.BiasFirstReductionIgnored: "mlp_tanh_mse_mean",
    m.PerBatchReductionMSEHalf: "mlp_tanh_mse_mean",
    m.ReductionIgnoredMSEHalf: "mlp_tanh_mse_mean",
    m.ConvNoPaddingReductionIgnored: "conv_pixel_k3_dilation2_mse_mean",
    m.SwappedOrderMSEHalf: "mlp_tanh_mse_mean",
    m.SummedBatchesMSEMeanOverN: "conv_pixel_k3_dilation2_mse_mean",
    m.EKFACTransposedSum: "mlp_tanh_cro_mean",
}


def _diagnoses(mutant, case_ids, checks=BLOCK_CHECKS):
    cases = [get_case(c) for c in case_ids]
    records = run(mutant(), cases, checks=checks, isolation="none")
    return [r for r in records if r.status in ("failed", "error")]


@pytest.mark.parametrize("mutant", list(WITNESS), ids=lambda x: x.name)
def test_the_diagnosis_names_the_mutants_pitfalls(mutant):
    failed = _diagnoses(mutant, [WITNESS[mutant]], ["agree_*"])
    assert failed, f"{mutant.name} passed"
    texts = [r.diagnosis or "" for r in failed]
    assert any(mutant.expected_diagnosis in t for t in texts), texts
    for text in texts:
        assert not wrong_cause(text, mutant.causes), text


def test_two_structural_pitfalls_at_once_are_not_explained():
    """Padding and kernel order both wrong: no single pitfall fits, none is named."""
    mutant = m.ConvNoPaddingKernelOrder
    failed = _diagnoses(mutant, ["conv_pixel_k3_pad1_mse_mean"], ["agree_*"])
    assert failed
    for r in failed:
        assert not names_a_cause(r.diagnosis), r.diagnosis


def test_summed_batches_on_equal_batches_is_ambiguous_with_n():
    """Batches (2, 2): N = K² = 4, so summed factors and a missing 1/N coincide."""
    failed = _diagnoses(m.SummedBatches, ["conv_pixel_then_1x1_mse_mean"], ["agree_*"])
    texts = [r.diagnosis or "" for r in failed]
    ambiguous = [t for t in texts if "ambiguous on this case (N = K²" in t]
    assert ambiguous, texts
    assert "K² (both factors summed" in ambiguous[0]
    assert "N (reduction over the data)" in ambiguous[0]


def _problem(batch_sizes, loss="CrossEntropyLoss", out=3, reduction="mean"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, out)).double()
    data = []
    for B in batch_sizes:
        X = torch.randn(B, 2, dtype=torch.float64)
        if loss == "CrossEntropyLoss":
            y = torch.randint(0, out, (B,))
        else:
            y = torch.randn(B, out, dtype=torch.float64)
        data.append((X, y))
    return Problem(model, getattr(torch.nn, loss)(reduction=reduction), data)


def _symbols(problem, fisher_type, mc_samples=1, positions=1, sums=None):
    atoms = scale_atoms(problem, positions, mc_samples, fisher_type, sums)
    return {a.symbol for a in atoms}


def test_scales_are_filtered_by_the_request():
    ce, mse = _problem([3, 2]), _problem([3, 2], "MSELoss")
    assert "2" not in _symbols(ce, "type-2")  # no MSE Hessian 2·I for cross-entropy
    assert "2" not in _symbols(mse, "empirical")  # nor for the empirical Fisher
    assert "2" in _symbols(mse, "type-2")
    assert "M" not in _symbols(mse, "type-2", mc_samples=4)
    assert "M" in _symbols(mse, "mc", mc_samples=4)
    assert "S" not in _symbols(ce, "type-2") and "S" in _symbols(ce, "type-2", 1, 3)
    # per-batch factors summed are a constant only over equal batches
    assert "K²" not in _symbols(ce, "type-2")
    assert "K²" in _symbols(_problem([2, 2]), "type-2")


def _describe(problem, c, fisher_type="type-2", positions=1):
    atoms = scale_atoms(problem, positions, 1, fisher_type)
    return describe_constant(c, scale_explanations(atoms))


def test_squared_and_combined_scales_are_named():
    ce = _problem([3, 2])  # N = 5, T = 1
    assert _describe(ce, 25.0) == (
        "a constant factor too large by N² (reduction over the data, applied twice)"
    )
    mse = _problem([3, 2], "MSELoss", out=3)  # N = 5, T = 3
    text = _describe(mse, 1 / 9)
    assert text.startswith("a constant factor too small by T² (loss terms per datum")
    text = _describe(mse, 15 / 2)  # N·T too large, MSE factor 2 missing
    assert readings(text) == [Reading(None, ("N·T", "2"))], text
    assert "too large by N·T (the mean reduction ignored) and too small by 2" in text


def test_coinciding_scales_are_reported_as_ambiguous():
    """N = K² on batches (2, 2); every reading is listed, none is chosen."""
    text = _describe(_problem([2, 2]), 4.0)
    assert text.startswith("a constant factor ambiguous on this case (N = K²"), text
    assert {r.scales for r in readings(text)} >= {("N",), ("K²",)}


def test_a_coincidence_outside_the_searched_combinations_is_still_reported():
    """N²·T is not searched, but N·T·K² is; with N = K² both must be listed."""
    mse = _problem([2, 2], "MSELoss", out=3)  # N = 4, T = 3, K = 2
    text = _describe(mse, 4 * 4 * 3)
    assert "ambiguous on this case" in text, text
    assert Reading(None, ("N·T", "N")) in readings(text), text


def test_unexplained_constants_name_no_cause():
    assert _describe(_problem([3, 2]), 3.7).endswith("matching no known scale")
    assert not names_a_cause(_describe(_problem([3, 2]), 3.7))


def test_ekfac_transposed_eigenbasis_is_diagnosed_from_the_blocks():
    from kfac_oracle.flavours import Flavour
    from kfac_oracle.reference.ekfac import ekfac, ekfac_block

    problem = _problem([3, 2])
    f = ekfac(problem, Flavour("type-2", "expand", "joint"), ["0"])["0"]
    reference = ekfac_block(f)
    f.input_eigenvectors = f.input_eigenvectors.T.contiguous()
    f.gradient_eigenvectors = f.gradient_eigenvectors.contiguous()
    candidate = 5.0 * ekfac_block(f)  # and 1/N missing
    text = diagnose(
        candidate,
        problem,
        "0",
        "type-2",
        "expand",
        reference=reference,
        approximation="ekfac",
    )
    assert text.startswith(
        "EKFAC eigenbasis transposed (U_A read as rows, not columns) in the "
        "reconstruction Q diag(Λ) Qᵀ only, with a constant factor too large by N"
    ), text


ALL_MUTANTS = m.MUTANTS + m.DIAGNOSIS_MUTANTS + m.COMBINED_MUTANTS
FAST_CASES = ["mlp_tanh_mse_mean"]
SLOW_CASES = [
    "mlp_tanh_mse_mean",
    "mlp_tanh_cro_mean",
    "seq_ce_mean",
    "seq_reduce_meanpool_mse_mean",
    "conv_pool_k3_stride2_mse_mean",
    "conv_pixel_k3_dilation2_mse_mean",
    "conv_pixel_k3_pad1_mse_mean",
    "conv_pixel_then_1x1_mse_mean",
    "deep_linear_d2_cro_sum",
    "one_datum_mse_mean",
]


def _wrong(mutant, case_ids):
    return [
        f"{r.id}: {r.diagnosis}"
        for r in _diagnoses(mutant, case_ids)
        if wrong_cause(r.diagnosis, mutant.causes)
    ]


@pytest.mark.parametrize("mutant", ALL_MUTANTS, ids=lambda x: x.name)
def test_no_diagnosis_names_a_wrong_cause(mutant):
    assert not _wrong(mutant, FAST_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("mutant", ALL_MUTANTS, ids=lambda x: x.name)
def test_no_diagnosis_names_a_wrong_cause_on_more_cases(mutant):
    assert not _wrong(mutant, SLOW_CASES)


def test_the_reference_itself_is_not_diagnosed_with_a_pitfall():
    from kfac_oracle.conventions import kronecker_block
    from kfac_oracle.reference.kfac import KFACSteps

    problem = _problem([3, 2], "MSELoss")
    B = kronecker_block(KFACSteps().factors(problem, "type-2", ["0"])["0"])
    assert diagnose(B, problem, "0", "type-2", "expand") == (
        "matches the reference (no mismatch)"
    )
    assert diagnose(B + 1.0, problem, "0", "type-2", "expand") == (
        "no known pitfall explains this"
    )
