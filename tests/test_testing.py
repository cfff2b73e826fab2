"""``parametrize_with_checks`` in a library's own test suite."""

from __future__ import annotations

import textwrap

from tests.test_cli import MY_KFAC

pytest_plugins = ["pytester"]


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
                    "mean_vs_sum": "",
                    "no_such_check": "warns",
                },
            )
            def test_broken(check):
                check()
            """
        )
    )
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-W", "default", "-rx"
    )
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 9 and outcomes["xfailed"] >= 4, outcomes
    assert "failed" not in outcomes, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["*matches no check*", "*no reason given*"])


def test_reproduce_line_names_module_and_class(pytester):
    pytester.makepyfile(my_kfac=MY_KFAC)
    pytester.makepyfile(
        test_mine=textwrap.dedent(
            """
            from kfac_oracle.testing import parametrize_with_checks
            from my_kfac import BrokenKFAC


            @parametrize_with_checks(
                BrokenKFAC(), cases="mlp_tanh_cro_mean", checks="agree_type-2_expand"
            )
            def test_broken(check):
                check()
            """
        )
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*reproduce: kfac-oracle check my_kfac:BrokenKFAC *"])


def test_selection_matching_nothing_is_a_collection_error(pytester):
    pytester.makepyfile(my_kfac=MY_KFAC)
    pytester.makepyfile(
        test_mine=textwrap.dedent(
            """
            from kfac_oracle.testing import parametrize_with_checks
            from my_kfac import MyKFAC


            @parametrize_with_checks(MyKFAC(), cases="mlp_tanh_cro_mean", checks="nope")
            def test_good(check):
                check()
            """
        )
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*matches no check*"])


def test_nothing_passed_fails_the_session(pytester):
    pytester.makepyfile(my_kfac=MY_KFAC)
    pytester.makepyfile(
        test_mine=textwrap.dedent(
            """
            from kfac_oracle.testing import parametrize_with_checks
            from my_kfac import NothingYet


            @parametrize_with_checks(NothingYet(), cases="mlp_tanh_cro_mean")
            def test_nothing(check):
                check()
            """
        )
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*kfac-oracle: nothing passed*"])
