"""laplace-torch's posterior-precision operations (``laplace-kron-operations``).

The default catalogue's cases where the adapter applies are deep linear MSE nets
(laplace keeps every bias as a separate block, so biased layers are unsupported); the
cases here add bias-free nonlinear nets, cross-entropy, a Conv2d layer and one-datum
cases (E1) to them. Mutants of the adapter (laplace's own Hessian scale, the whole
network's log-determinant) show that the checks see a wrong translation. A missing
laplace-torch skips these tests.
"""

from __future__ import annotations

import pytest
import torch

from kfac_oracle.adapters.laplace import LIBRARY, LaplaceKronOperations
from kfac_oracle.catalogue import Case, exact, inexact, one_datum_claims
from kfac_oracle.contract import KFACRequest, OperationsRequest
from kfac_oracle.reference.exact import curvature_block
from kfac_oracle.reference.operations import probe_vectors
from kfac_oracle.runner.run import run
from kfac_oracle.runner.validate import layer_shapes


@pytest.fixture(autouse=True)
def _laplace():
    if LIBRARY.version() is None:
        pytest.skip("laplace-torch is not installed")
    try:
        LIBRARY.load("curvature")
    except ImportError as error:
        pytest.skip(f"laplace-torch does not import: {error}")


NO_BIAS = {"bias": False}
TANH_CE = Case(
    id="nobias_mlp_tanh_cro_mean",
    family="user",
    model=[("Linear", 5, 4, NO_BIAS), ("Tanh",), ("Linear", 4, 3, NO_BIAS)],
    input_shape=(5,),
    loss="CrossEntropyLoss",
    reduction="mean",
    batch_sizes=(5, 3),
    claims={"0": [inexact()], "2": [inexact()]},
    seed=31,
)
ONE_DATUM = {
    loss: Case(
        id=f"nobias_one_datum_{loss[:3].lower()}_{reduction}",
        family="user",
        model=[("Linear", 4, 5, NO_BIAS), ("Sigmoid",), ("Linear", 5, 3, NO_BIAS)],
        input_shape=(4,),
        loss=loss,
        reduction=reduction,
        batch_sizes=(1,),
        claims={"0": one_datum_claims(), "2": one_datum_claims()},
        seed=7,
    )
    for loss, reduction in (("MSELoss", "mean"), ("CrossEntropyLoss", "sum"))
}
CONV = Case(
    id="nobias_conv_flat_mse_mean",
    family="user",
    model=[("Conv2d", 2, 3, 3, {"padding": 1, "bias": False}), ("Flatten",)],
    input_shape=(2, 5, 5),
    loss="MSELoss",
    reduction="mean",
    batch_sizes=(2, 1),
    setting="expand",
    claims={"0": [exact("E5", kfac_approx="expand")]},
    seed=61,
)


def failures(records) -> list[str]:
    return [
        f"{r.case} {r.id}: {r.status}: {r.message[:200]}"
        for r in records
        if r.status != "passed"
    ]


def test_operations_are_exact_on_bias_free_nets():
    """Inverse, log-determinant, trace, scores and SPD pass; E1 carries over."""
    cases = [TANH_CE, CONV, ONE_DATUM["CrossEntropyLoss"]]
    records = run(
        "laplace-kron-operations", cases=cases, families="operations", time_limit=120
    )
    assert not failures(records), "\n".join(failures(records))
    checks = {r.check for r in records}
    assert {"op_inverse", "op_logdet", "op_trace", "op_scores", "op_spd"} <= checks
    assert any(c.startswith("op_exact_E1_empirical") for c in checks)


def test_regression_ef_operations_invert_twice_the_ef():
    """L1 in the operations: the MSE EF's damped inverse is that of 2 × the EF."""
    case = ONE_DATUM["MSELoss"]
    records = run(
        "laplace-kron-operations",
        cases=[case],
        checks="op_exact_E1_*",
        time_limit=120,
    )
    status = {(r.check, r.layer): r.status for r in records}
    assert status[("op_exact_E1_type-2_expand", "2")] == "passed"
    assert status[("op_exact_E1_empirical_expand", "2")] == "failed"

    problem = case.build()
    shapes = layer_shapes(problem.model, ["2"])
    V = probe_vectors(shapes, torch.float64)["2"]
    lam = 0.3
    request = KFACRequest(
        problem.model,
        problem.loss_func,
        problem.data,
        fisher_type="empirical",
        layers=("2",),
        operations=OperationsRequest("product", {"2": (lam,)}, {"2": V}),
    )
    ops = LaplaceKronOperations().compute(request)["2"]
    EF = curvature_block(problem, "2", "empirical")
    eye = torch.eye(EF.shape[0], dtype=EF.dtype)
    twice = torch.linalg.solve(2 * EF + lam * eye, V)
    once = torch.linalg.solve(EF + lam * eye, V)
    value = ops.inverse_product(V, lam)
    assert torch.linalg.norm(value - twice) / torch.linalg.norm(twice) < 1e-12
    assert torch.linalg.norm(value - once) / torch.linalg.norm(once) > 1e-2


def test_scores_of_two_sets_of_vectors():
    """``scores(U, V, λ) = Uᵀ K_λ⁻¹ V`` for ``U ≠ V`` too (the harness passes V, V)."""
    problem = TANH_CE.build()
    shapes = layer_shapes(problem.model, TANH_CE.layers)
    vectors = probe_vectors(shapes, torch.float64)
    lam = {"0": 0.05, "2": 0.2}
    request = KFACRequest(
        problem.model,
        problem.loss_func,
        problem.data,
        layers=tuple(TANH_CE.layers),
        operations=OperationsRequest(
            "product", {k: (v,) for k, v in lam.items()}, vectors
        ),
    )
    result = LaplaceKronOperations().compute(request)
    for layer, ops in result.items():
        V = vectors[layer]
        generator = torch.Generator().manual_seed(1)
        U = torch.randn(V.shape[0], 3, dtype=V.dtype, generator=generator)
        S = ops.scores(U, V, lam[layer])
        expected = U.T @ ops.inverse_product(V, lam[layer])
        assert S.shape == (3, V.shape[1])
        assert torch.linalg.norm(S - expected) / torch.linalg.norm(expected) < 1e-12


def test_layers_with_a_bias_are_checked_on_the_separate_block():
    records = run(
        "laplace-kron-operations",
        cases="deep_linear_d1_bias_mse_sum",
        checks="op_inverse,op_logdet,op_scores",
        time_limit=120,
    )
    assert records and all(r.status == "passed" for r in records), [
        r.message for r in records
    ]


class LaplaceOwnScale(LaplaceKronOperations):
    """Mutant: leaves ``temperature = 1`` (laplace's Hessian of ``N(f, 1)``, summed)."""

    name = "laplace-own-scale"

    @staticmethod
    def hessian_scale(request, factor):
        return 1.0


class WholeNetworkLogdet(LaplaceKronOperations):
    """Mutant: every layer reports ``log_det_posterior_precision`` (all groups)."""

    name = "laplace-whole-logdet"

    def compute(self, request):
        out = super().compute(request)
        if request.operations is None:
            return out
        functions = [ops.logdet for ops in out.values()]
        for ops in out.values():
            ops.logdet = lambda lam: sum(f(lam) for f in functions)
        return out


@pytest.mark.parametrize(
    ("mutant", "check"),
    [
        (LaplaceOwnScale, "op_inverse"),
        (LaplaceOwnScale, "op_logdet"),
        (WholeNetworkLogdet, "op_logdet"),
    ],
)
def test_a_wrong_translation_fails(mutant, check):
    records = run(
        mutant, cases=[TANH_CE], checks=check, time_limit=120, isolation="none"
    )
    assert records and all(r.status == "failed" for r in records), failures(records)


def test_damping_flag_has_no_effect():
    """L5: ``KronLaplace(damping=True)``'s posterior precision is ``K + δI``."""
    from laplace import KronLaplace
    from torch.utils.data import DataLoader, TensorDataset

    problem = TANH_CE.build()
    X = torch.cat([X for X, _ in problem.data])
    y = torch.cat([y for _, y in problem.data])
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    logdets = []
    for damping in (False, True):
        lap = KronLaplace(
            problem.model, "classification", prior_precision=0.5, damping=damping
        )
        lap.fit(loader)
        assert lap.H.damping is damping
        assert lap.posterior_precision.damping is False
        logdets.append(lap.log_det_posterior_precision.item())
    root = 0.5**0.5
    damped = sum(
        torch.logdet(
            torch.kron(Q + root * torch.eye(len(Q)), H + root * torch.eye(len(H)))
        ).item()
        for Q, H in lap.H_facs.kfacs
    )
    assert logdets[0] == logdets[1]
    assert abs(logdets[1] - damped) > 1.0
