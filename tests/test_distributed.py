"""The distributed mode: shards, the data-parallel reference, mutants, crashes, cleanup.

Runs at ``W = 2`` and ``3`` on two small cases (one with weight sharing); the whole
catalogue at ``W = 2`` is ``-m slow``.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from kfac_oracle.capabilities import Capabilities
from kfac_oracle.catalogue import load_cases
from kfac_oracle.cli import main
from kfac_oracle.distributed.run import DistributedSession, run
from kfac_oracle.distributed.shards import replicate, shard, shard_sizes, union
from kfac_oracle.errors import CapabilityError, Unsupported
from tests.dist_mutants import (
    DISTRIBUTED_MUTANTS,
    MisbehavingRank,
    Rank1ReseedsTorch,
    SingleProcessOnly,
)

MLP = "mlp_tanh_mse_mean"  # MSE: MC labels are continuous; has an MC claim
SHARED = "seq_ce_sum"  # weight sharing: expand and reduce
CASES = f"{MLP},{SHARED}"
AGREE = "dist_agree_*,dist_ranks_agree_*"


def _bad(records):
    return [r for r in records if r.status in ("failed", "error")]


@pytest.mark.parametrize("N,W", [(3, 2), (4, 3), (7, 2), (9, 3), (33, 3)])
def test_shards_are_unequal_cover_the_data_and_one_rank_has_two_batches(N, W):
    X = torch.arange(float(N)).reshape(N, 1)
    data = [(X[:2], X[:2]), (X[2:], X[2:])]
    shards = shard(data, W)
    sizes = [sum(len(x) for x, _ in s) for s in shards]
    assert sizes == shard_sizes(N, W) and sum(sizes) == N
    assert len(set(sizes)) > 1 and min(sizes) >= 1
    assert len(shards[-1]) == 2
    assert torch.equal(torch.cat([x for x, _ in union(shards)]), X)
    assert all(len(s) == 2 for s in replicate(data, W))


def test_too_few_data_for_unequal_shards_is_unsupported():
    with pytest.raises(Unsupported, match="too few"):
        shard_sizes(3, 3)


def test_distributed_capability_is_validated():
    assert Capabilities.from_mapping({"distributed": {"data-parallel"}}).distributed
    with pytest.raises(CapabilityError, match="distributed"):
        Capabilities.from_mapping({"distributed": {"ddp"}})


@pytest.mark.parametrize("W", [2, 3])
def test_reference_passes_every_distributed_check(W):
    checks = None if W == 2 else f"{AGREE},dist_mc_independent_*"
    records = run("reference", W, cases=CASES, checks=checks, time_limit=60)
    assert not _bad(records), [(r.id, r.message, r.diagnosis) for r in _bad(records)]
    passed = {r.check.split("_expand")[0].split("_reduce")[0] for r in records}
    assert any(r.status == "passed" for r in records)
    assert {"dist_agree_type-2", "dist_ranks_agree_type-2"} <= passed
    independent = [r for r in records if r.check.startswith("dist_mc_independent")]
    assert independent and all(r.status == "passed" for r in independent)
    if checks is None:
        for name in ("dist_mc_converges", "dist_mc_reproducible", "dist_side_effects"):
            mine = [r for r in records if r.check.startswith(name)]
            assert mine and all(r.status == "passed" for r in mine), name


@pytest.mark.parametrize("mutant", DISTRIBUTED_MUTANTS, ids=lambda m: m.name)
@pytest.mark.parametrize("W", [2, 3])
def test_distributed_mutant_is_caught_and_named(mutant, W):
    records = run(mutant(), W, cases=MLP, checks=mutant.checks, time_limit=60)
    bad = _bad(records)
    assert bad, f"{mutant.name} not caught"
    named = [r for r in bad if mutant.expected_diagnosis in (r.diagnosis or "")]
    assert named, [(r.id, r.diagnosis) for r in bad]


def test_side_effects_of_one_rank_are_a_failure_naming_the_rank():
    checks = "dist_agree_type-2_*,dist_side_effects"
    records = run(Rank1ReseedsTorch(), 2, cases=MLP, checks=checks, time_limit=60)
    status = {r.check: r for r in records}
    assert status["dist_side_effects"].status == "failed"
    assert "rank(s) 1)" in status["dist_side_effects"].message
    clean = run("reference", 2, cases=MLP, checks=checks, time_limit=60)
    assert all(r.status == "passed" for r in clean)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":
                return True
    return False


def _gone(pids, ports, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(map(_alive, pids)) and not any(map(_listening, ports)):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_a_rank_that_exits_is_an_error_and_leaves_no_process_or_port(tmp_path):
    child_file = tmp_path / "child.pid"
    impl = MisbehavingRank()
    impl.bad_case, impl.how, impl.child_pid_file = MLP, "exit", str(child_file)
    session = DistributedSession.start(impl, 2, time_limit=30)
    try:
        records = run(
            None, 2, cases=CASES, checks="dist_agree_type-2_*", session=session
        )
        first_ports = list(session.caller.group.history_ports)
    finally:
        session.close()
    group = session.caller.group
    bad = {r.case: r for r in _bad(records)}
    assert set(bad) == {MLP}
    assert "rank 1" in bad[MLP].message and "status 3" in bad[MLP].message
    assert all(r.status == "passed" for r in records if r.case == SHARED)
    assert group.starts == 2  # restarted once, after the crash
    pids = group.history_pids + [int(child_file.read_text())]
    assert len(pids) == 5 and first_ports
    assert _gone(pids, group.history_ports), "a process or port was left behind"


@pytest.mark.parametrize("how,expect", [("raise", "RuntimeError"), ("hang", "")])
def test_a_rank_that_raises_or_hangs_is_an_error_and_the_run_goes_on(how, expect):
    impl = MisbehavingRank()
    impl.bad_case, impl.how = MLP, how
    session = DistributedSession.start(impl, 2, time_limit=4)
    try:
        records = run(
            None, 2, cases=CASES, checks="dist_agree_type-2_*", session=session
        )
    finally:
        session.close()
    bad = _bad(records)
    assert bad and {r.case for r in bad} == {MLP}
    assert all("rank" in r.message and expect in r.message for r in bad)
    assert all(r.status == "passed" for r in records if r.case == SHARED)
    assert _gone(session.caller.group.history_pids, session.caller.group.history_ports)


def test_a_candidate_that_does_not_declare_it_is_unsupported_without_processes():
    session = DistributedSession.start(SingleProcessOnly(), 2)
    try:
        records = run(None, 2, cases=MLP, checks=AGREE, session=session)
    finally:
        session.close()
    assert records and all(r.status == "unsupported" for r in records)
    assert "distributed" in records[0].message
    assert session.caller.group.starts == 0


@pytest.mark.parametrize(
    "extra",
    [
        ["--world-size", "1"],
        ["--world-size", "2", "--single-batch"],
        ["--world-size", "2", "--families", "agreement"],
    ],
)
def test_cli_usage_errors(extra, capsys):
    assert main(["check", "reference", "--cases", MLP, *extra]) == 2
    assert "world-size" in capsys.readouterr().err


def test_cli_distributed_run_passes_and_prints_the_reproduce_line(capsys):
    code = main(
        [
            "check",
            "reference",
            "--world-size",
            "2",
            "--cases",
            MLP,
            "--checks",
            "dist_agree_type-2_*",
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "distributed" in out


@pytest.mark.slow
def test_reference_passes_the_whole_catalogue_at_two_ranks():
    records = run("reference", 2, cases=load_cases(), time_limit=120)
    assert not _bad(records), [(r.id, r.message) for r in _bad(records)][:5]


def test_parametrize_with_checks_runs_the_distributed_checks():
    from kfac_oracle.testing import check_items

    _, checks = check_items(
        "reference",
        MLP,
        "dist_agree_type-2_*,dist_ranks_agree_type-2_*",
        world_size=2,
    )
    assert len(checks) == 3 and all(c.item.family == "distributed" for c in checks)
    records = [c.run() for c in checks]
    assert all(r.status == "passed" for r in records), records
    assert "--world-size 2" in records[0].reproduce
    checks[0].session.close()


pytest_plugins = ["pytester"]


def test_plugin_world_size_option(pytester):
    args = ["-p", "no:cacheprovider", "--kfac-impl", "reference", "--kfac-cases", MLP]
    args += ["--kfac-checks", "dist_agree_type-2_*", "--kfac-world-size", "2"]
    outcomes = pytester.runpytest_inprocess(*args).parseoutcomes()
    assert outcomes.get("passed") == 2 and "failed" not in outcomes, outcomes
    bad = pytester.runpytest_inprocess(*args[:-1], "two")
    assert bad.ret != 0


def test_a_group_that_cannot_start_is_an_error_record(monkeypatch):
    from kfac_oracle.distributed import group

    monkeypatch.setattr(group, "HOST", "256.0.0.1")  # rank 0 cannot open its store
    monkeypatch.setattr(group, "START_TIMEOUT", 3.0)
    session = DistributedSession.start("reference", 2, time_limit=30)
    try:
        records = run(
            None, 2, cases=CASES, checks="dist_agree_type-2_*", session=session
        )
    finally:
        session.close()
    assert records and all(r.status == "error" for r in records)
    assert "did not start" in records[0].message
    assert session.caller.group.starts == 1  # not retried case after case
    assert _gone(session.caller.group.history_pids, [])
