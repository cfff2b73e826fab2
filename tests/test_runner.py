"""The runner against hostile and clumsy candidates (tests/candidates.py).

A broken candidate is reported with a clear message and the run goes on; nothing a
candidate does — raising anything, ``sys.exit``, crashing, hanging, swallowing the
time limit, reusing its output buffers, leaving global state behind — can give a
green run for a wrong result or a false failure of a right one.
"""

from __future__ import annotations

import threading

import pytest
import torch

from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.runner.run import run
from tests import candidates as c

SMALL = "mlp_tanh_cro_mean,conv_stack_pool_mse_mean"
ONE = "deep_linear_d1_bias_mse_mean"
BOTH = ("process", "none")


def records_of(impl, cases=SMALL, isolation="process", **kw):
    kw.setdefault("time_limit", 20.0)
    return run(impl, cases, isolation=isolation, **kw)


def by_check(records, name):
    return [r for r in records if r.check == name]


@pytest.mark.parametrize(
    "impl, message",
    [
        (c.Raises, "RuntimeError: boom"),
        (c.ReturnsNaN, "NaN or inf"),
        (c.WrongShape, "input_covariance of shape"),
        (c.Swapped, "factors swapped"),
        (c.NonSymmetric, "not symmetric"),
        (c.Indefinite, "not positive semi-definite"),
        (c.WrongDtype, "dtype torch.float32"),
        (c.MissesLayer, "misses layer"),
        (c.ModifiesModel, "modified the model"),
        (c.NotADict, "expected a dict"),
        (c.CastsModel, "dtype torch.float64 became torch.float32"),
        (c.AddsBuffer, "changed the model's parameters or buffers"),
        (c.HugeMatVec, "MatVecBlock.size 1000000, expected"),
        (c.NumpyOnes, "returned torch.float32 vectors, expected torch.float64"),
        (c.IntKeys, "keys must be module names"),
        (c.SparseFactor, "sparse"),
    ],
    ids=lambda x: getattr(x, "name", "msg"),
)
def test_broken_candidate_is_an_error_with_its_message(impl, message):
    """One crash, one status: every check needing the call is an error, same text."""
    records = records_of(impl(), families=["robustness", "agreement"])
    bad = [r for r in records if r.status in ("failed", "error")]
    assert bad and all(message in r.message for r in bad if r.check != "side_effects")
    assert all(r.status == "error" for r in by_check(records, "wellformed"))
    assert not any(
        r.status == "passed" for r in by_check(records, "agree_type-2_expand")
    )


def test_one_dim_bias_covariance_is_named():
    records = records_of(c.OneDimBiasCovariance(), cases=ONE, checks="wellformed")
    assert records[0].status == "error"
    assert "bias_covariance of shape (4,), expected (4, 4)" in records[0].message


@pytest.mark.parametrize(
    "impl",
    [c.Transposed, c.NumpyFactors, c.Dense, c.ReusesBuffer],
    ids=lambda x: x.name,
)
def test_correct_results_in_every_accepted_form_pass(impl):
    """Transposed views, numpy arrays, dense blocks, reused output buffers: all pass."""
    records = records_of(impl(), cases="mlp_tanh_mse_mean,conv_stack_pool_mse_mean")
    bad = [
        f"{r.id}: {r.message}"
        for r in records
        if r.status not in ("passed", "unsupported")
    ]
    assert not bad, bad
    assert sum(r.status == "passed" for r in records) > 20


@pytest.mark.parametrize("form", ["numpy", "matvec"])
def test_dense_numpy_and_operator_forms_pass(form):
    impl = c.Dense()
    impl.form = form
    records = records_of(impl, families=["agreement", "exactness"])
    assert all(r.status == "passed" for r in records), form


def test_buffer_reuse_cannot_hide_a_first_batch_bug():
    """Results are copied on receipt: the batching invariances still see the bug."""
    records = records_of(c.FirstBatchReusesBuffer(), cases="mlp_tanh_mse_mean")
    for name in ("batch_split", "shuffle"):
        (record,) = by_check(records, name)
        assert record.status == "failed" and record.error > 0.1, record.message


@pytest.mark.parametrize("isolation", BOTH)
def test_time_limit_is_enforced(isolation):
    impl = c.Slow()
    records = records_of(
        impl, cases=ONE, checks="wellformed", isolation=isolation, time_limit=0.5
    )
    assert records[0].status == "error" and "time limit of 0.5 s" in records[0].message


@pytest.mark.parametrize("isolation", BOTH)
@pytest.mark.parametrize(
    "impl",
    [c.SwallowsTimeout, c.OwnAlarm, c.LazyMatVec, c.LazyMapping],
    ids=lambda x: x.name,
)
def test_time_limit_cannot_be_bypassed(impl, isolation):
    """Swallowed, replaced, or outrun by lazy work: the call is still a timeout."""
    records = records_of(
        impl(), cases=ONE, checks="wellformed", isolation=isolation, time_limit=1.0
    )
    assert records[0].status == "error", records[0].message
    assert "time limit" in records[0].message


def test_time_limit_off_the_main_thread_is_measured_and_noted():
    out = {}

    def target():
        out["records"] = run(
            c.Slow(), ONE, checks="wellformed", isolation="none", time_limit=0.5
        )

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    (record,) = out["records"]
    assert record.status == "error" and "measured" in record.message


@pytest.mark.parametrize(
    "impl, message",
    [
        (c.ExitsZero, "called sys.exit(0)"),
        (c.RaisesBaseException, "CustomBaseException: not an Exception"),
        (c.HardExit, "exited with status 0 (os._exit?)"),
        (c.Segfaults, "was killed by SIGSEGV"),
        (c.HangsInC, "time limit of 2 s (the candidate's process was killed)"),
    ],
    ids=lambda x: getattr(x, "name", "msg"),
)
def test_a_candidate_cannot_end_or_block_the_run(impl, message):
    """In its worker process: exits, crashes and hangs in C become error records."""
    records = records_of(impl(), cases=ONE, time_limit=2.0)
    assert records and all(r.status in ("error", "unsupported") for r in records)
    assert all(message in r.message for r in records if r.status == "error")
    later = records_of(ReferenceKFAC(), cases=ONE, checks="wellformed")
    assert later[0].status == "passed"


@pytest.mark.parametrize("isolation", BOTH)
def test_sys_exit_and_base_exceptions_in_process(isolation):
    for impl, message in (
        (c.ExitsZero, "sys.exit(0)"),
        (c.RaisesBaseException, "not an"),
    ):
        records = records_of(
            impl(), cases=ONE, checks="wellformed", isolation=isolation
        )
        assert records[0].status == "error" and message in records[0].message


@pytest.mark.parametrize("isolation", BOTH)
@pytest.mark.parametrize(
    "impl, leftover",
    [
        (
            c.LeavesDefaultDtype,
            "default dtype changed from torch.float32 to torch.float64",
        ),
        (c.LeavesDefaultDevice, "default device changed"),
        (c.LeavesHook, "forward hook(s) left on module '(the model)'"),
        (c.LeavesEvalMode, "left in eval mode"),
        (c.ReseedsGlobalRNG, "random number generator"),
        (c.GlobalHookSabotage, "global forward hook(s) installed"),
    ],
    ids=lambda x: getattr(x, "name", "msg"),
)
def test_side_effects_fail_their_check_and_nothing_else(impl, leftover, isolation):
    """Leftovers are named by ``side_effects``; torch's global state is restored, so
    the catalogue's problems and the other verdicts do not change."""
    dtype = torch.get_default_dtype()
    records = records_of(
        impl(),
        cases="deep_linear_d1_bias_mse_mean,mlp_tanh_mse_mean",
        isolation=isolation,
    )
    assert torch.get_default_dtype() == dtype
    effects = by_check(records, "side_effects")
    assert len(effects) == 2 and all(r.status == "failed" for r in effects)
    assert all(leftover in r.message for r in effects), effects[0].message
    others = [r for r in records if r.check != "side_effects"]
    if impl is c.GlobalHookSabotage:  # its own results are wrong: caught as such
        assert any(r.status == "failed" for r in others)
    else:
        bad = [
            f"{r.id}: {r.message}"
            for r in others
            if r.status not in ("passed", "unsupported")
        ]
        assert not bad, bad


def test_reference_leaves_nothing_behind():
    records = records_of(ReferenceKFAC(), checks="side_effects")
    assert all(r.status == "passed" for r in records)


def test_a_broken_candidate_does_not_change_other_results():
    """The model is built fresh per call: a candidate modifying it affects only
    itself."""
    case = "mlp_tanh_cro_mean"
    records_of(c.ModifiesModel(), cases=case, families=["robustness"])
    reference = ReferenceKFAC(operations=True)
    assert all(r.status == "passed" for r in records_of(reference, cases=case))


def test_results_do_not_depend_on_the_default_dtype():
    """Catalogue data and models are built in fixed dtypes, whatever the default."""
    from kfac_oracle.catalogue import load_cases

    (case,) = load_cases("mlp_tanh_mse_mean")
    a = case.build()
    torch.set_default_dtype(torch.float64)
    b = case.build()
    assert torch.equal(a.data[0][0], b.data[0][0])
    assert all(
        torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters())
    )


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


def test_not_implemented_everywhere_is_unsupported():
    records = records_of(c.AllNotImplemented(), cases=ONE)
    assert {r.status for r in records} == {"unsupported"}
    assert all(
        "nothing yet" in r.message
        for r in records
        # operations are not declared: unsupported by the capabilities alone
        if r.check not in ("bias_modes", "side_effects") and r.family != "operations"
    )


def test_harness_errors_keep_their_traceback(monkeypatch):
    import dataclasses

    from kfac_oracle.checks import registry

    def wellformed(ctx):
        raise KeyError("harness bug")

    specs = [
        dataclasses.replace(s, function=wellformed) if s.name == "wellformed" else s
        for s in registry._CHECKS
    ]
    monkeypatch.setattr(registry, "_CHECKS", specs)
    records = records_of(ReferenceKFAC(), cases=ONE, checks="wellformed")
    assert records[0].status == "error"
    assert "harness error: KeyError('harness bug')" in records[0].message
    assert "Traceback" in records[0].message


def test_single_batch_separates_the_mathematics_from_the_accumulation():
    """A candidate wrong only in how it weights batches: right in single-batch mode
    (agreement passes), while the batching invariances still catch it."""
    from tests.mutants import EqualBatchWeights

    case = "mlp_tanh_mse_mean"  # batches (4, 2, 3)
    normal = records_of(EqualBatchWeights(), cases=case, checks="agree_*,batch_split")
    single = run(
        EqualBatchWeights(), case, checks="agree_*,batch_split", single_batch=True
    )
    assert any(r.status == "failed" for r in normal if r.check.startswith("agree_"))
    assert all(r.status == "passed" for r in single if r.check.startswith("agree_"))
    assert by_check(single, "batch_split")[0].status == "failed"
    assert "--single-batch" in single[0].reproduce


def test_warnings_are_collected_once_per_distinct_warning():
    import warnings

    from kfac_oracle.runner.run import Session

    class Warns(ReferenceKFAC):
        name = "warns"

        def compute(self, request):
            warnings.warn("deprecated option", DeprecationWarning, stacklevel=1)
            return super().compute(request)

    session = Session.start(Warns(), isolation="process")
    try:
        run(None, ONE, session=session)
        assert session.caller.warnings == {
            "DeprecationWarning: deprecated option": session.caller.calls(ONE)
        }
    finally:
        session.close()
