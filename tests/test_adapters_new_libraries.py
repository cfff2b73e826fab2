"""Library-specific measurements behind the dattri, singd, modelgeometry and approxngd
findings (docs/adapters/*.md) that the generic expectations of tests/test_adapters.py
cannot express. A missing library skips its tests.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kfac_oracle.catalogue import Case, load_cases
from kfac_oracle.contract import KFACRequest
from kfac_oracle.implementations import resolve
from kfac_oracle.reference.exact import curvature_block
from kfac_oracle.runner.run import run

IMPORTS = {
    "dattri": "dattri.algorithm.influence_function",
    "singd": "singd.optim.optimizer",
    "modelgeometry": "modelgeometry",
    "approxngd": "approxngd",
}
ADAPTER_MODULE = {
    "dattri-ekfac": "dattri",
    "dattri-ekfac-ifvp": "dattri",
    "singd-kfac": "singd",
    "modelgeometry-kfac": "modelgeometry",
    "approxngd-kfac": "approxngd",
}


def require(module_name: str) -> None:
    """Skip unless the adapter module's library is installed and imports."""
    library = importlib.import_module(f"kfac_oracle.adapters.{module_name}").LIBRARY
    if library.version() is None:
        pytest.skip(f"{module_name} is not installed")
    try:
        importlib.import_module(IMPORTS[module_name])
    except Exception as error:
        pytest.skip(f"{module_name} does not import: {error!r}")


def _case(case_id: str) -> Case:
    (case,) = [c for c in load_cases() if c.id == case_id]
    return case


def _request(case: Case, fisher_type: str = "empirical") -> KFACRequest:
    problem = case.build(torch.float64)
    return KFACRequest(
        model=problem.model,
        loss_func=problem.loss_func,
        data=problem.data,
        fisher_type=fisher_type,
        layers=tuple(case.layers),
    ), problem


@pytest.mark.parametrize(
    "case_id", ["deep_linear_d2_bias_mse_mean", "mlp_tanh_cro_sum"]
)
def test_dattri_block_is_ekfac_of_exact_ef_in_dattris_basis(case_id):
    """The adapter's scale and layout are right: with dattri's own eigenvectors
    ``P = q_s ⊗ q_a`` its block is ``Pᵀ diag(diag(P B Pᵀ)) P`` for the exact EF
    block ``B`` (what EK-FAC would be if the basis were right: finding D1)."""
    require("dattri")
    from kfac_oracle.adapters.dattri import DattriEKFAC
    from kfac_oracle.conventions import joint_to_canonical_permutation

    case = _case(case_id)
    request, problem = _request(case)
    blocks = DattriEKFAC().compute(request)
    attributor, modules = DattriEKFAC()._fit(_request(case)[0], damping=0.0)
    for name, mod in modules.items():
        B = curvature_block(problem, name, "empirical")
        perm = joint_to_canonical_permutation(mod.out_features, mod.in_features)
        inverse = torch.argsort(perm)
        q_a, q_s = attributor.cached_q[name]
        P = torch.kron(q_s, q_a)
        B_joint = B[inverse][:, inverse]
        expected = (P.T * torch.diag(P @ B_joint @ P.T)) @ P
        expected = expected[perm][:, perm]
        err = (blocks[name].matrix - expected).norm() / expected.norm()
        assert err < 1e-10, (name, err.item())


def test_dattri_ifvp_equals_ekfac_without_bias_differs_with_bias():
    """Finding D2: transform_test_rep mixes weight and bias entries."""
    require("dattri")
    from kfac_oracle.adapters.dattri import DattriEKFAC, DattriEKFACIFVP

    for case_id, biased in (
        ("deep_linear_d2_nobias_mse_mean", False),
        ("deep_linear_d2_bias_mse_mean", True),
    ):
        case = _case(case_id)
        ekfac = DattriEKFAC().compute(_request(case)[0])
        ifvp = DattriEKFACIFVP().compute(_request(case)[0])
        for name in case.layers:
            a, b = ifvp[name].matrix, ekfac[name].matrix
            err = ((a - b).norm() / b.norm()).item()
            if biased:
                assert err > 0.1, (case_id, name, err)
            else:
                assert err < 1e-10, (case_id, name, err)


# Equal batches, reduction sum: SINGD accumulates the input factor as a sum of
# per-micro-batch averages, so three equal micro-batches give 3 × the one-batch block.
SUM_EQUAL_BATCHES = Case(
    id="linear_mse_sum_three_equal_batches",
    family="deep_linear",
    model=[("Linear", 5, 3)],
    input_shape=(5,),
    loss="MSELoss",
    reduction="sum",
    batch_sizes=(2, 2, 2),
    seed=7,
)


def test_singd_sum_reduction_accumulation_is_k_times_one_batch():
    """Finding S2 (singd issue #43): 3 equal micro-batches, sum → 3 × the block."""
    require("singd")
    (record,) = run(
        "singd-kfac", cases=[SUM_EQUAL_BATCHES], checks="agree_empirical_expand"
    )
    assert record.status == "failed", record.message
    assert record.error == pytest.approx(2.0, rel=1e-9)  # ‖3B − B‖ / ‖B‖


def test_approxngd_conv_ratio_is_one_over_n_squared():
    """Finding A1: the Conv2d block is 1/N² of the reference (N = 5: error 24/25)."""
    require("approxngd")
    (record,) = run(
        "approxngd-kfac",
        cases="conv_pixel_k3_pad1_mse_sum",
        checks="agree_empirical_expand",
    )
    # approxngd supports only mean reductions: the sum case is unsupported.
    assert record.status == "unsupported"
    records = run(
        "approxngd-kfac",
        cases="conv_pool_k3_pad1_mse_mean",
        checks="agree_empirical_expand",
    )
    (record,) = [r for r in records if r.layer == "0"]
    assert record.status == "failed", record.message
    assert record.error == pytest.approx(24 / 25, rel=1e-9)


def test_modelgeometry_mean_loss_fn_is_one_over_b_squared_of_its_diagonal_fisher():
    """Finding M2: with the mean loss_fn of the library's own tests, K-FAC on B
    identical data (exact) is 1/B² of ``diagonal_fisher`` with the same loss_fn."""
    require("modelgeometry")
    import modelgeometry
    from torch import nn

    class OneLinear(modelgeometry.ModelAdapter):
        def qkv_modules(self, layer_idx):
            return {"qkv": self._layers[layer_idx]}

        def qkv_weights(self, layer_idx):
            raise NotImplementedError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).double()
    B = 8
    X, y = torch.randn(1, 4, dtype=torch.float64).repeat(B, 1), torch.ones(B).long()
    ratios = {}
    for reduction in ("mean", "sum"):
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        f = modelgeometry.kfac_factors(
            model, [(X, y)], B, loss_fn, OneLinear(model, [model[0]], "")
        )["0.weight"]
        diag = torch.kron(f["G"], f["A"]).diagonal()
        ef = modelgeometry.diagonal_fisher(model, [(X, y)], B, loss_fn)["0.weight"]
        ratios[reduction] = (diag / ef.flatten()).mean().item()
    assert ratios["sum"] == pytest.approx(1.0, rel=1e-10)
    assert ratios["mean"] == pytest.approx(1 / B**2, rel=1e-10)


def test_approxngd_full_fisher_block_raises():
    """Finding A3: ``FisherBlock.full_fisher_block`` raises AttributeError."""
    require("approxngd")
    import approxngd
    from torch import nn

    model = nn.Sequential(nn.Linear(3, 2))
    kfac = approxngd.KFAC(model, learning_rate=0.0, damping=1e-3, cov_ema_decay=1.0)
    with kfac.track_forward():
        loss = model(torch.randn(5, 3)).pow(2).mean()
    with kfac.track_backward():
        loss.backward()
    kfac.update_cov()
    (block,) = [b for b in kfac.blocks if not b.is_static]
    with pytest.raises(AttributeError, match="_renorm_coeff"):
        block.full_fisher_block()


@pytest.mark.parametrize("name", sorted(ADAPTER_MODULE))
def test_adapters_leave_no_hooks_and_keep_the_model(name):
    require(ADAPTER_MODULE[name])
    case = _case("mlp_tanh_cro_mean")
    request, problem = _request(case)
    model = request.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resolve(name).impl.compute(request)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
