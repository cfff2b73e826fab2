"""ASDL's damped K-FAC inverse (``asdl-kfac-inverse``).

The default catalogue's cases where the adapter applies are the bias-free deep linear
nets (ASDL keeps every bias as a separate block, so biased layers are unsupported);
the cases here add bias-free nonlinear nets, cross-entropy, a Conv2d layer and a
one-datum case to them. Wrong translations of the adapter (the convention
``PreconditioningConfig``'s docstring describes, ``per_factor`` without π, ASDL's own
Fisher scale) show that the checks see them; finding ASDL 8 (π-damped factors, not
``K + λI``) is pinned against dense matrices. A missing ASDL skips these tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from kfac_oracle.adapters.asdl import LIBRARY, AsdlKFACInverse
from kfac_oracle.catalogue import Case, inexact, one_datum_claims
from kfac_oracle.contract import KFACRequest, OperationsRequest
from kfac_oracle.reference.operations import probe_vectors
from kfac_oracle.runner.run import run
from kfac_oracle.runner.validate import layer_shapes


@pytest.fixture(autouse=True)
def _asdl():
    if LIBRARY.version() is None:
        pytest.skip("asdfghjkl is not installed")
    try:
        LIBRARY.load()
    except ImportError as error:
        pytest.skip(f"asdfghjkl does not import: {error}")


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
SIGMOID_MSE = Case(
    id="nobias_mlp_sigmoid_mse_sum",
    family="user",
    model=[("Linear", 4, 5, NO_BIAS), ("Sigmoid",), ("Linear", 5, 3, NO_BIAS)],
    input_shape=(4,),
    loss="MSELoss",
    reduction="sum",
    batch_sizes=(4, 2),
    claims={"0": [inexact()], "2": [inexact()]},
    seed=5,
)
ONE_DATUM = Case(
    id="nobias_one_datum_cro_sum",
    family="user",
    model=[("Linear", 4, 5, NO_BIAS), ("Sigmoid",), ("Linear", 5, 3, NO_BIAS)],
    input_shape=(4,),
    loss="CrossEntropyLoss",
    reduction="sum",
    batch_sizes=(1,),
    claims={"0": one_datum_claims(), "2": one_datum_claims()},
    seed=7,
)
CONV = Case(
    id="nobias_conv_flat_mse_mean",
    family="user",
    model=[("Conv2d", 2, 3, 3, {"padding": 1, "bias": False}), ("Flatten",)],
    input_shape=(2, 5, 5),
    loss="MSELoss",
    reduction="mean",
    batch_sizes=(2, 1),
    setting="expand",
    claims={"0": [inexact()]},
    seed=61,
)


def failures(records) -> list[str]:
    return [
        f"{r.case} {r.id}: {r.status}: {r.message[:200]}"
        for r in records
        if r.status != "passed"
    ]


def test_operations_are_exact_on_bias_free_nets():
    """Inverse, trace, scores, eigenvalues and SPD pass (pi damping, Linear, Conv2d).

    The one-datum case carries E1 claims, whose ``op_exact`` checks compare
    ``product`` damping only: unsupported for a ``pi`` candidate, as ``op_logdet``.
    """
    records = run(
        "asdl-kfac-inverse",
        cases=[TANH_CE, SIGMOID_MSE, CONV, ONE_DATUM],
        families="operations",
        time_limit=120,
    )
    passed = [r for r in records if r.status == "passed"]
    others = [r for r in records if r.status != "passed"]
    assert {r.check for r in passed} == {
        "op_inverse",
        "op_trace",
        "op_scores",
        "op_spd",
        "op_eigenvalues",
    }
    # No log-determinant or diagonal in ASDL; the exact blocks fix product damping.
    bad = [
        r
        for r in others
        if r.status != "unsupported"
        or not (
            r.check in ("op_logdet", "op_diagonal") or r.check.startswith("op_exact_")
        )
    ]
    assert not bad, "\n".join(failures(bad))


def request_for(
    case: Case,
    convention: str,
    damping: dict[str, float],
    fisher_type: str = "type-2",
):
    problem = case.build()
    shapes = layer_shapes(problem.model, case.layers)
    vectors = probe_vectors(shapes, torch.float64)
    request = KFACRequest(
        problem.model,
        problem.loss_func,
        problem.data,
        fisher_type=fisher_type,
        layers=tuple(case.layers),
        operations=OperationsRequest(
            convention, {k: (v,) for k, v in damping.items()}, vectors
        ),
    )
    return request, vectors


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("case", [TANH_CE, SIGMOID_MSE], ids=lambda c: c.id)
def test_inverse_is_the_pi_damped_factors_inverse(case, fisher_type):
    """``K_λ⁻¹ V`` equals the inverse of ``(G + √λ/π I) ⊗ (A + π√λ I)`` built from
    the adapter's own factors (``asdl-fisher-exact``/``-emp``), and differs from
    ``K + λI``."""
    lam = {"0": 0.05, "2": 0.2}
    request, vectors = request_for(case, "pi", lam, fisher_type)
    ops = AsdlKFACInverse().compute(request)
    factors = AsdlKFACInverse().compute(
        KFACRequest(
            request.model,
            request.loss_func,
            request.data,
            fisher_type=fisher_type,
            layers=("0", "2"),
        )
    )
    for layer, op in ops.items():
        A = factors[layer].input_covariance
        G = factors[layer].gradient_covariance
        pi = math.sqrt((A.trace() / len(A)) / (G.trace() / len(G)))
        root = math.sqrt(lam[layer])
        damped = torch.kron(
            G + root / pi * torch.eye(len(G), dtype=G.dtype),
            A + pi * root * torch.eye(len(A), dtype=A.dtype),
        )
        V = vectors[layer]
        exact = torch.linalg.solve(damped, V)
        value = op.inverse_product(V, lam[layer])
        assert torch.linalg.norm(value - exact) / torch.linalg.norm(exact) < 1e-12
        K = torch.kron(G, A)
        product = torch.linalg.solve(K + lam[layer] * torch.eye(len(K)), V)
        assert torch.linalg.norm(value - product) / torch.linalg.norm(product) > 1e-2
        generator = torch.Generator().manual_seed(1)
        U = torch.randn(V.shape[0], 3, dtype=V.dtype, generator=generator)
        S = op.scores(U, V, lam[layer])
        expected = U.T @ exact
        assert torch.linalg.norm(S - expected) / torch.linalg.norm(expected) < 1e-12
        trace = (G.trace() * A.trace()).item()
        assert float(op.trace) == pytest.approx(trace, rel=1e-13)
        eigenvalues = torch.linalg.eigvalsh(K)
        value = op.eigenvalues.sort().values
        assert torch.linalg.norm(value - eigenvalues) < 1e-13 * eigenvalues.norm()


def test_other_conventions_and_biased_layers_are_refused():
    request, _ = request_for(TANH_CE, "product", {"0": 0.1, "2": 0.1})
    with pytest.raises(NotImplementedError, match="π-heuristic"):
        AsdlKFACInverse().compute(request)
    records = run(
        "asdl-kfac-inverse",
        cases="deep_linear_d1_bias_mse_sum",
        checks="op_inverse",
        time_limit=120,
    )
    assert [r.status for r in records] == ["unsupported"]
    assert "separate block" in records[0].message


class DocstringProduct(AsdlKFACInverse):
    """Mutant: declares ``product``, the convention ``PreconditioningConfig`` documents
    ("an identity matrix multiplied by the damping value will be added to the
    curvature matrix"), and passes the request through to ASDL unchanged."""

    name = "asdl-docstring-product"
    capabilities = {**AsdlKFACInverse.capabilities, "damping": {"product"}}

    def compute(self, request):
        if request.operations is not None:
            request.operations.convention = "pi"
        return super().compute(request)


class PerFactorClaimed(DocstringProduct):
    """Mutant: declares ``per_factor`` (√δ on each factor, no π) for ASDL's damping."""

    name = "asdl-per-factor-claimed"
    capabilities = {**AsdlKFACInverse.capabilities, "damping": {"per_factor"}}


class AsdlOwnScale(AsdlKFACInverse):
    """Mutant: hands ``λ`` to ASDL and returns its inverse unscaled, as if ASDL's
    Fisher ``B ⊗ A`` were the contract's ``K`` (it is ``K / (R·N·k)``)."""

    name = "asdl-own-scale"

    @staticmethod
    def fisher_scale(factor):
        return 1.0


@pytest.mark.parametrize(
    ("mutant", "case", "diagnosis"),
    [
        (DocstringProduct, TANH_CE, "the pi convention"),
        (PerFactorClaimed, TANH_CE, "the pi convention"),
        # c = R·N·k = 1 for a mean cross-entropy: the scale shows with sum MSE (2N).
        (AsdlOwnScale, SIGMOID_MSE, None),
    ],
)
def test_a_wrong_translation_fails(mutant, case, diagnosis):
    records = run(
        mutant, cases=[case], checks="op_inverse", time_limit=120, isolation="none"
    )
    assert records and all(r.status == "failed" for r in records), failures(records)
    if diagnosis:
        assert all(diagnosis in (r.diagnosis or "") for r in records), [
            r.diagnosis for r in records
        ]
