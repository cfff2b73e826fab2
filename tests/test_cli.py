"""The command line: exit statuses, usage errors, reports, and reproduce lines."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

from kfac_oracle.cli import main

MY_KFAC = textwrap.dedent(
    """
    import sys

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


    class Typo(BrokenKFAC):
        capabilities = {"fisher_type": {"type2"}, "losses": "MSELoss"}


    class UnknownKey(BrokenKFAC):
        capabilities = {"fisher_types": {"type-2"}}


    class AsString(BrokenKFAC):
        capabilities = {"losses": "MSELoss"}


    class NothingYet(MyKFAC):
        def compute(self, request):
            raise NotImplementedError("nothing yet")


    class ExitsZero(MyKFAC):
        def compute(self, request):
            sys.exit(0)
    """
)
CASE = "mlp_tanh_cro_mean"


@pytest.fixture
def usage(tmp_path, monkeypatch, capsys):
    """The command line run in this process, for usage errors (no subprocess start).

    Returns ``(exit status, stdout, stderr)``; an argparse error's ``SystemExit`` is
    its exit status.
    """
    (tmp_path / "my_kfac.py").write_text(MY_KFAC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_kfac", raising=False)

    def call(*args):
        try:
            status = main(list(args))
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 2
        out = capsys.readouterr()
        return status, out.out, out.err

    call.path = tmp_path
    yield call
    sys.modules.pop("my_kfac", None)


@pytest.fixture
def cli(tmp_path):
    (tmp_path / "my_kfac.py").write_text(MY_KFAC)

    def call(*args, env=None):
        return subprocess.run(
            [sys.executable, "-m", "kfac_oracle.cli", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )

    call.path = tmp_path
    return call


def test_check_json_report_and_exit_codes(cli):
    ok = cli(
        "check",
        "my_kfac:MyKFAC",
        "--cases",
        CASE,
        "--json",
        "out.json",
        "--report",
        "r.md",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    records = json.loads((cli.path / "out.json").read_text())
    assert list(records[0])[:6] == ["id", "check", "case", "layer", "family", "status"]
    assert not (cli.path / "out.json.partial").exists()
    assert "# Conformance of my-kfac" in (cli.path / "r.md").read_text()
    bad = cli(
        "check",
        "my_kfac:BrokenKFAC",
        "--cases",
        CASE,
        "--checks",
        "agree_type-2_*",
        "--plots",
        "plots",
    )
    assert bad.returncode == 1
    assert "a constant factor too large by N (reduction over the data)" in bad.stdout
    assert list((cli.path / "plots").glob("*.png"))


def test_the_printed_reproduce_line_reproduces_the_failure(cli):
    """The reproduce command selects exactly the failing check and fails the same
    way."""
    bad = cli("check", "my_kfac:BrokenKFAC", "--cases", CASE, "--checks", "agree_*")
    line = re.search(r"reproduce: (kfac-oracle check .*)", bad.stdout).group(1)
    args = shlex.split(line)[1:]
    failing_id = args[args.index("--checks") + 1]
    assert "failures by cause" in bad.stdout and "FAILED " not in bad.stdout
    again = cli(*args, "--json", "again.json")
    assert again.returncode == 1, again.stdout + again.stderr
    (record,) = json.loads((cli.path / "again.json").read_text())
    assert record["id"] == failing_id and record["status"] == "failed"


def test_verbose_lists_every_failed_check_besides_the_groups(cli):
    """Without ``--verbose`` only the groups are printed (see the reproduce test);
    with it, every failed check too, and the report gets the per-check table."""
    args = ("check", "my_kfac:BrokenKFAC", "--cases", CASE, "--checks", "agree_*")
    verbose = cli(*args, "--verbose", "--report", "verbose.md")
    assert verbose.returncode == 1
    count = re.search(r"failures by cause: (\d+) failed", verbose.stdout).group(1)
    assert verbose.stdout.count("FAILED ") == int(count) > 1
    report = (cli.path / "verbose.md").read_text()
    assert "## Failures by cause" in report and "## Failures\n" in report


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checks", "exactness"], "matches no check"),
        (["--checks", "agree_*[no_such_case-0]"], "matches no check"),
        (["--cases", "no_such_case"], "no case matches"),
        (["--families", "exactnes"], "unknown check families ['exactnes']"),
        (["--time-limit", "-1"], "time limit must be a positive"),
        (["--time-limit", "nan"], "time limit must be a positive"),
        (["--time-limit", "inf"], "time limit must be a positive"),
        (["--time-limit", "0"], "time limit must be a positive"),
        (["--json", "no/such/dir/x.json"], "does not exist"),
        (["--json", "."], "is a folder"),
        (["--xfail", "missing.json"], "cannot read expected failures"),
    ],
)
def test_usage_errors_exit_2_before_any_work(usage, args, message):
    status, out, err = usage("check", "my_kfac:MyKFAC", "--cases", CASE, *args)
    assert status == 2, out + err
    assert message in err
    assert "checks on" not in out  # nothing ran


@pytest.mark.parametrize(
    "spec, message",
    [
        ("my_kfac:Typo", "unknown value 'type2'; allowed: type-2, mc, empirical"),
        ("my_kfac:UnknownKey", "unknown key 'fisher_types'"),
        ("my_kfac:AsString", "must be a set of values, got str 'MSELoss'"),
        ("no_module:X", "cannot import 'no_module'"),
        ("my_kfac:Nope", "has no attribute 'Nope'"),
        ("no-such-builtin", "unknown implementation"),
    ],
)
def test_bad_implementations_are_usage_errors(cli, spec, message):
    result = cli("check", spec, "--cases", CASE)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_nothing_passed_is_not_green(cli):
    result = cli("check", "my_kfac:NothingYet", "--cases", CASE)
    assert result.returncode == 1
    assert "nothing passed" in result.stderr
    allowed = cli(
        "check", "my_kfac:NothingYet", "--cases", CASE, "--allow-nothing-passed"
    )
    assert allowed.returncode == 0


def test_sys_exit_in_a_candidate_cannot_end_the_run_green(cli, tmp_path):
    result = cli("check", "my_kfac:ExitsZero", "--cases", CASE, "--json", "o.json")
    assert result.returncode == 1
    records = json.loads((tmp_path / "o.json").read_text())
    assert records and all(r["status"] in ("error", "unsupported") for r in records)
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    result = cli("check", "exits_on_import:X", "--cases", CASE)
    assert result.returncode == 2 and "sys.exit(0)" in result.stderr


BAD_CASES = {
    "syntax": "CASES = [\n",
    "kwarg": (
        "from kfac_oracle.catalogue import Case\n"
        "CASES = [Case(id='x', family='f', model=[('Linear', 2, 2)], input_shape=(2,),"
        " loss='MSELoss', batchsizes=(2,))]\n"
    ),
    "loss": (
        "from kfac_oracle.catalogue import Case\n"
        "CASES = [Case(id='x', family='f', model=[('Linear', 2, 2)], input_shape=(2,),"
        " loss='HingeLoss')]\n"
    ),
    "shape": (
        "from kfac_oracle.catalogue import Case\n"
        "CASES = [Case(id='x', family='f', model=[('Linear', 3, 2)], input_shape=(2,),"
        " loss='MSELoss')]\n"
    ),
    "claims": (
        "from kfac_oracle.catalogue import Case, exact\n"
        "CASES = [Case(id='x', family='f', model=[('Linear', 2, 2)], input_shape=(2,),"
        " loss='MSELoss', claims={'O': [exact('E2')]})]\n"
    ),
    "flavour": (
        "from kfac_oracle.catalogue import Case, exact\n"
        "CASES = [Case(id='x', family='f', model=[('Linear', 2, 2)], input_shape=(2,),"
        " loss='MSELoss', claims={'0': [exact('E2', 'type2')]})]\n"
    ),
    "batches": (
        "from kfac_oracle.catalogue import Case\n"
        "CASES = [Case(id='x', family='f', model=[('Linear', 2, 2)], input_shape=(2,),"
        " loss='MSELoss', batch_sizes=())]\n"
    ),
}


@pytest.mark.parametrize("what", sorted(BAD_CASES))
def test_bad_case_files_are_usage_errors_naming_the_file(usage, what):
    path = usage.path / f"bad_{what}.py"
    path.write_text(BAD_CASES[what])
    for command in ("cases", "check"):
        args = [command] + (["my_kfac:MyKFAC"] if command == "check" else [])
        status, out, err = usage(*args, "--case-file", str(path))
        assert status == 2, (what, out, err)
        assert f"bad_{what}.py" in err


def test_a_case_folder_runs_only_case_files(cli, tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "setup.py").write_text("print('JUNK EXECUTED')\n")
    (folder / "my_cases.py").write_text(
        "from kfac_oracle.catalogue import Case\n"
        "CASES = [Case(id='mine', family='f', model=[('Linear', 2, 2)], "
        "input_shape=(2,), loss='MSELoss')]\n"
    )
    result = cli("cases", "--cases", "mine", env={"KFAC_ORACLE_CASES": str(folder)})
    assert result.returncode == 0, result.stderr
    assert "JUNK" not in result.stdout and "mine" in result.stdout


def test_checks_lists_every_family_and_theorem(cli):
    from kfac_oracle.checks import checks, family_names

    result = cli("checks", "--json")
    data = json.loads(result.stdout)
    assert [f["family"] for f in data] == family_names()
    listed = {c["function"] for f in data for c in f["checks"]}
    assert listed == {spec.name for spec in checks()}
    assert all(c["theorem"] for f in data for c in f["checks"])
