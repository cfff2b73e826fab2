"""The conformance harness: robustness to broken candidates, the CLI, the pytest
plugin and parametrize_with_checks (pytester)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kfac_oracle.checks import CheckSession, collect
from kfac_oracle.contract import DenseBlock
from kfac_oracle.harness import ImplementationError, resolve_implementation, run
from kfac_oracle.reference.candidate import ReferenceKFAC
from tests.utils import CASES

pytest_plugins = ["pytester"]

SMALL = "mlp_tanh_cro_mean,conv_stack_pool_mse_mean"


def records_of(impl, cases=SMALL, **kw):
    return run(impl, cases, time_limit=5.0, **kw)


class Raises(ReferenceKFAC):
    name = "raises"

    def compute(self, request):
        raise RuntimeError("boom")


class ReturnsNaN(ReferenceKFAC):
    name = "nan"

    def compute(self, request):
        out = super().compute(request)
        for f in out.values():
            f.gradient_covariance = f.gradient_covariance * float("nan")
        return out


class WrongShape(ReferenceKFAC):
    name = "wrong_shape"

    def compute(self, request):
        out = super().compute(request)
        for f in out.values():
            f.input_covariance = f.input_covariance[:-1, :-1]
        return out


class Swapped(ReferenceKFAC):
    name = "swapped"

    def compute(self, request):
        out = super().compute(request)
        for f in out.values():
            f.input_covariance, f.gradient_covariance = (
                f.gradient_covariance,
                f.input_covariance,
            )
        return out


class NonSymmetric(ReferenceKFAC):
    name = "non_symmetric"

    def compute(self, request):
        out = super().compute(request)
        for f in out.values():
            f.gradient_covariance = torch.triu(f.gradient_covariance)
        return out


class Indefinite(ReferenceKFAC):
    name = "indefinite"

    def compute(self, request):
        out = super().compute(request)
        for f in out.values():
            f.gradient_covariance = f.gradient_covariance - 10 * torch.eye(
                f.gradient_covariance.shape[0], dtype=f.gradient_covariance.dtype
            )
        return out


class WrongDtype(ReferenceKFAC):
    name = "wrong_dtype"

    def compute(self, request):
        out = super().compute(request)
        for f in out.values():
            f.input_covariance = f.input_covariance.float()
        return out


class MissesLayer(ReferenceKFAC):
    name = "misses_layer"

    def compute(self, request):
        out = super().compute(request)
        out.pop(next(iter(out)))
        return out


class ModifiesModel(ReferenceKFAC):
    name = "modifies_model"

    def compute(self, request):
        with torch.no_grad():
            next(request.model.parameters()).add_(1.0)
        return super().compute(request)


class Slow(ReferenceKFAC):
    name = "slow"

    def compute(self, request):
        time.sleep(3)
        return super().compute(request)


class NotADict(ReferenceKFAC):
    name = "not_a_dict"

    def compute(self, request):
        return [1, 2]


@pytest.mark.parametrize(
    "impl, message",
    [
        (Raises, "RuntimeError: boom"),
        (ReturnsNaN, "NaN or inf"),
        (WrongShape, "input_covariance of shape"),
        (Swapped, "factors swapped"),
        (NonSymmetric, "not symmetric"),
        (Indefinite, "not positive semi-definite"),
        (WrongDtype, "dtype torch.float32"),
        (MissesLayer, "misses layer"),
        (ModifiesModel, "modified the model"),
        (NotADict, "expected a dict"),
    ],
    ids=lambda x: getattr(x, "name", "msg"),
)
def test_broken_candidate_is_reported_and_the_run_goes_on(impl, message):
    records = records_of(impl(), families=["robustness", "agreement"])
    assert records, "the run produced records"
    bad = [r for r in records if r.status in ("failed", "error")]
    assert bad and all(message in r.message for r in bad), {r.message for r in bad}
    wellformed = [r for r in records if r.check == "wellformed"]
    assert all(r.status == "failed" for r in wellformed)


def test_time_limit_is_enforced():
    session = CheckSession(Slow(), time_limit=0.5)
    case = next(c for c in CASES if c.id == "mlp_tanh_cro_mean")
    items = [it for it in collect(session.impl, [case]) if it.check == "wellformed"]
    record = items[0].run(session)
    assert record.status == "failed" and "time limit" in record.message


def test_a_broken_candidate_does_not_change_other_results():
    """The model is copied per call: a candidate modifying it affects only itself."""
    case = next(c for c in CASES if c.id == "mlp_tanh_cro_mean")
    before = [p.clone() for p in case.build().model.parameters()]
    records_of(ModifiesModel(), cases=case.id, families=["robustness"])
    after = list(case.build().model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(r.status == "passed" for r in records_of(ReferenceKFAC(), cases=case.id))


def test_dense_and_operator_forms_and_cvec_layout():
    """DenseBlock (rvec, cvec) and MatVecBlock forms pass when they are right."""
    from kfac_oracle.contract import MatVecBlock
    from kfac_oracle.conventions import cvec_to_rvec_permutation, kronecker_block

    class Dense(ReferenceKFAC):
        name = "dense"
        layout = "rvec"

        def compute(self, request):
            out = {}
            for name, f in super().compute(request).items():
                B = kronecker_block(f)
                if self.layout == "cvec":
                    module = request.model.get_submodule(name)
                    d_out, d_in = module.weight.shape[0], module.weight[0].numel()
                    perm = cvec_to_rvec_permutation(
                        d_out, d_in, module.bias is not None
                    )
                    inv = torch.argsort(perm)
                    B = B[inv][:, inv]
                    out[name] = DenseBlock(B, layout="cvec")
                elif self.layout == "matvec":
                    out[name] = MatVecBlock(lambda v, B=B: B @ v, B.shape[0])
                else:
                    out[name] = DenseBlock(B)
            return out

    for layout in ("rvec", "cvec", "matvec"):
        impl = Dense()
        impl.layout = layout
        records = records_of(impl, families=["agreement", "exactness"])
        assert all(r.status == "passed" for r in records), layout


def test_expected_failures_are_strict():
    from tests.mutants import ReductionIgnored

    records = records_of(ReferenceKFAC(), expected_failures={"agree_*": "no reason"})
    unexpected = [r for r in records if r.check.startswith("agree_")]
    assert all(
        r.status == "failed" and "unexpectedly passed" in r.message for r in unexpected
    )
    records = records_of(
        ReductionIgnored(), expected_failures={"*": "known"}, families=["agreement"]
    )
    assert {r.status for r in records} <= {"xfailed", "passed", "unsupported", "failed"}
    assert any(r.status == "xfailed" for r in records)
    with pytest.warns(UserWarning, match="matches no check"):
        records_of(ReferenceKFAC(), expected_failures={"no_such_check*": "x"})


def test_capabilities_make_checks_unsupported():
    class OnlyType2(ReferenceKFAC):
        name = "only_type2"
        capabilities = {
            **ReferenceKFAC.capabilities,
            "fisher_type": {"type-2"},
            "losses": {"MSELoss"},
        }

    records = records_of(OnlyType2())
    ce = [r for r in records if r.case == "mlp_tanh_cro_mean"]
    assert ce and all(r.status == "unsupported" for r in ce)
    mse = [r for r in records if r.case == "conv_stack_pool_mse_mean"]
    assert {r.status for r in mse} == {"passed", "unsupported"}


def test_resolve_implementation_errors():
    with pytest.raises(ImplementationError, match="unknown implementation"):
        resolve_implementation("no-such-builtin")
    with pytest.raises(ImplementationError, match="cannot import"):
        resolve_implementation("no_such_module_xyz:Thing")
    with pytest.raises(ImplementationError, match="compute"):
        resolve_implementation(object())


MY_KFAC = textwrap.dedent(
    """
    from kfac_oracle.reference.candidate import ReferenceKFAC
    from kfac_oracle.reference.kfac import KFACSteps


    class _Steps(KFACSteps):
        def reduction_factor(self, problem):
            return 1.0


    class MyKFAC(ReferenceKFAC):
        name = "my-kfac"
        capabilities = {
            "fisher_type": {"type-2", "empirical"},
            "kfac_approx": {"expand", "reduce"},
            "layers": {"Linear", "Conv2d"},
            "losses": {"MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"},
        }


    class BrokenKFAC(MyKFAC):
        name = "broken"
        steps_class = _Steps
    """
)


def test_cli_check_json_exit_codes(tmp_path):
    (tmp_path / "my_kfac.py").write_text(MY_KFAC)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "kfac_oracle.cli", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )

    ok = cli(
        "check",
        "my_kfac:MyKFAC",
        "--cases",
        "mlp_tanh_cro_mean",
        "--json",
        "out.json",
        "--report",
        "r.md",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    records = json.loads((tmp_path / "out.json").read_text())
    for key in (
        "check",
        "case",
        "layer",
        "status",
        "error",
        "tolerance",
        "diagnosis",
        "message",
    ):
        assert key in records[0]
    assert "# Conformance of my-kfac" in (tmp_path / "r.md").read_text()
    bad = cli(
        "check",
        "my_kfac:BrokenKFAC",
        "--cases",
        "mlp_tanh_cro_mean",
        "--plots",
        "plots",
    )
    assert bad.returncode == 1
    assert (
        "diagnosis: a constant factor too large by N (reduction over the data)"
        in bad.stdout
    )
    assert list((tmp_path / "plots").glob("*.png"))
    assert cli("check", "no_module:X").returncode == 2


def test_pytest_plugin_in_an_empty_directory(pytester):
    pytester.makepyfile(my_kfac=MY_KFAC)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--kfac-impl",
        "my_kfac:MyKFAC",
        "--kfac-cases",
        "mlp_tanh_cro_mean",
    )
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 5 and "failed" not in outcomes, outcomes
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--kfac-impl",
        "my_kfac:BrokenKFAC",
        "--kfac-cases",
        "mlp_tanh_cro_mean",
        "-k",
        "agree_type-2",
    )
    result.stdout.fnmatch_lines(
        [
            "*agree_type-2_expand[[]mlp_tanh_cro_mean-0[]]: failed*",
            "*diagnosis: a constant factor too large by N*",
            "*reproduce: kfac-oracle check my_kfac:BrokenKFAC"
            " --cases mlp_tanh_cro_mean*",
        ]
    )
    assert result.ret == 1


def test_plugin_without_option_collects_nothing_extra(pytester):
    pytester.makepyfile(test_a="def test_a():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_parametrize_with_checks(pytester):
    pytester.makepyfile(my_kfac=MY_KFAC)
    pytester.makepyfile(
        test_mine=textwrap.dedent(
            """
            from kfac_oracle.testing import parametrize_with_checks
            from my_kfac import BrokenKFAC, MyKFAC


            @parametrize_with_checks(MyKFAC(), cases="mlp_tanh_cro_mean")
            def test_good(check):
                check()


            @parametrize_with_checks(
                BrokenKFAC(),
                cases="mlp_tanh_cro_mean",
                expected_failures={
                    "agree_*": "reduction not yet applied",
                    "current_parameters": "same",
                    "mean_vs_sum": "same",
                    "no_such_check": "warns",
                },
            )
            def test_broken(check):
                check()
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "default")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 9 and outcomes["xfailed"] >= 4, outcomes
    assert "failed" not in outcomes, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["*matches no check*"])


def test_plugin_imports_no_torch():
    """The pytest11 entry point must stay light: no torch unless --kfac-impl."""
    code = "import sys, kfac_oracle.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
