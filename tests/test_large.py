"""The ``large`` family: its shape (fast, on the meta device) and, marked slow, runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from kfac_oracle.architectures import PreNormBlock, SelfAttention
from kfac_oracle.catalogue import builtin_case_dir, load_cases
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.runner.run import Session, run
from tests.mutants import MUTANTS, MSEHalf


def _large():
    spec = importlib.util.spec_from_file_location(
        "large_cases", builtin_case_dir() / "large.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LARGE = _large()
BY_ID = {c.id: c for c in LARGE.CASES}


def _meta(factory) -> nn.Module:
    with torch.device("meta"):
        return factory()


def _params(factory) -> int:
    return sum(p.numel() for p in _meta(factory).parameters())


def test_the_family_is_selected_by_pattern_only():
    assert {c.id for c in load_cases("large*")} == set(BY_ID)
    assert all(c.opt_in for c in LARGE.CASES)


def test_deep_linear_mlp_has_a_million_parameters_and_e2_everywhere():
    case = BY_ID["large_deep_linear_mse"]
    model = _meta(case.model)
    assert _params(case.model) >= 1_000_000
    assert all(isinstance(m, nn.Linear) for m in model)
    assert set(case.claims) == {str(i) for i in range(len(model))}
    assert all(c[0].equivalence == "E2" for c in case.claims.values())
    assert all(c[1].statement == "mc_convergence" for c in case.claims.values())


def test_conv_pool_uses_the_standard_pool_in_the_reduce_setting():
    case = BY_ID["large_conv_pool_mse"]
    model = _meta(case.model)
    assert isinstance(model[1], nn.AdaptiveAvgPool2d)
    assert case.setting == "reduce"
    assert case.claims["0"][0].equivalence == "E5"


def test_resnet_and_transformers_are_real_sized():
    resnet = _meta(BY_ID["large_resnet18_ce"].model)
    bns = [m for m in resnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    convs = [m for m in resnet.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20  # stem + 8 blocks x 2 + 3 shortcuts
    token = BY_ID["large_transformer_token_ce"]
    pooled = BY_ID["large_transformer_pooled_ce"]
    for case in (token, pooled):
        model = _meta(case.model)
        blocks = [m for m in model.modules() if isinstance(m, PreNormBlock)]
        assert len(blocks) == 6
        assert blocks[0].attn.q.in_features >= 256
    assert _meta(token.model).blocks[0].attn.causal
    assert token.setting == "expand" and pooled.setting == "reduce"
    total = sum(_params(BY_ID[i].model) for i in BY_ID if "resnet" in i or "trans" in i)
    assert total >= 10_000_000
    assert isinstance(_meta(pooled.model).blocks[0].attn, SelfAttention)


MATRIX_FREE = ["agreement", "exactness", "robustness"]


@pytest.mark.slow
@pytest.mark.parametrize("case_id", sorted(BY_ID))
def test_reference_passes_the_large_family(case_id):
    records = run(ReferenceKFAC(), [BY_ID[case_id]], families=MATRIX_FREE)
    bad = [(r.id, r.status, r.message) for r in records if r.status != "passed"]
    assert records and not bad


@pytest.mark.slow
def test_a_mutant_is_caught_matrix_free_on_the_large_family():
    records = run(MSEHalf(), [BY_ID["large_deep_linear_mse"]], families=MATRIX_FREE)
    failed = [r for r in records if r.status == "failed"]
    assert failed
    assert any("Gaussian probes" in r.message for r in failed)  # exactness
    assert any("Kronecker factors" in r.message for r in failed)  # agreement


# Caught by agreement and exactness alone; the Monte-Carlo mutants and stale
# parameters by the MC and invariance checks (matrix-free too, below).
DETERMINISTIC = {
    "reduction_ignored",
    "mse_mean_over_N",
    "per_batch_reduction",
    "mse_half",
    "ef_for_type2",
    "swapped_order",
    "bias_first",
    "bias_missing_one",
    "equal_batch_weights",
    "expand_norm_in_reduce",
    "always_reduce",
    "conv_no_padding",
    "conv_kernel_order",
    "first_batch_only",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "mutant",
    [m for m in MUTANTS if m.name in DETERMINISTIC],
    ids=lambda m: m.name,
)
def test_deterministic_mutants_are_caught_matrix_free_on_a_large_case(mutant):
    case = BY_ID["large_conv_pool_mse"]
    records = run(mutant(), [case], families=MATRIX_FREE, isolation="none")
    assert any(r.status in ("failed", "error") for r in records)


# The MC statistics (from Kronecker factors) and the invariances, matrix-free.
STATISTICAL = ["mc", "invariance"]
# MSE cases whose every layer is too large to densify, with MC-convergence claims.
MC_CASES = ["large_conv_pool_mse", "large_deep_linear_mse"]


@pytest.fixture(scope="module")
def shared_references():
    """One reference cache (and MC null models) for every candidate of the module."""
    session = Session.start(ReferenceKFAC(), isolation="none")
    yield session.references
    session.close()


def _run_sharing(candidate, case, families, references):
    session = Session.start(candidate, isolation="none")
    session.references = references
    try:
        return run(None, [case], families=families, session=session)
    finally:
        session.close()


def test_mc_and_invariance_checks_run_on_blocks_too_large_to_densify():
    from kfac_oracle.checks.registry import checks

    assert all(spec.matrix_free for spec in checks("mc"))
    assert all(spec.matrix_free for spec in checks("invariance"))


@pytest.mark.slow
@pytest.mark.parametrize("case_id", MC_CASES)
def test_reference_passes_mc_and_invariance_on_a_large_case(case_id, shared_references):
    case = BY_ID[case_id]
    records = _run_sharing(ReferenceKFAC(), case, STATISTICAL, shared_references)
    bad = [(r.id, r.status, r.message) for r in records if r.status != "passed"]
    assert not bad
    ran = {r.check for r in records}
    assert {"mc_converges_expand", "mc_variance_expand"} <= ran or {
        "mc_converges_reduce",
        "mc_variance_reduce",
    } <= ran
    assert {"current_parameters", "batch_split", "mc_reproducible"} <= ran


@pytest.mark.slow
@pytest.mark.parametrize("case_id", sorted(set(BY_ID) - set(MC_CASES)))
def test_reference_passes_the_invariances_on_the_other_large_cases(case_id):
    records = run(ReferenceKFAC(), [BY_ID[case_id]], families=["invariance"])
    bad = [(r.id, r.status, r.message) for r in records if r.status != "passed"]
    assert records and not bad


@pytest.mark.slow
@pytest.mark.parametrize(
    "mutant",
    [m for m in MUTANTS if m.name not in DETERMINISTIC],
    ids=lambda m: m.name,
)
def test_every_other_mutant_is_caught_matrix_free_on_a_large_case(
    mutant, shared_references
):
    case = BY_ID["large_conv_pool_mse"]
    records = _run_sharing(mutant(), case, STATISTICAL, shared_references)
    caught = [r for r in records if r.status in ("failed", "error")]
    assert caught, f"{mutant.name} passed every matrix-free MC and invariance check"
