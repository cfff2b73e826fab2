"""KFAC factor, product and forward+backward benchmarks, through the public contract.

Ids: ``test_kfac_factors[<impl>-<flavour>-<approx>-<problem>-<device>-<dtype>]``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._support import (
    FLAVOURS,
    FLOAT64_PROBLEMS,
    KFAC_PROBLEMS,
    PROBLEMS,
    device_params,
    kron_inverse_matvec,
    kron_matvec,
    layer_size,
    make_request,
    measure,
    selected_problems,
    unsupported,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DAMPING = 1e-3
PRODUCT_PROBLEMS = ("mlp64", "mlp256", "mlp512")
FWD_BWD_PROBLEMS = (*KFAC_PROBLEMS, "ggn7k", "ggnsmall")


def _dtypes(problem: str, flavour: str = "type-2"):
    yield "float32"
    if problem in FLOAT64_PROBLEMS and flavour == "type-2":
        yield "float64"


def _approxes(problem: str):
    return ("expand", "reduce") if PROBLEMS[problem].weight_sharing else ("expand",)


def _factor_params(config):
    params = []
    for entry in config.kfac_bench["impls"]:
        impl = entry.factory() if entry.factory else None
        for problem in selected_problems(config, KFAC_PROBLEMS):
            for flavour in FLAVOURS:
                for approx in _approxes(problem):
                    for dtype in _dtypes(problem, flavour):
                        for device, dev_marks in device_params(config):
                            marks = list(dev_marks)
                            reason = entry.unavailable or unsupported(
                                impl, PROBLEMS[problem], flavour, approx
                            )
                            if reason:
                                marks.append(pytest.mark.skip(reason=reason))
                            pid = f"{entry.name}-{flavour}-{approx}-{problem}-"
                            pid += f"{device}-{dtype}"
                            params.append(
                                pytest.param(
                                    (entry, flavour, approx, problem, device, dtype),
                                    id=pid,
                                    marks=marks,
                                )
                            )
    return params


def _simple_params(config, problems, dtypes_of=_dtypes):
    params = []
    for problem in selected_problems(config, problems):
        for dtype in dtypes_of(problem):
            for device, marks in device_params(config):
                params.append(
                    pytest.param(
                        (problem, device, dtype),
                        id=f"{problem}-{device}-{dtype}",
                        marks=marks,
                    )
                )
    return params


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "factor_case" in metafunc.fixturenames:
        metafunc.parametrize("factor_case", _factor_params(config))
    if "fwd_case" in metafunc.fixturenames:
        metafunc.parametrize(
            "fwd_case",
            _simple_params(
                config,
                FWD_BWD_PROBLEMS,
                lambda p: (
                    ("float32", "float64")
                    if p in (*FLOAT64_PROBLEMS, "ggn7k", "ggnsmall")
                    else ("float32",)
                ),
            ),
        )
    if "curvlinops_case" in metafunc.fixturenames:
        metafunc.parametrize(
            "curvlinops_case",
            _simple_params(config, PRODUCT_PROBLEMS, lambda p: ("float32",)),
        )
    if "product_case" in metafunc.fixturenames:
        params = []
        for impl in ("reference", "curvlinops-kfac"):
            for kind in ("mvp", "ivp"):
                for p in _simple_params(
                    config, PRODUCT_PROBLEMS, lambda p: ("float32",)
                ):
                    (problem, device, dtype) = p.values[0]
                    params.append(
                        pytest.param(
                            (impl, kind, problem, device, dtype),
                            id=f"{impl}-{kind}-type-2-{p.id}",
                            marks=p.marks,
                        )
                    )
        metafunc.parametrize("product_case", params)


def _info(problem, device, dtype, **extra):
    return {
        "problem": problem,
        "num_params": PROBLEMS[problem].num_params(),
        "device": device,
        "dtype": dtype,
        **extra,
    }


def test_kfac_factors(benchmark, factor_case):
    """Time (and peak memory) of ``impl.compute(KFACRequest(...))``."""
    entry, flavour, approx, problem, device, dtype = factor_case
    model, loss_func, data = PROBLEMS[problem].build(device, DTYPES[dtype])
    impl = entry.factory()
    request = make_request(model, loss_func, data, flavour, approx)
    benchmark.group = f"factors-{problem}-{device}-{dtype}"
    info = _info(
        problem,
        device,
        dtype,
        kind="factors",
        impl=entry.name,
        flavour=flavour,
        approx=approx,
    )
    try:
        result = measure(benchmark, lambda: impl.compute(request), device, info)
    except NotImplementedError as error:
        pytest.skip(f"{entry.name}: {error}")
    assert isinstance(result, dict) and result


def test_forward_backward(benchmark, fwd_case):
    """One forward and backward pass of the model (the ratio's denominator)."""
    problem, device, dtype = fwd_case
    model, loss_func, data = PROBLEMS[problem].build(device, DTYPES[dtype])
    (X, y) = data[0]

    def step():
        model.zero_grad(set_to_none=True)
        loss_func(model(X), y).backward()

    benchmark.group = f"factors-{problem}-{device}-{dtype}"
    measure(benchmark, step, device, _info(problem, device, dtype, kind="fwd-bwd"))


def _curvlinops_operator(problem, device, dtype, flavour="type-2"):
    pytest.importorskip("curvlinops", reason="curvlinops is not installed")
    from kfac_oracle.adapters.curvlinops import operator

    model, loss_func, data = PROBLEMS[problem].build(device, DTYPES[dtype])
    request = make_request(model, loss_func, data, flavour, "expand")
    _, _, op, _ = operator(request, copy_model=False)
    return op, request


def test_curvlinops_compute_factors(benchmark, curvlinops_case):
    """curvlinops' own factor computation, ``op.compute_kronecker_factors()`` only."""
    problem, device, dtype = curvlinops_case
    op, _ = _curvlinops_operator(problem, device, dtype)
    benchmark.group = f"factors-{problem}-{device}-{dtype}"
    info = _info(
        problem,
        device,
        dtype,
        kind="factors",
        impl="curvlinops-op",
        flavour="type-2",
        approx="expand",
    )
    measure(benchmark, op.compute_kronecker_factors, device, info)


def test_kfac_products(benchmark, product_case):
    """A KFAC matrix-vector product and a (cold, damped) inverse-vector product.

    reference: ``G V A`` and Cholesky solves with ``G + λI``, ``A + λI`` on the
    factors from the contract; curvlinops: ``op @ v`` and a fresh
    ``KFACInverseLinearOperator(op, damping=λ) @ v`` (its inversion included).
    """
    impl, kind, problem, device, dtype = product_case
    benchmark.group = f"products-{problem}-{device}-{dtype}"
    info = _info(problem, device, dtype, kind=kind, impl=impl, flavour="type-2")
    if impl == "curvlinops-kfac":
        op, _ = _curvlinops_operator(problem, device, dtype)
        op.compute_kronecker_factors()
        v = torch.randn(op.shape[1], dtype=DTYPES[dtype], device=device)
        if kind == "mvp":
            fn = lambda: op @ v  # noqa: E731
        else:
            from curvlinops import KFACInverseLinearOperator

            fn = lambda: KFACInverseLinearOperator(op, damping=DAMPING) @ v  # noqa: E731
        measure(benchmark, fn, device, info)
        return
    from kfac_oracle.reference.candidate import ReferenceKFAC

    model, loss_func, data = PROBLEMS[problem].build(device, DTYPES[dtype])
    factors = ReferenceKFAC().compute(
        make_request(model, loss_func, data, "type-2", "expand")
    )
    vs = {
        name: torch.randn(layer_size(f), dtype=DTYPES[dtype], device=device)
        for name, f in factors.items()
    }
    if kind == "mvp":
        fn = lambda: kron_matvec(factors, vs)  # noqa: E731
    else:
        fn = lambda: kron_inverse_matvec(factors, vs, DAMPING)  # noqa: E731
    out = measure(benchmark, fn, device, info)
    assert set(out) == set(factors)
