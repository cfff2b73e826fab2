"""dattri's damped EK-FAC inverse-Fisher-vector product (``dattri-ekfac-inverse``).

dattri's ``transform_test_rep`` is exactly ``(K + λI)⁻¹`` of dattri's own EK-FAC
(``dattri-ekfac``; with a bias, of the matrix its IFVP applies, ``dattri-ekfac-ifvp``):
the adapter's translation (``damping = λ / (R·N)``, result divided by ``R·N``) is right,
and the ``operations`` checks fail only by the library's findings, D1 (the EK-FAC
basis; diagnosed as "the candidate's own block") and D2 (the bias layout). A wrong
scale is not diagnosed so. A missing dattri skips these tests.
"""

from __future__ import annotations

import pytest
import torch

from kfac_oracle.adapters.dattri import DattriEKFACInverse
from kfac_oracle.catalogue import load_cases
from kfac_oracle.contract import KFACRequest, OperationsRequest
from kfac_oracle.reference.operations import probe_vectors
from kfac_oracle.runner.run import run
from kfac_oracle.runner.validate import layer_shapes


@pytest.fixture(autouse=True)
def _dattri():
    from kfac_oracle.adapters.dattri import LIBRARY

    if LIBRARY.version() is None:
        pytest.skip("dattri is not installed")
    try:
        LIBRARY.load("algorithm.influence_function", "task")
    except ImportError as error:
        pytest.skip(f"dattri does not import: {error}")


def _case(case_id):
    (case,) = [c for c in load_cases() if c.id == case_id]
    return case


def _requests(case, lam):
    problem = case.build()
    shapes = layer_shapes(problem.model, case.layers)
    vectors = probe_vectors(shapes, torch.float64)
    base = dict(
        model=problem.model,
        loss_func=problem.loss_func,
        data=problem.data,
        fisher_type="empirical",
        layers=tuple(case.layers),
    )
    operations = OperationsRequest("product", {k: (lam,) for k in case.layers}, vectors)
    return KFACRequest(**base), KFACRequest(**base, operations=operations), vectors


@pytest.mark.parametrize(
    ("case_id", "block_adapter"),
    [
        ("deep_linear_d2_nobias_mse_sum", "DattriEKFAC"),
        ("deep_linear_d1_bias_mse_sum", "DattriEKFACIFVP"),
    ],
)
def test_inverse_is_dattris_own_matrix_damped(case_id, block_adapter):
    """``K_λ⁻¹ V`` is ``(B + λI)⁻¹ V`` for dattri's own block ``B`` (sum: R·N = N)."""
    from kfac_oracle.adapters import dattri

    lam = 0.7
    curvature, operations, vectors = _requests(_case(case_id), lam)
    blocks = getattr(dattri, block_adapter)().compute(curvature)
    ops = DattriEKFACInverse().compute(operations)
    for layer, op in ops.items():
        B, V = blocks[layer].matrix, vectors[layer]
        exact = torch.linalg.solve(B + lam * torch.eye(len(B), dtype=B.dtype), V)
        value = op.inverse_product(V, lam)
        assert torch.linalg.norm(value - exact) / torch.linalg.norm(exact) < 1e-12
        generator = torch.Generator().manual_seed(1)
        U = torch.randn(V.shape[0], 2, dtype=V.dtype, generator=generator)
        S = op.scores(U, V, lam)
        expected = U.T @ exact
        assert torch.linalg.norm(S - expected) / torch.linalg.norm(expected) < 1e-12


def test_biased_layers_apply_the_mixed_layout():
    """D2 in the operations: with a bias, dattri's IFVP is not its EK-FAC's inverse."""
    from kfac_oracle.adapters import dattri

    lam = 0.7
    curvature, operations, vectors = _requests(
        _case("deep_linear_d1_bias_mse_sum"), lam
    )
    blocks = dattri.DattriEKFAC().compute(curvature)
    ops = DattriEKFACInverse().compute(operations)
    for layer, op in ops.items():
        B, V = blocks[layer].matrix, vectors[layer]
        exact = torch.linalg.solve(B + lam * torch.eye(len(B), dtype=B.dtype), V)
        value = op.inverse_product(V, lam)
        assert torch.linalg.norm(value - exact) / torch.linalg.norm(exact) > 1e-2


class DattriOwnScale(DattriEKFACInverse):
    """Mutant: hands ``λ`` to dattri unscaled (its ``F`` taken for ``K = R·N·F``)."""

    name = "dattri-own-scale"

    @staticmethod
    def curvature_scale(request):
        return 1.0


OWN_BLOCK = "the candidate's own block damped by the declared product"


def test_checks_tell_the_findings_from_a_wrong_translation():
    """The adapter fails by D1 only ("own block"); the wrong scale is not that."""
    case = "deep_linear_d2_nobias_mse_sum"
    records = run("dattri-ekfac-inverse", cases=case, checks="op_inverse")
    assert records and all(r.status == "failed" for r in records)
    assert all(OWN_BLOCK in (r.diagnosis or "") for r in records)
    records = run(DattriOwnScale, cases=case, checks="op_inverse", isolation="none")
    assert records and all(r.status == "failed" for r in records)
    assert not any(OWN_BLOCK in (r.diagnosis or "") for r in records)
