"""kronfluence's pairwise influence scores (``kronfluence-scores``, ``-ekfac-scores``).

``Analyzer.compute_pairwise_scores`` with per-module scores is checked as the
``data_scores`` operation: ``g_iᵀ (K + λI)⁻¹ g_j`` for the per-datum loss gradients.
Mutants of the adapter (kronfluence's scores or damping without the translation by
``R·N``) show that ``op_data_scores`` sees a wrong translation. A missing kronfluence
skips these tests.
"""

from __future__ import annotations

import pytest

from kfac_oracle.adapters.kronfluence import (
    LIBRARY,
    KronfluenceEKFACScores,
    KronfluenceScores,
)
from kfac_oracle.contract import KFACRequest, OperationsRequest
from kfac_oracle.runner.caller import build_problem
from kfac_oracle.runner.run import Session, run
from tests.utils import CASES

BY_ID = {c.id: c for c in CASES}
# no weight sharing, a sum (R·N = N) and a mean (R·N = 1) reduction
UNSHARED = ["mlp_tanh_cro_sum", "deep_linear_d2_bias_mse_mean"]
SHARED = "seq_expand_linear_mse_sum"


@pytest.fixture(autouse=True)
def _kronfluence():
    if LIBRARY.version() is None:
        pytest.skip("kronfluence is not installed")
    try:
        LIBRARY.load("analyzer", "arguments", "task")
    except ImportError as error:
        pytest.skip(f"kronfluence does not import: {error}")


def _records(impl, case_ids):
    session = Session.start(impl, isolation="none")
    cases = [BY_ID[c] for c in case_ids]
    return run(
        None,
        cases,
        checks="op_data_scores",
        families=["operations"],
        session=session,
    )


def test_kfac_scores_are_exact_without_weight_sharing():
    records = _records(KronfluenceScores(), UNSHARED)
    assert len(records) == 4
    bad = [(r.id, r.status, r.message) for r in records if r.status != "passed"]
    assert not bad, bad


def test_ekfac_scores_are_exact_with_and_without_weight_sharing():
    records = _records(KronfluenceEKFACScores(), [UNSHARED[0], SHARED])
    # EKFAC is not unique on the shared first layer (a repeated eigenvalue)
    ran = [r for r in records if r.status != "unsupported"]
    assert len(ran) == 3 and any(SHARED in r.id for r in ran)
    bad = [(r.id, r.status, r.message) for r in ran if r.status != "passed"]
    assert not bad, bad


def test_kfac_scores_with_weight_sharing_are_those_of_its_own_block():
    """Finding kronfluence 1: the scores are right for kronfluence's KFAC/S block."""
    records = _records(KronfluenceScores(), [SHARED])
    assert records and all(r.status == "failed" for r in records)
    for r in records:
        assert "the candidate's own block damped by the declared product" in (
            r.diagnosis or ""
        ), (r.id, r.diagnosis)


class _ScoresUntranslated(KronfluenceScores):
    """kronfluence's scores as returned: not divided by ``R·N``."""

    name = "kronfluence-scores-untranslated"

    @staticmethod
    def _contract_scores(scores, scale):
        return scores


class _DampingUntranslated(KronfluenceScores):
    """The contract's ``λ`` passed as kronfluence's ``damping_factor``."""

    name = "kronfluence-damping-untranslated"

    @staticmethod
    def _library_damping(damping, scale):
        return damping


@pytest.mark.parametrize("mutant", [_ScoresUntranslated, _DampingUntranslated])
def test_an_untranslated_scale_fails(mutant):
    records = _records(mutant(), [UNSHARED[0]])
    assert records and all(r.status == "failed" for r in records), [
        (r.id, r.status) for r in records
    ]


def test_untranslated_scores_are_diagnosed_as_a_constant_factor():
    records = _records(_ScoresUntranslated(), [UNSHARED[0]])
    N = sum(BY_ID[UNSHARED[0]].batch_sizes)
    for r in records:
        assert f"a constant factor {N:g}" in (r.diagnosis or ""), r.diagnosis


def test_scores_exist_for_the_requested_dampings_only():
    case = BY_ID[UNSHARED[0]]
    problem = build_problem(case)
    layer = case.layers[0]
    request = KFACRequest(
        problem.model,
        problem.loss_func,
        list(problem.data),
        fisher_type="empirical",
        layers=(layer,),
        operations=OperationsRequest(
            "product", {layer: (0.5,)}, {}, operations=("data_scores",)
        ),
    )
    ops = KronfluenceScores().compute(request)[layer]
    assert ops.data_scores(0.5).shape == (request.num_data, request.num_data)
    with pytest.raises(ValueError, match="computed for the dampings"):
        ops.data_scores(0.25)
