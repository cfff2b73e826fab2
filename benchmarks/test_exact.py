"""The exact references' cost: dense GGN, per-layer blocks, matrix-free products.

Compared with curvlinops' ``GGNLinearOperator`` applied to the identity
(``op @ torch.eye(P)``) and, on a small problem only, with a naive column-by-column
build (``P`` GGN-vector products with ``CurvatureOperator(problem).matvec``).
Ids: ``test_dense_ggn[<impl>-<problem>-<device>-<dtype>]``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._support import PROBLEMS, device_params, measure, selected_problems
from kfac_oracle.problem import Problem
from kfac_oracle.reference.exact import (
    CurvatureOperator,
    curvature_block,
    curvature_matrix,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DENSE = {  # problem -> implementations
    "ggn7k": ("reference", "curvlinops"),
    "ggnsmall": ("reference", "curvlinops", "naive"),
}


def _params(config, impls_of, problems=tuple(DENSE)):
    out = []
    for problem in selected_problems(config, problems):
        for impl in impls_of(problem):
            for dtype in ("float32", "float64"):
                if impl == "naive" and dtype == "float32":
                    continue  # the naive build is slow: float64 only
                for device, marks in device_params(config):
                    out.append(
                        pytest.param(
                            (impl, problem, device, dtype),
                            id=f"{impl}-{problem}-{device}-{dtype}",
                            marks=marks,
                        )
                    )
    return out


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "dense_case" in metafunc.fixturenames:
        metafunc.parametrize("dense_case", _params(config, DENSE.__getitem__))
    for name in ("block_case", "matvec_case"):
        if name in metafunc.fixturenames:
            metafunc.parametrize(
                name,
                _params(config, lambda p: ("reference", "curvlinops"), ("ggn7k",)),
            )


def _setup(problem, device, dtype):
    model, loss_func, data = PROBLEMS[problem].build(device, DTYPES[dtype])
    return Problem(model, loss_func, data)


def _curvlinops_ggn(pb, params=None):
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops not installed")
    params = list(pb.model.parameters()) if params is None else params
    return curvlinops.GGNLinearOperator(
        pb.model, pb.loss_func, params, pb.data, check_deterministic=False
    )


def _info(kind, impl, problem, device, dtype):
    return {
        "kind": kind,
        "impl": impl,
        "problem": problem,
        "num_params": PROBLEMS[problem].num_params(),
        "device": device,
        "dtype": dtype,
        "flavour": "ggn",
    }


def test_dense_ggn(benchmark, dense_case):
    """The full dense GGN."""
    impl, problem, device, dtype = dense_case
    pb = _setup(problem, device, dtype)
    P = sum(p.numel() for p in pb.model.parameters())
    eye = torch.eye(P, dtype=DTYPES[dtype], device=device)
    if impl == "reference":
        fn = lambda: curvature_matrix(pb, "ggn")  # noqa: E731
    elif impl == "curvlinops":
        op = _curvlinops_ggn(pb)
        fn = lambda: op @ eye  # noqa: E731
    else:
        cop = CurvatureOperator(pb, "ggn")
        fn = lambda: torch.stack([cop.matvec(e) for e in eye], 1)  # noqa: E731
    benchmark.group = f"dense-ggn-{problem}-{device}-{dtype}"
    out = measure(
        benchmark, fn, device, _info("dense-ggn", impl, problem, device, dtype)
    )
    assert out.shape == (P, P)


def test_ggn_blocks(benchmark, block_case):
    """The exact per-layer (diagonal) GGN blocks of every Linear layer."""
    impl, problem, device, dtype = block_case
    pb = _setup(problem, device, dtype)
    layers = [n for n, m in pb.model.named_modules() if isinstance(m, torch.nn.Linear)]
    if impl == "reference":

        def fn():
            return [curvature_block(pb, name, "ggn") for name in layers]

    else:
        ops = []
        for name in layers:
            params = list(pb.model.get_submodule(name).parameters())
            size = sum(p.numel() for p in params)
            eye = torch.eye(size, dtype=DTYPES[dtype], device=device)
            ops.append((_curvlinops_ggn(pb, params), eye))

        def fn():
            return [op @ eye for op, eye in ops]

    benchmark.group = f"ggn-blocks-{problem}-{device}-{dtype}"
    out = measure(
        benchmark, fn, device, _info("ggn-blocks", impl, problem, device, dtype)
    )
    assert len(out) == len(layers)


def test_ggn_matvec(benchmark, matvec_case):
    """One matrix-free GGN-vector product."""
    impl, problem, device, dtype = matvec_case
    pb = _setup(problem, device, dtype)
    P = sum(p.numel() for p in pb.model.parameters())
    v = torch.randn(P, dtype=DTYPES[dtype], device=device)
    if impl == "reference":
        cop = CurvatureOperator(pb, "ggn")
        fn = lambda: cop.matvec(v)  # noqa: E731
    else:
        op = _curvlinops_ggn(pb)
        fn = lambda: op @ v  # noqa: E731
    benchmark.group = f"ggn-matvec-{problem}-{device}-{dtype}"
    out = measure(
        benchmark, fn, device, _info("ggn-matvec", impl, problem, device, dtype)
    )
    assert out.shape == (P,)
