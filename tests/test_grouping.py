"""Failures grouped by cause and correlated with case properties."""

from __future__ import annotations

import pytest

from kfac_oracle.catalogue import Case, get_case
from kfac_oracle.grouping import analyse, correlate, exception_key, group_failures
from kfac_oracle.properties import case_properties
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.report import grouped_markdown, grouped_text
from kfac_oracle.runner.run import run

CAPS = {
    "fisher_type": {"type-2"},
    "kfac_approx": {"expand", "reduce"},
    "layers": {"Linear", "Conv2d"},
    "losses": {"MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"},
}


class WrongOnUnequalBatches(ReferenceKFAC):
    """Right on equal batch sizes; G off by 3/2 when the batch sizes differ."""

    name = "wrong-on-unequal-batches"
    capabilities = CAPS

    def compute(self, request):
        out = super().compute(request)
        if len({len(X) for X, _ in request.data}) > 1:
            for f in out.values():
                f.gradient_covariance = 1.5 * f.gradient_covariance
        return out


class WrongOnSum(ReferenceKFAC):
    """Right for ``reduction="mean"``; G off by 3/2 for ``"sum"``."""

    name = "wrong-on-sum"
    capabilities = CAPS

    def compute(self, request):
        out = super().compute(request)
        if request.reduction == "sum":
            for f in out.values():
                f.gradient_covariance = 1.5 * f.gradient_covariance
        return out


class Raises(ReferenceKFAC):
    name = "raises"
    capabilities = CAPS

    def compute(self, request):
        raise RuntimeError("boom")


def _run(impl, case_ids, checks="agree_*"):
    cases = [get_case(c) for c in case_ids]
    records = run(impl, cases, checks=checks, isolation="none")
    return records, cases


def test_failing_exactly_on_unequal_batch_sizes_is_named():
    ids = [
        "deep_linear_d1_bias_mse_mean",  # batches (4, 3)
        "mlp_tanh_cro_mean",  # (5, 3)
        "one_datum_mse_mean",  # (1,)
        "seq_bce_soft_mean",  # (2, 2)
    ]
    records, cases = _run(WrongOnUnequalBatches(), ids)
    (group,) = analyse(records, cases)
    assert group.cases == {"deep_linear_d1_bias_mse_mean", "mlp_tanh_cro_mean"}
    assert group.correlation.startswith(
        "exactly the cases with unequal batch sizes (2 of 4 checked cases)"
    )
    assert "exactly the cases with unequal batch sizes" in grouped_text(records, cases)


def test_failing_on_sum_cases_names_the_reduction_and_the_passing_mean_twins():
    ids = [
        "deep_linear_d1_bias_mse_mean",
        "deep_linear_d1_bias_mse_sum",
        "mlp_tanh_cro_mean",
        "mlp_tanh_cro_sum",
    ]
    records, cases = _run(WrongOnSum(), ids)
    (group,) = analyse(records, cases)
    assert group.cases == {"deep_linear_d1_bias_mse_sum", "mlp_tanh_cro_sum"}
    assert group.correlation.startswith(
        "exactly the cases with reduction sum (2 of 4 checked cases)"
    )
    assert "twins differing only in reduction pass (mean; for 2 of the 2" in (
        group.correlation
    )


def test_identical_exceptions_collapse_into_one_line_with_their_count():
    records, cases = _run(Raises(), ["deep_linear_d1_bias_mse_mean"], checks=None)
    errors = [r for r in records if r.status == "error"]
    assert len(errors) > 3
    (group,) = group_failures(records)
    assert group.kind == "exception" and group.count == len(errors)
    text = grouped_text(records, cases)
    lines = text.splitlines()
    n = len(errors)
    assert lines[0] == f"failures by cause: 0 failed, {n} errored, in 1 group(s)"
    assert lines[1].strip() == (
        f"{len(errors)}× exception: compute() raised RuntimeError: boom"
    )
    assert lines[3].strip().startswith("reproduce: kfac-oracle check ")
    assert len(lines) == 4
    assert grouped_markdown(records, cases).count("boom") == 1


def test_exceptions_differing_only_in_numbers_are_one_group():
    def record(case, message):
        return {"check": "agree", "case": case, "status": "error", "message": message}

    records = [
        record("a", "compute() raised RuntimeError: shapes (4x5 and 3x2)\nTraceback"),
        record("b", "compute() raised RuntimeError: shapes (2x7 and 9x2)"),
        record("c", "compute() raised ValueError: at 0x7f00ab12"),
    ]
    groups = group_failures(records)
    assert [g.count for g in groups] == [2, 1]
    assert groups[0].varies and groups[0].label.endswith("(numbers vary)")
    assert exception_key("x 0x7f00ab12 y") == exception_key("x 0xdeadbeef y")
    assert exception_key("shape 4") != exception_key("dtype float")


def test_diagnoses_group_as_opaque_strings_and_undiagnosed_by_check():
    records = [
        {"check": "agree", "case": "a", "status": "failed", "diagnosis": "d1"},
        {"check": "exact", "case": "b", "status": "failed", "diagnosis": "d1"},
        {"check": "agree", "case": "c", "status": "failed", "diagnosis": "d1 "},
        {"check": "wellformed", "case": "c", "status": "failed", "diagnosis": None},
        {"check": "agree", "case": "d", "status": "passed"},
        {"check": "agree", "case": "e", "status": "xfailed"},
    ]
    groups = group_failures(records)
    assert [(g.kind, g.text, g.count) for g in groups] == [
        ("diagnosis", "d1", 2),
        ("diagnosis", "d1 ", 1),
        ("undiagnosed", "wellformed", 1),
    ]


PROPS = {
    "a": {"batch sizes": "unequal batch sizes", "reduction": "reduction sum"},
    "b": {"batch sizes": "unequal batch sizes", "reduction": "reduction mean"},
    "c": {"batch sizes": "equal batch sizes", "reduction": "reduction sum"},
    "d": {"batch sizes": "equal batch sizes", "reduction": "reduction mean"},
}


@pytest.mark.parametrize(
    "failing, expected",
    [
        (
            {"a", "b"},
            "exactly the cases with unequal batch sizes (2 of 4 checked cases)",
        ),
        ({"a", "c"}, "exactly the cases with reduction sum (2 of 4 checked cases)"),
        ({"a", "b", "c", "d"}, "every case where these checks ran (4)"),
        ({"c"}, "only case c (of 4 checked cases)"),
    ],
)
def test_correlation_is_computed_from_the_properties(failing, expected):
    assert correlate(failing, set(PROPS), PROPS) == expected


def test_two_properties_together_are_named_when_no_single_one_separates():
    props = {**PROPS, "e": PROPS["a"]}
    assert correlate({"a", "e"}, set(props), props) == (
        "exactly the cases with unequal batch sizes and reduction sum"
        " (2 of 5 checked cases)"
    )


def test_the_smallest_property_holding_every_failing_case_is_named():
    props = {**PROPS, "e": PROPS["a"], "f": PROPS["b"]}
    assert correlate({"a", "b", "f"}, set(props), props) == (
        "only cases with unequal batch sizes: 3 of its 4 (of 6 checked cases)"
    )


def test_no_separating_property_is_said_so():
    props = {"a": {"k": "x"}, "b": {"k": "x"}, "c": {"k": "x"}}
    assert correlate({"a", "b"}, set(props), props) == (
        "2 of 3 cases; no case property separates them"
    )


def test_properties_are_derived_from_the_model_data_and_loss():
    inplace = case_properties(get_case("mlp_relu_inplace_mse_sum"))
    assert inplace["in-place"] == "in-place activations"
    assert inplace["reduction"] == "reduction sum"
    assert inplace["batch sizes"] == "unequal batch sizes"
    assert inplace["batches"] == "3 batches"
    assert inplace["layer inputs"] == "2-D layer inputs"
    plain = case_properties(get_case("mlp_relu_mse_sum"))
    assert plain["in-place"] == "no in-place module"
    conv = case_properties(get_case("conv_pool_k3_stride2_mse_mean"))
    assert conv["conv stride"] == "Conv2d stride > 1"
    assert conv["conv padding"] == "no Conv2d padding"
    assert conv["layer inputs"] == "3-D+ layer inputs"
    assert conv["output"] == "2-D outputs"
    assert conv["setting"] == "weight sharing reduce"
    # A case outside the catalogue gets its properties from the same function.
    mine = Case(
        id="mine",
        family="mine",
        model=[("Conv2d", 1, 2, 3, {"dilation": 2, "bias": False}), ("Flatten",)],
        input_shape=(1, 6, 6),
        loss="CrossEntropyLoss",
        batch_sizes=(2, 2),
    )
    props = case_properties(mine)
    assert props["conv dilation"] == "Conv2d dilation > 1"
    assert props["bias"] == "no bias"
    assert props["batch sizes"] == "equal batch sizes"
    assert props["loss"] == "loss CrossEntropyLoss"


def test_exception_keys_keep_names_with_digits_apart():
    assert exception_key("dtype torch.float32") != exception_key("dtype torch.float64")


def test_every_adapter_of_the_published_matrix_fits_on_one_screen():
    """The grouped report of each adapter of docs/matrix.json.gz: at most 50 lines."""
    import gzip
    import json
    from pathlib import Path

    from kfac_oracle.catalogue import load_cases

    path = Path(__file__).parent.parent / "docs" / "matrix.json.gz"
    with gzip.open(path, "rt") as f:
        records = json.load(f)
    cases = load_cases()
    names = sorted({r["implementation"] for r in records})
    sizes = {}
    for name in names:
        mine = [r for r in records if r["implementation"] == name]
        sizes[name] = len(grouped_text(mine, cases).splitlines())
    assert max(sizes.values()) <= 50, sizes
    assert max(sizes.values()) > 10  # not vacuous: some adapter has several causes


def test_groups_beyond_the_limit_are_summed_up_in_one_line():
    records = [
        {"check": "agree", "case": "a", "status": "failed", "diagnosis": f"d{k}"}
        for k in range(20)
    ]
    lines = grouped_text(records, max_groups=3).splitlines()
    assert lines[-1] == (
        "  ... and 17 more group(s) of 17 check(s) (--verbose or --json)"
    )
    assert len(lines) == 1 + 3 * 3 + 1


def test_the_markdown_report_has_the_per_check_table_only_when_verbose():
    from kfac_oracle.report import markdown_report
    from kfac_oracle.runner.records import CheckRecord

    records = [
        CheckRecord("agree", f"c{k}", "0", "agreement", "failed", 0.5, 1e-10, "d")
        for k in range(3)
    ]
    short = markdown_report(records, "T")
    assert "## Failures by cause" in short and "| 3 | diagnosis: d |" in short
    assert "## Failures\n" not in short
    long = markdown_report(records, "T", verbose=True)
    assert long.count("| failed | 5.000e-01 | d |") == 3
