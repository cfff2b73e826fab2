"""The library adapters: translation right where the library is right, findings visible.

For every adapter whose library imports here, a few catalogue cases and checks on which
the library is known to be correct must pass (a wrong reduction, factor order, bias
placement or MSE factor in the adapter would fail them), and the library findings
documented in ``docs/findings.md`` must stay visible as failures with their measured
numbers. Adapters whose library is missing are skipped, so the file passes in an
environment with only curvlinops and BackPACK. The end-to-end tests run the
``kfac-oracle matrix`` command and its ``--from`` merge.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest

from kfac_oracle.adapters import adapter_modules
from kfac_oracle.catalogue import Case, Claim
from kfac_oracle.harness import run

# The module that must import for an adapter module's library to be usable.
IMPORTS = {
    "curvlinops": "curvlinops",
    "backpack": "backpack",
    "asdl": "asdl",
    "nngeometry": "nngeometry",
    "laplace": "laplace",
    "kronfluence": "kronfluence",
}


def require(module_name: str) -> None:
    """Skip unless the adapter module's library is installed and imports."""
    if adapter_modules()[module_name].library_version() is None:
        pytest.skip(f"{module_name} is not installed")
    try:
        importlib.import_module(IMPORTS[module_name])
    except Exception as error:  # e.g. laplace beside an incompatible torchvision
        pytest.skip(f"{module_name} does not import: {error!r}")


def adapter_module(name: str) -> str:
    for module_name, module in adapter_modules().items():
        if name in module.ADAPTERS:
            return module_name
    raise KeyError(name)


# (adapter, case, check patterns): every selected record must be "passed". Chosen from
# the published matrix (docs/matrix.json.gz) where the library is right; together they
# exercise each adapter's conversions (reduction, MSE factor 2, bias layout, batches).
INV = "batch_split,shuffle,current_parameters,wellformed"
T2 = "exact_*_type-2_*,agree_type-2_*"
EF = "exact_*_empirical_*,agree_empirical_*"
PASSING = [
    ("curvlinops-kfac", "deep_linear_d2_bias_mse_mean", f"exact_*,agree_*,{INV}"),
    ("curvlinops-kfac", "mlp_tanh_bce_mean", "agree_*,bias_modes,mean_vs_sum"),
    ("curvlinops-ekfac", "one_datum_mse_mean", "exact_*"),
    ("curvlinops-ekfac", "deep_linear_d2_bias_mse_mean", f"exact_*,{INV}"),
    ("curvlinops-ekfac", "mlp_tanh_bce_mean", f"{T2},{EF}"),
    ("backpack-kflr", "deep_linear_d2_bias_mse_mean", f"{T2},mean_vs_sum,{INV}"),
    ("backpack-kflr", "one_datum_cro_sum", f"{T2},batch_split"),
    ("backpack-kfac", "mlp_tanh_cro_mean", "mc_reproducible,wellformed"),
    ("backpack-kfra", "one_datum_cro_sum", f"{T2},{INV}"),
    ("laplace-kron-curvlinops", "deep_linear_d2_bias_mse_mean", f"{T2},{INV}"),
    ("laplace-kron-curvlinops", "one_datum_cro_sum", f"{T2},{EF}"),
    ("laplace-kron-backpack", "one_datum_mse_mean", f"{T2},mean_vs_sum,{INV}"),
    ("laplace-kron-asdl", "deep_linear_d2_bias_mse_mean", f"{T2},{INV}"),
    ("laplace-kron-asdl", "one_datum_cro_sum", f"{T2},{EF}"),
    ("asdl-fisher-exact", "deep_linear_d2_bias_mse_mean", f"{T2},{INV}"),
    ("asdl-fisher-exact", "one_datum_cro_sum", T2),
    ("asdl-fisher-mc", "mlp_tanh_cro_mean", "mc_reproducible,wellformed"),
    ("asdl-fisher-emp", "one_datum_bce_binary_sum", f"{EF},batch_split"),
    ("nngeometry-kfac", "deep_linear_d2_bias_mse_mean", f"{T2},{INV}"),
    ("nngeometry-kfac", "one_datum_bce_soft_mean", T2),
    ("nngeometry-ekfac", "mlp_tanh_bce_mean", f"{T2},batch_split"),
    ("kronfluence-kfac", "one_datum_mse_mean", f"{EF},{INV}"),
    ("kronfluence-ekfac", "one_datum_cro_sum", "exact_*_empirical_*,wellformed"),
]


@pytest.mark.parametrize(
    "name, cases, checks", PASSING, ids=[f"{p[0]}-{p[1]}" for p in PASSING]
)
def test_adapter_translation_passes_where_library_is_right(name, cases, checks):
    require(adapter_module(name))
    records = run(name, cases=cases, checks=checks, time_limit=120)
    assert records, "the selection matched no check"
    bad = [f"{r.id}: {r.status}: {r.message[:200]}" for r in records]
    bad = [b for b, r in zip(bad, records) if r.status != "passed"]
    assert not bad, "\n".join(bad)


# Conv2d whose flattened output is the per-pixel prediction (MSE): KFAC-expand is the
# exact GGN block (notes §5 E5) and the output is 2-D, which BackPACK accepts. (The
# catalogue's per-pixel cases keep a 4-D output, which BackPACK rejects.)
CONV_FLAT = Case(
    id="conv_flat_pixel_mse_mean",
    family="conv_expand",
    model=[("Conv2d", 2, 3, 3, {"padding": 1}), ("Flatten",)],
    input_shape=(2, 4, 4),
    loss="MSELoss",
    batch_sizes=(2, 1),
    setting="expand",
    claims={"0": [Claim("E5", kfac_approx="expand")]},
    seed=61,
)


def max_entry_ratio(message: str) -> float:
    match = re.search(r"candidate ([-0-9.e+]+), reference ([-0-9.e+]+)", message)
    assert match, message
    return float(match.group(1)) / float(match.group(2))


@pytest.mark.parametrize("name", ["backpack-kflr", "laplace-kron-backpack"])
def test_backpack_conv2d_weight_block_is_S_times_expand(name):
    """Finding B1/L3: the Conv2d weight block is S = H_out·W_out = 16 times the GGN."""
    require(adapter_module(name))
    (record,) = run(name, cases=[CONV_FLAT], checks="exact_E5_type-2_expand")
    assert record.status == "failed", record.message
    assert record.error > 10
    assert max_entry_ratio(record.message) == pytest.approx(16, rel=1e-9)


def test_curvlinops_conv2d_flat_pixel_is_exact():
    """Control for the BackPACK finding: the same case passes for curvlinops."""
    require("curvlinops")
    (record,) = run("curvlinops-kfac", cases=[CONV_FLAT], checks="exact_E5_*_expand")
    assert record.status == "passed", record.message


def one(name, case, check):
    """The single record of ``check`` on ``case`` (one layer: the first listed)."""
    records = run(name, cases=case, checks=check, time_limit=120)
    assert records, f"{check} matched nothing on {case}"
    return records[0]


# (adapter, case, check, status, text in the diagnosis or message): library findings
# (docs/findings.md) that must stay visible in the matrix.
FINDINGS = [
    # C1: type-2 reduce on per-pixel outputs is S times the reference.
    (
        "curvlinops-kfac",
        "conv_pixel_k3_pad1_mse_mean",
        "agree_type-2_reduce",
        "failed",
        "too large by S",
    ),
    # L1: regression EF twice the EF of laplace's own likelihood.
    (
        "laplace-kron-curvlinops",
        "one_datum_mse_mean",
        "exact_E1_empirical_expand",
        "failed",
        "too large by 2",
    ),
    ("laplace-kron-asdl", "one_datum_mse_sum", "exact_E1_empirical_*", "failed", "2"),
    # L2 / ASDL 1: MC with M samples is 1/M of the Fisher.
    ("laplace-kron-asdl", "mlp_tanh_cro_mean", "mc_converges_*", "failed", "by M"),
    ("asdl-fisher-mc", "mlp_tanh_cro_mean", "mc_converges_*", "failed", "by M"),
    # B5: KFRA on float64 models (default dtype float32) crashes.
    ("backpack-kfra", "deep_linear_d2_bias_mse_mean", "wellformed", "failed", "Float"),
    # kronfluence 1: with weight sharing (Conv2d, S = 25) KFAC is expand / S.
    (
        "kronfluence-kfac",
        "conv_pool_k3_pad1_mse_mean",
        "agree_empirical_expand",
        "failed",
        "too small by S",
    ),
    # nngeometry 1: classif_logits on a float64 model crashes.
    ("nngeometry-kfac", "one_datum_cro_mean", "exact_E1_*", "error", "double != float"),
]


@pytest.mark.parametrize(
    "name, case, check, status, text", FINDINGS, ids=[f[0] for f in FINDINGS]
)
def test_library_findings_stay_visible(name, case, check, status, text):
    require(adapter_module(name))
    record = one(name, case, check)
    assert record.status == status, record.message
    assert text in (record.diagnosis or "") + record.message


def kfac_oracle(*args: str, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "kfac_oracle.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_matrix_command_end_to_end(tmp_path):
    """`kfac-oracle matrix` on two adapters and two small cases, then `--from`."""
    require("curvlinops")
    require("backpack")
    first, merged = tmp_path / "a.json", tmp_path / "merged.json"
    kfac_oracle(
        "matrix",
        "curvlinops-kfac",
        "backpack-kflr",
        "--cases",
        "one_datum_mse_mean,deep_linear_d1_bias_mse_sum",
        "--json",
        str(first),
        "--markdown",
        str(tmp_path / "a.md"),
        "-q",
        cwd=tmp_path,
    )
    records = json.loads(first.read_text())
    by_impl = {r["implementation"] for r in records}
    assert by_impl == {"curvlinops-kfac", "backpack-kflr"}
    assert {r["status"] for r in records} <= {"passed", "unsupported"}
    assert any(r["status"] == "passed" for r in records)
    table = (tmp_path / "a.md").read_text()
    assert "| curvlinops-kfac |" in table and "| backpack-kflr |" in table

    # A second run of one adapter, merged with --from: the records are concatenated.
    second = tmp_path / "b.json"
    kfac_oracle(
        "matrix",
        "backpack-kflr",
        "--cases",
        "deep_linear_d1_nobias_mse_mean",
        "--json",
        str(second),
        "-q",
        cwd=tmp_path,
    )
    proc = kfac_oracle(
        "matrix",
        "--from",
        str(first),
        str(second),
        "--json",
        str(merged),
        "--markdown",
        str(tmp_path / "merged.md"),
        cwd=tmp_path,
    )
    both = json.loads(merged.read_text())
    assert len(both) == len(records) + len(json.loads(second.read_text()))
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "backpack-kflr",
        "curvlinops-kfac",
    ]
    # The merged cells add up the records of both runs.
    kflr = [r for r in both if r["implementation"] == "backpack-kflr"]
    passed = sum(r["status"] == "passed" for r in kflr)
    cells = rows[1].split("|")[3:-2]
    assert sum(int(c.split("/")[0]) for c in cells) == passed
