"""Input validation, the catalogue, and the ``kfac-oracle cases`` command."""

import json
import subprocess
import sys

import pytest
import torch

from kfac_oracle.catalogue import Case, exact, load_cases
from kfac_oracle.cli import main
from kfac_oracle.problem import Problem, ProblemError
from tests.utils import CASES

FAMILIES = {
    "deep_linear",
    "mlp",
    "one_datum",
    "seq_expand",
    "seq_reduce",
    "seq_ce",
    "conv_expand",
    "conv_reduce",
}


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(3, 2)).double()


def data(n=4, c=2, dtype=torch.float64):
    return [(torch.randn(n, 3, dtype=dtype), torch.randn(n, c, dtype=dtype))]


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: Problem(mlp(), torch.nn.L1Loss(), data()),
            "unsupported loss 'L1Loss'",
        ),
        (
            lambda: Problem(mlp(), torch.nn.MSELoss(reduction="none"), data()),
            "reduction",
        ),
        (lambda: Problem(mlp(), torch.nn.MSELoss(), []), "non-empty list"),
        (
            lambda: Problem(mlp(), torch.nn.MSELoss(), data(c=3)),
            "targets of the output",
        ),
        (
            lambda: Problem(
                mlp(),
                torch.nn.MSELoss(),
                [(torch.randn(4, 3).double(), torch.randn(3, 2).double())],
            ),
            "same non-zero batch size",
        ),
        (
            lambda: Problem(mlp(), torch.nn.MSELoss(), data(dtype=torch.float32)),
            "dtype",
        ),
        (
            lambda: Problem(
                mlp(),
                torch.nn.MSELoss(),
                [
                    (
                        torch.full((2, 3), float("nan"), dtype=torch.float64),
                        torch.zeros(2, 2, dtype=torch.float64),
                    )
                ],
            ),
            "NaN",
        ),
        (
            lambda: Problem(
                mlp(),
                torch.nn.CrossEntropyLoss(),
                [(torch.randn(2, 3).double(), torch.tensor([0, 5]))],
            ),
            "outside",
        ),
        (
            lambda: Problem(
                mlp(),
                torch.nn.CrossEntropyLoss(),
                [(torch.randn(2, 3).double(), torch.rand(2, 2).double())],
            ),
            "integer class labels",
        ),
        (
            lambda: Problem(
                mlp(),
                torch.nn.BCEWithLogitsLoss(),
                [(torch.randn(2, 3).double(), torch.full((2, 2), 2.0).double())],
            ),
            r"\[0, 1\]",
        ),
        (
            lambda: Problem(
                mlp(),
                torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                [(torch.randn(2, 3).double(), torch.tensor([0, 1]))],
            ),
            "label smoothing",
        ),
    ],
)
def test_bad_input_raises_clear_error(make, match):
    with pytest.raises(ProblemError, match=match):
        make()


def test_catalogue_size_and_families():
    assert len(CASES) >= 40
    assert {c.family for c in CASES} >= FAMILIES
    assert len({c.id for c in CASES}) == len(CASES)
    # both reductions, all three losses, all settings, unequal batch splits
    assert {c.reduction for c in CASES} == {"mean", "sum"}
    assert {c.loss for c in CASES} == {
        "MSELoss",
        "CrossEntropyLoss",
        "BCEWithLogitsLoss",
    }
    assert {c.setting for c in CASES} == {"none", "expand", "reduce"}
    assert any(len(set(c.batch_sizes)) > 1 for c in CASES)


def test_every_case_has_positive_and_negative_claims_overall():
    holds = {
        cl.holds for c in CASES for layer in c.layers for cl in c.claims_for(layer)
    }
    assert holds == {True, False}
    for case in CASES:
        assert set(case.claims) <= set(case.layers), case.id


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case_builds_deterministically(case):
    a, b = case.build(), case.build()
    for (Xa, ya), (Xb, yb) in zip(a.data, b.data):
        assert torch.equal(Xa, Xb) and torch.equal(ya, yb)
    assert [len(X) for X, _ in a.data] == list(case.batch_sizes)


def test_user_case_file_via_environment(tmp_path, monkeypatch):
    file = tmp_path / "my_cases.py"
    file.write_text(
        "from kfac_oracle.catalogue import Case, exact\n"
        "CASES = [Case(id='user_linear', family='user', model=[('Linear', 3, 2)],\n"
        "              input_shape=(3,), loss='MSELoss',\n"
        "              claims={'0': [exact('E2')]})]\n"
    )
    monkeypatch.setenv("KFAC_ORACLE_CASES", str(tmp_path))
    cases = load_cases("user*")
    assert [c.id for c in cases] == ["user_linear"]
    assert isinstance(cases[0], Case) and cases[0].claims["0"] == [exact("E2")]


def test_cases_json_command(capsys):
    assert main(["cases", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == len(CASES)
    for key in (
        "id",
        "family",
        "model",
        "loss",
        "reduction",
        "setting",
        "num_params",
        "claims",
    ):
        assert key in records[0]


def test_cases_table_command_and_usage_error():
    out = subprocess.run(
        [sys.executable, "-m", "kfac_oracle.cli", "cases", "--cases", "conv*"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "conv_pool_k3_pad1_mse_mean" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "kfac_oracle.cli", "nonsense"], capture_output=True
    )
    assert bad.returncode == 2
