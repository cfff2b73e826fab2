"""float32 verdicts: tolerances from the measured rounding model (kfac_oracle.rounding).

A right float32 candidate passes, one off by a pitfall fails, and so does one whose
arithmetic is coarser than float32 (bfloat16 factors): the tolerance is a rounding
tolerance, not a loose one.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kfac_oracle.capabilities import Capabilities
from kfac_oracle.catalogue import get_case
from kfac_oracle.contract import KFACRequest
from kfac_oracle.errors import CapabilityError
from kfac_oracle.flavours import Flavour
from kfac_oracle.reference.approximations import approximation
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.rounding import (
    FLOOR_UNITS,
    ROUNDING_FACTOR,
    UNIT_ROUNDOFF,
    RoundingTolerance,
    reorder,
)
from kfac_oracle.runner.caller import build_problem
from kfac_oracle.runner.run import Session, run
from tests.mutants import MCNoOneOverM, MSEHalf, ReductionIgnored, StaleParameters

CASES = ["mlp_tanh_cro_mean", "conv_pool_k3_pad1_mse_mean", "seq_ce_mean"]
FLOAT32_FAMILIES = ["agreement", "exactness", "robustness"]


class RoundedThrough(ReferenceKFAC):
    """The reference, its factors rounded through ``dtype`` (a coarser arithmetic)."""

    name = "rounded-through"

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def compute(self, request: KFACRequest):
        factors = super().compute(request)
        return {
            name: dataclasses.replace(
                f,
                input_covariance=f.input_covariance.to(self.dtype).to(torch.float32),
                gradient_covariance=f.gradient_covariance.to(self.dtype).to(
                    torch.float32
                ),
            )
            for name, f in factors.items()
        }


class Float64Inside(ReferenceKFAC):
    """A right float32 candidate that sums differently: float64 inside, then rounded."""

    name = "float64-inside"

    def compute(self, request: KFACRequest):
        wide = dataclasses.replace(
            request,
            model=copy.deepcopy(request.model).double(),
            data=[
                (X.double() if X.is_floating_point() else X, y.double())
                if y.is_floating_point()
                else (X.double() if X.is_floating_point() else X, y)
                for X, y in request.data
            ],
        )
        factors = super().compute(wide)
        return {
            name: dataclasses.replace(
                f,
                input_covariance=f.input_covariance.float(),
                gradient_covariance=f.gradient_covariance.float(),
            )
            for name, f in factors.items()
        }


def _run(impl, cases=CASES, families=FLOAT32_FAMILIES, dtype="float32"):
    return run(
        impl,
        cases=[get_case(c) for c in cases],
        families=families,
        isolation="none",
        dtype=dtype,
    )


def _statuses(records):
    return {r.status for r in records}


def test_the_float32_reference_passes_and_says_what_its_tolerance_rests_on():
    records = _run("reference-float32", dtype=None)
    compared = [r for r in records if r.family in ("agreement", "exactness")]
    assert compared and all(r.status == "passed" for r in compared)
    for r in compared:
        assert "float32 run: tolerance" in r.message
        assert "data orderings" in r.message
        assert 0 < r.tolerance < 1e-4


def test_a_right_float32_candidate_that_sums_differently_passes():
    records = _run(Float64Inside())
    compared = [r for r in records if r.family in ("agreement", "exactness")]
    assert compared and all(r.status == "passed" for r in compared), [
        r.message for r in compared if r.status != "passed"
    ]


@pytest.mark.parametrize("mutant", [MSEHalf, ReductionIgnored])
def test_a_float32_mutant_fails(mutant):
    records = _run(mutant(), cases=["mlp_tanh_mse_mean"])
    assert any(r.status == "failed" for r in records if r.family == "agreement")


def test_bfloat16_arithmetic_is_not_float32():
    records = _run(RoundedThrough(torch.bfloat16), cases=["mlp_tanh_cro_mean"])
    failed = [r for r in records if r.family == "agreement" and r.status == "failed"]
    assert failed
    assert all(r.error > r.tolerance for r in failed)


def test_checks_without_a_float32_verdict_are_unsupported_with_the_reason():
    records = run(
        ReferenceKFAC(operations=True),
        cases=[get_case("mlp_tanh_mse_mean")],
        families=["operations"],
        isolation="none",
        dtype="float32",
    )
    assert records and _statuses(records) == {"unsupported"}
    assert all("defined for float64 only" in r.message for r in records)


MC_CASE = "mc_zero_variance_ce2_mean"


def test_monte_carlo_and_invariances_have_float32_verdicts():
    cases = ["mlp_tanh_cro_mean", MC_CASE, "seq_ce_mean"]
    records = _run("reference-float32", cases=cases, families=["mc", "invariance"])
    assert {r.family for r in records} == {"mc", "invariance"}
    ran = [r for r in records if r.status != "unsupported"]
    assert ran and all(r.status == "passed" for r in ran), [
        (r.id, r.message) for r in ran if r.status != "passed"
    ]


@pytest.mark.parametrize(
    ("mutant", "family"),
    [(MCNoOneOverM, "mc"), (StaleParameters, "invariance")],
    ids=["mc-no-one-over-M", "stale-parameters"],
)
def test_float32_monte_carlo_and_invariance_mutants_fail(mutant, family):
    cases = ["mlp_tanh_cro_mean", MC_CASE]
    records = _run(mutant(), cases=cases, families=[family])
    assert any(r.status == "failed" for r in records)


def test_reordering_changes_the_order_of_the_sums_only():
    case = get_case("seq_ce_mean")
    problem = build_problem(case, "base", torch.float64)
    flavour = Flavour("type-2", "expand", "joint")
    kfac = approximation("kfac")
    base = kfac.blocks(problem, flavour, case.layers)
    for ordering in (1, 2):
        moved = reorder(problem, ordering)
        assert [X.shape for X, _ in moved.data] == [
            X.shape for X, _ in reversed(problem.data)
        ] or [X.shape for X, _ in moved.data] == [X.shape for X, _ in problem.data]
        other = kfac.blocks(moved, flavour, case.layers)
        for layer in case.layers:
            assert torch.allclose(other[layer], base[layer], rtol=1e-12, atol=0)
        assert not all(
            torch.equal(a, b)
            for (a, _), (b, _) in zip(moved.data, problem.data, strict=False)
        )


def test_the_tolerance_has_a_floor_and_scales_the_spread():
    floor = ROUNDING_FACTOR * FLOOR_UNITS * UNIT_ROUNDOFF
    assert RoundingTolerance(0.0, 3).tolerance == floor
    assert RoundingTolerance(1e-6, 3).tolerance == pytest.approx(ROUNDING_FACTOR * 1e-6)


def test_the_dtype_capability_is_validated_and_decides_the_run():
    assert Capabilities.from_mapping({}).compute_dtype() == torch.float64
    both = Capabilities.from_mapping({"dtype": {"float64", "float32"}})
    assert both.compute_dtype() == torch.float64
    assert both.compute_dtype("float32") == torch.float32
    only32 = Capabilities.from_mapping({"dtype": {"float32"}})
    assert only32.compute_dtype() == torch.float32
    with pytest.raises(CapabilityError, match="declares"):
        only32.compute_dtype("float64")
    with pytest.raises(CapabilityError, match="unknown value"):
        Capabilities.from_mapping({"dtype": {"fp32"}})


def test_a_float32_session_gives_the_candidate_float32_and_keeps_float64_references():
    session = Session.start("reference-float32", isolation="none")
    try:
        assert session.caller.dtype == torch.float32
        assert session.references.dtype == torch.float64
        case = get_case("mlp_tanh_mse_mean")
        assert session.references.problem(case).dtype == torch.float64
    finally:
        session.close()


def test_the_reproduce_line_of_a_forced_float32_run_says_so():
    session = Session.start(ReferenceKFAC(), isolation="none", dtype="float32")
    try:
        records = run(
            None,
            cases=[get_case("mlp_tanh_mse_mean")],
            families=["robustness"],
            session=session,
        )
        assert "--dtype float32" in session.reproduce(_item(records[0]))
    finally:
        session.close()


def _item(record):
    from kfac_oracle.runner.run import select_items

    (item,) = select_items([get_case(record.case)], record.id, None)
    return item


class Float64Only(ReferenceKFAC):
    """Declares float64 only."""

    capabilities = {**ReferenceKFAC.capabilities, "dtype": {"float64"}}


def test_cli_rejects_a_float32_run_for_a_float64_only_candidate(capsys):
    from kfac_oracle.cli import main

    status = main(
        [
            "check",
            "tests.test_rounding:Float64Only",
            "--dtype",
            "float32",
            "--cases",
            "mlp_tanh_mse_mean",
            "--isolation",
            "none",
        ]
    )
    assert status == 2
    assert "capabilities['dtype'] declares ['float64']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("impl", "passes"),
    [("reference-float32", True), (Float64Inside(), True), (MSEHalf(), False)],
    ids=["reference-float32", "float64-inside", "mse-half"],
)
def test_float32_verdicts_on_a_large_case(impl, passes):
    from tests.test_large import BY_ID

    records = run(
        impl,
        cases=[BY_ID["large_deep_linear_mse"]],
        families=["agreement", "exactness"],
        isolation="none",
        dtype="float32",
    )
    compared = [r for r in records if r.status != "unsupported"]
    assert compared
    if passes:
        assert all(r.status == "passed" for r in compared)
    else:
        assert any(r.status == "failed" for r in compared)
