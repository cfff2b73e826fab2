"""Cases built from any nn.Module: the claims machinery, and per-datum independence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_oracle.catalogue import Case, exact, load_cases, validate_case
from kfac_oracle.errors import CaseError, ProblemError
from kfac_oracle.problem import Problem
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.runner.run import run
from tests.factory_cases import CASES, residual_mlp
from tests.mutants import MSEHalf, SwappedOrder

BY_ID = {c.id: c for c in CASES}


def test_factory_case_layers_are_its_linear_and_conv_modules():
    case = BY_ID["factory_transformer_ce"]
    assert case.layers == [
        "blocks.0.attn.q",
        "blocks.0.attn.k",
        "blocks.0.attn.v",
        "blocks.0.attn.o",
        "blocks.0.fc1",
        "blocks.0.fc2",
        "head",
    ]
    assert case.layer_kinds == {"Linear"}
    assert BY_ID["factory_resnet_block_ce"].layer_kinds == {"Conv2d", "Linear"}
    summary = case.as_dict()
    assert summary["model"] == "factory:tiny_transformer"
    problem = case.build()
    X, _ = problem.data[0]
    assert not X.dtype.is_floating_point and int(X.max()) < 5


def test_factory_model_is_seeded():
    case = BY_ID["factory_residual_mlp_mse"]
    a, b = case.build_model(), case.build_model()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.inp.weight.dtype == torch.float64


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_passes_every_check_of_a_factory_case(case):
    """Agreement, exactness (where claimed), MC, invariance and well-formedness."""
    validate_case(case, "tests/factory_cases.py")
    records = run(
        ReferenceKFAC(operations=True), [case], isolation="none", time_limit=None
    )
    families = {r.family for r in records}
    assert {"agreement", "invariance", "robustness"} <= families
    bad = [(r.id, r.status, r.message) for r in records if r.status != "passed"]
    assert not bad


def test_mc_and_exactness_run_on_factory_cases():
    records = run(
        ReferenceKFAC(), list(CASES), families=["mc", "exactness"], isolation="none"
    )
    checks = {r.check.split("[")[0] for r in records}
    wanted = {"mc_converges_expand", "mc_converges_reduce", "mc_variance_expand"}
    wanted |= {"exact_E3_type-2_expand", "exact_E2_type-2_expand"}
    assert wanted <= checks
    assert all(r.status == "passed" for r in records)


@pytest.mark.parametrize("mutant", [MSEHalf, SwappedOrder], ids=lambda m: m.name)
def test_a_mutant_fails_on_factory_cases(mutant):
    cases = [BY_ID["factory_attention_mse"], BY_ID["factory_residual_mlp_mse"]]
    records = run(mutant(), cases, families=["agreement"], isolation="none")
    assert any(r.status == "failed" for r in records)


def _bn_net(train: bool) -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    return net.train(train)


def _data(n=4):
    return [(torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2).double())]


def test_train_mode_batchnorm_is_named():
    with pytest.raises(ProblemError, match=r"'1' \(BatchNorm1d in training mode"):
        Problem(_bn_net(train=True), nn.MSELoss(), _data())
    Problem(_bn_net(train=False), nn.MSELoss(), _data())  # eval mode is fine


def test_active_dropout_is_named():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)).double()
    with pytest.raises(ProblemError, match=r"'1' \(Dropout active with p=0.1"):
        Problem(net, nn.MSELoss(), _data())
    Problem(net.eval(), nn.MSELoss(), _data())
    off = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Linear(4, 2)).double()
    Problem(off, nn.MSELoss(), _data())  # dropout off


class _CentresBatch(nn.Module):
    """Subtracts the batch mean: mixes data, with no train-mode module to name."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def test_mixing_across_the_batch_is_detected_numerically():
    net = nn.Sequential(nn.Linear(3, 2), _CentresBatch()).double().eval()
    with pytest.raises(ProblemError, match="does not treat data points independently"):
        Problem(net, nn.MSELoss(), _data())


def test_case_with_train_mode_batchnorm_is_a_case_error():
    case = Case(
        id="bn_train",
        family="factory",
        model=lambda: _bn_net(train=True).float(),
        input_shape=(3,),
        loss="MSELoss",
        claims={"2": [exact("E2")]},
    )
    with pytest.raises(CaseError, match="BatchNorm1d in training mode"):
        validate_case(case)


def test_factory_that_returns_no_module_is_a_case_error():
    case = Case(
        id="bad",
        family="factory",
        model=lambda: 3,
        input_shape=(3,),
        loss="MSELoss",
    )
    with pytest.raises(CaseError, match="not an nn.Module"):
        validate_case(case)
    assert (
        validate_case(
            Case(
                id="ok",
                family="f",
                model=residual_mlp,
                input_shape=(3,),
                loss="MSELoss",
            )
        )
        is None
    )


def test_large_family_is_opt_in():
    default = load_cases()
    assert not any(c.opt_in or c.family == "large" for c in default)
    assert not any(c.family == "large" for c in load_cases("*"))
    large = load_cases("large*")
    assert large and all(c.family == "large" for c in large)
