"""Damped inverse-vector products and log-determinants (docs/theory.md §10).

Ids: ``test_reference_operations[<operation>-<convention>-<problem>-<device>-<dtype>]``
and ``test_curvlinops_inverse[<convention>-<problem>-<device>-<dtype>]``. Each round is
cold, as after a factor update: the eigendecompositions of ``A`` and ``G`` of every
layer (:class:`~kfac_oracle.reference.operations.KroneckerOperations`, or curvlinops'
``KFACInverseLinearOperator`` built on fitted factors) and then the operation, on the
type-2 factors of the problem. The two share a benchmark group, so their ratio is
read from one run.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._support import (
    PROBLEMS,
    device_params,
    make_request,
    measure,
    selected_problems,
)
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.reference.operations import KroneckerOperations

DTYPES = {"float32": torch.float32, "float64": torch.float64}
OPERATION_PROBLEMS = ("mlp64", "mlp256", "mlp512")
OPERATIONS = ("inverse", "logdet")
CONVENTIONS = ("product", "pi")
# λ relative to each layer's mean eigenvalue, mid-sweep
RELATIVE_DAMPING = 1e-2


def pytest_generate_tests(metafunc):
    if "inverse_case" in metafunc.fixturenames:
        metafunc.parametrize("inverse_case", _inverse_cases(metafunc))
    if "operation_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    params = []
    for problem in selected_problems(config, OPERATION_PROBLEMS):
        for operation in OPERATIONS:
            for convention in CONVENTIONS:
                for dtype in ("float32", "float64"):
                    for device, marks in device_params(config):
                        case = (operation, convention, problem, device, dtype)
                        params.append(
                            pytest.param(case, id="-".join(case), marks=list(marks))
                        )
    metafunc.parametrize("operation_case", params)


def _inverse_cases(metafunc):
    config = metafunc.config
    params = []
    for problem in selected_problems(config, OPERATION_PROBLEMS):
        for convention in CONVENTIONS:
            for dtype in ("float32", "float64"):
                for device, marks in device_params(config):
                    case = (convention, problem, device, dtype)
                    params.append(
                        pytest.param(case, id="-".join(case), marks=list(marks))
                    )
    return params


def test_reference_operations(benchmark, operation_case):
    """Cold ``K_λ⁻¹ v`` or ``log det K_λ`` of every layer of the problem."""
    operation, convention, problem, device, dtype = operation_case
    model, loss_func, data = PROBLEMS[problem].build(device, DTYPES[dtype])
    request = make_request(model, loss_func, data, "type-2", "expand")
    factors = ReferenceKFAC().compute(request)
    dampings = {}
    vectors = {}
    generator = torch.Generator().manual_seed(0)
    for name, f in factors.items():
        mean = (f.input_covariance.trace() * f.gradient_covariance.trace()).item() / (
            f.input_covariance.shape[0] * f.gradient_covariance.shape[0]
        )
        dampings[name] = RELATIVE_DAMPING * mean
        size = f.input_covariance.shape[0] * f.gradient_covariance.shape[0]
        v = torch.randn(size, 1, generator=generator, dtype=torch.float64)
        vectors[name] = v.to(device=device, dtype=DTYPES[dtype])

    def run():
        out = {}
        for name, f in factors.items():
            ops = KroneckerOperations(f, convention)
            if operation == "inverse":
                out[name] = ops.inverse_product(vectors[name], dampings[name])
            else:
                out[name] = ops.logdet(dampings[name])
        return out

    benchmark.group = f"operations-{problem}-{device}-{dtype}"
    info = {
        "problem": problem,
        "num_params": PROBLEMS[problem].num_params(),
        "device": device,
        "dtype": dtype,
        "kind": operation,
        "impl": "reference",
        "convention": convention,
    }
    result = measure(benchmark, run, device, info)
    assert set(result) == set(factors)


def test_curvlinops_inverse(benchmark, inverse_case):
    """Cold ``K_λ⁻¹ v`` of every layer with curvlinops' ``KFACInverseLinearOperator``.

    ``product``: ``use_exact_damping=True`` at ``δ = λ``; ``pi``:
    ``use_heuristic_damping=True`` (``min_damping=0``) at ``δ = λ``. One vector over
    all layers (the operator is block diagonal), with one ``λ`` for all layers: the
    mean over layers of the reference's per-layer dampings.
    """
    curvlinops = pytest.importorskip("curvlinops")
    convention, problem, device, dtype = inverse_case
    model, loss_func, data = PROBLEMS[problem].build(device, DTYPES[dtype])
    request = make_request(model, loss_func, data, "type-2", "expand")
    from kfac_oracle.adapters.curvlinops import operator

    _, _, op, _ = operator(request, copy_model=False)
    op.compute_kronecker_factors()
    factors = ReferenceKFAC().compute(request)
    means = [
        (f.input_covariance.trace() * f.gradient_covariance.trace()).item()
        / (f.input_covariance.shape[0] * f.gradient_covariance.shape[0])
        for f in factors.values()
    ]
    damping = RELATIVE_DAMPING * sum(means) / len(means)
    options = (
        {"use_exact_damping": True}
        if convention == "product"
        else {"use_heuristic_damping": True, "min_damping": 0.0}
    )
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[0], 1, generator=generator, dtype=torch.float64)
    v = v.to(device=device, dtype=DTYPES[dtype])

    def run():
        inverse = curvlinops.KFACInverseLinearOperator(op, damping=damping, **options)
        return inverse @ v

    benchmark.group = f"operations-{problem}-{device}-{dtype}"
    info = {
        "problem": problem,
        "num_params": PROBLEMS[problem].num_params(),
        "device": device,
        "dtype": dtype,
        "kind": "inverse",
        "impl": "curvlinops",
        "convention": convention,
    }
    result = measure(benchmark, run, device, info)
    assert result.shape == v.shape
