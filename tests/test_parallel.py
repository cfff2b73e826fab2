"""Parallel and sharded runs have the records of a serial run (timings aside)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kfac_oracle.catalogue import load_cases
from kfac_oracle.cli import main
from kfac_oracle.errors import UsageError
from kfac_oracle.runner.parallel import child_arguments, parse_shard, shard_cases

CASES = "one_datum_cro_mean,mc_zero_variance_bce_sum,deep_linear_d2_bias_mse_sum"
ROOT = Path(__file__).resolve().parents[1]


def _records(path: Path) -> list[dict]:
    records = json.loads(path.read_text())
    for r in records:
        r.pop("seconds")
    return records


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> list[dict]:
    """The records of a serial ``kfac-oracle check`` (an expected failure included)."""
    tmp = tmp_path_factory.mktemp("serial")
    out = tmp / "serial.json"
    code = main(
        ["check", "reference", "--cases", CASES, "--json", str(out), "-q"]
        + ["--xfail", str(_xfail(tmp))]
    )
    assert code == 1  # the expected failure passes: strict
    return _records(out)


def _xfail(folder: Path) -> Path:
    path = folder / "xfail.txt"
    path.write_text("wellformed[one_datum_cro_mean]  # passes: strictness shows\n")
    return path


@pytest.mark.parametrize("spec", ["1/1", "2/3", " 3 / 3 "])
def test_parse_shard(spec):
    i, n = parse_shard(spec)
    assert 1 <= i <= n


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1", "a/b", "1/0", "-1/2", ""])
def test_a_bad_shard_is_a_usage_error(spec):
    with pytest.raises(UsageError, match="--shard"):
        parse_shard(spec)


@pytest.mark.parametrize(
    "args",
    [
        ["--shard", "0/2"],
        ["--shard", "4/3"],
        ["--workers", "0"],
        ["--workers", "2", "--plots", "plots"],
        ["--shard", "3/3"],  # two cases: the third shard is empty
    ],
)
def test_cli_usage_errors(args, capsys):
    code = main(["check", "reference", "--cases", CASES.split(",", 1)[1], *args])
    assert code == 2
    assert "--" in capsys.readouterr().err


def test_worker_arguments_reproduce_the_options():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("impl")
    parser.add_argument("--cases")
    parser.add_argument("--case-file", action="append", default=[])
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("--keep", action="store_false")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--many", nargs="+", default=None)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--opt", action=argparse.BooleanOptionalAction, default=None)
    argv = ["x:Y", "--cases", "a*", "--case-file", "f1", "--case-file", "f2"]
    argv += ["--flag", "--keep", "--threads", "0", "--many", "p", "q", "-vv"]
    argv += ["--no-opt"]
    args = parser.parse_args(argv)
    out = child_arguments(args, parser, {"cases"})
    again = parser.parse_args(out)
    assert again.cases is None and vars(again) | {"cases": "a*"} == vars(args)
    assert child_arguments(parser.parse_args(["x:Y"]), parser, set()) == ["x:Y"]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_partition_the_cases_deterministically(n):
    cases = load_cases()
    shards = [shard_cases(cases, i, n) for i in range(1, n + 1)]
    ids = [c.id for shard in shards for c in shard]
    assert sorted(ids) == sorted(c.id for c in cases)  # each case exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    position = {c.id: k for k, c in enumerate(cases)}
    for shard in shards:
        assert [position[c.id] for c in shard] == sorted(position[c.id] for c in shard)
    reordered = [shard_cases(list(reversed(cases)), i, n) for i in range(1, n + 1)]
    assert [{c.id for c in s} for s in reordered] == [{c.id for c in s} for s in shards]


@pytest.mark.filterwarnings("ignore:expected-failure pattern")  # in the other shard
def test_shards_merged_by_matrix_from_equal_the_serial_run(serial, tmp_path):
    parts = []
    for i in (1, 2):
        part = tmp_path / f"part{i}.json"
        main(
            ["check", "reference", "--cases", CASES, "--shard", f"{i}/2"]
            + ["--json", str(part), "-q", "--xfail", str(_xfail(tmp_path))]
        )
        parts.append(part)
    assert all(_records(p) for p in parts)
    merged = tmp_path / "merged.json"
    assert main(["matrix", "--from", *map(str, parts), "--json", str(merged)]) == 0
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(_records(merged), key=key) == sorted(serial, key=key)


def test_workers_have_the_records_and_exit_status_of_the_serial_run(
    serial, tmp_path, capsys
):
    out = tmp_path / "workers.json"
    code = main(
        ["check", "reference", "--cases", CASES, "--workers", "2", "-q", "--verbose"]
        + ["--json", str(out), "--xfail", str(_xfail(tmp_path))]
    )
    assert code == 1
    assert _records(out) == serial
    assert "unexpectedly passed" in capsys.readouterr().out


def test_no_cache_leaves_the_cache_alone(tmp_path, monkeypatch):
    from kfac_oracle.runner import diskcache

    monkeypatch.setenv("KFAC_ORACLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(diskcache, "_enabled", True)  # restored after the test
    args = ["check", "reference", "--cases", "one_datum_mse_mean", "-q"]
    assert main([*args, "--families", "exactness", "--no-cache"]) == 0
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(diskcache, "_enabled", True)
    assert main([*args, "--families", "exactness"]) == 0
    assert list((tmp_path / "cache").iterdir())


def _pytest(folder: Path, *args: str) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["KFAC_ORACLE_CACHE"] = str(folder / "cache")
    out = folder / "records.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
    ]
    cmd += ["--kfac-impl", "reference", "--kfac-cases", CASES, "--kfac-json", str(out)]
    cmd += ["--kfac-xfail", str(_xfail(folder)), "-q", *args]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "XPASS(strict)" in proc.stdout
    return _records(out)


def test_the_plugin_under_xdist_has_the_records_of_a_serial_run(serial, tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "serial").mkdir()
    (tmp_path / "xdist").mkdir()
    plugin_serial = _pytest(tmp_path / "serial", "--kfac-no-cache")
    plugin_xdist = _pytest(tmp_path / "xdist", "-n", "2")
    assert not (tmp_path / "serial" / "cache").exists()
    assert list((tmp_path / "xdist" / "cache").iterdir())  # workers share a cache
    assert plugin_serial == serial  # the plugin's records are the command line's
    assert plugin_xdist == serial
