"""The pytest plugin: collection, selection, expected failures, "nothing passed"."""

from __future__ import annotations

import subprocess
import sys

import pytest
import scipy.linalg  # noqa: F401 - loaded before pytester snapshots sys.modules

from tests.test_cli import MY_KFAC

pytest_plugins = ["pytester"]
CASE = "mlp_tanh_cro_mean"


def run(pytester, *args):
    pytester.makepyfile(my_kfac=MY_KFAC)
    return pytester.runpytest_inprocess(*args)


def test_plugin_in_an_empty_directory(pytester):
    result = run(
        pytester,
        "-p",
        "no:cacheprovider",
        "--kfac-impl",
        "my_kfac:MyKFAC",
        "--kfac-cases",
        CASE,
    )
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 5 and "failed" not in outcomes, outcomes


def test_failure_shows_diagnosis_and_reproduce_line(pytester):
    result = run(
        pytester,
        "-p",
        "no:cacheprovider",
        "--kfac-impl",
        "my_kfac:BrokenKFAC",
        "--kfac-cases",
        CASE,
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


def test_items_are_collected_like_tests(pytester):
    """--co counts the items; --lf reruns only the failures of the last run."""
    args = ["--kfac-impl", "my_kfac:BrokenKFAC", "--kfac-cases", CASE]
    result = run(pytester, "--co", "-q", *args)
    assert re.search(r"(\d+) tests? collected", result.stdout.str())
    first = run(pytester, *args)
    failed = first.parseoutcomes()["failed"]
    again = run(pytester, "--lf", *args)
    outcomes = again.parseoutcomes()
    assert outcomes["failed"] == failed and "passed" not in outcomes, outcomes


def test_float32_run(pytester):
    result = run(
        pytester,
        "-p",
        "no:cacheprovider",
        "--kfac-impl",
        "my_kfac:BrokenKFAC",
        "--kfac-dtype",
        "float32",
        "--kfac-checks",
        f"agree_type-2_expand[{CASE}-0]",
    )
    result.assert_outcomes(failed=1)
    assert "float32 run: tolerance" in result.stdout.str()


def test_single_check_by_id(pytester):
    result = run(
        pytester,
        "-p",
        "no:cacheprovider",
        "--kfac-impl",
        "my_kfac:BrokenKFAC",
        "--kfac-checks",
        f"agree_type-2_expand[{CASE}-0]",
    )
    result.assert_outcomes(failed=1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kfac-checks", "exactness"], "matches no check"),
        (["--kfac-xfail", "missing.json"], "cannot read expected failures"),
        (["--kfac-impl", "my_kfac:Typo"], "unknown value 'type2'"),
        (["--kfac-cases", "nothing_like_this"], "no case matches"),
        (["--kfac-dtype", "float16"], "unknown dtype 'float16'"),
    ],
)
def test_usage_errors(pytester, args, message):
    base = [
        "-p",
        "no:cacheprovider",
        "--kfac-impl",
        "my_kfac:MyKFAC",
        "--kfac-cases",
        CASE,
    ]
    result = run(pytester, *base, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_nothing_passed_fails_the_session(pytester):
    args = [
        "-p",
        "no:cacheprovider",
        "--kfac-impl",
        "my_kfac:NothingYet",
        "--kfac-cases",
        CASE,
    ]
    result = run(pytester, *args)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*kfac-oracle: nothing passed*"])
    assert run(pytester, *args, "--kfac-allow-nothing-passed").ret == 0


def test_ini_options(pytester):
    pytester.makeini(f"[pytest]\nkfac_impl = my_kfac:MyKFAC\nkfac_cases = {CASE}\n")
    result = run(pytester, "-p", "no:cacheprovider")
    assert result.parseoutcomes()["passed"] >= 5


def test_plugin_without_option_collects_nothing_extra(pytester):
    pytester.makepyfile(test_a="def test_a():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_plugin_imports_no_torch():
    """The pytest11 entry point must stay light: no torch unless --kfac-impl."""
    code = "import sys, kfac_oracle.plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


import re  # noqa: E402
