"""The exact references against curvlinops' operators and against closed forms."""

import math

import pytest
import torch
from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)

from kfac_oracle.losses import output_hessian, output_hessian_sqrt, per_datum_loss
from kfac_oracle.problem import Problem
from kfac_oracle.reference.exact import (
    CurvatureOperator,
    curvature_block,
    curvature_matrix,
    mc_labels,
    module_parameter_names,
)
from kfac_oracle.reference.functional import ParameterSubset
from tests.utils import CASE_IDS, CASES, assert_close, rel_error, two_dim_output

OPERATORS = {
    "ggn": GGNLinearOperator,
    "hessian": HessianLinearOperator,
    "empirical": EFLinearOperator,
}


def curvlinops_dense(problem, operator, **kwargs):
    params = [p for _, p in problem.named_parameters()]
    op = operator(
        problem.model,
        problem.loss_func,
        params,
        problem.data,
        check_deterministic=False,
        **kwargs,
    )
    P = op.shape[0]
    return op @ torch.eye(P, dtype=problem.dtype)


def per_loss_term_empirical_fisher(problem):
    """R Σ_{n,s} ∇ℓ_{n,s} ∇ℓ_{n,s}ᵀ: every output position treated as its own datum.

    This is what curvlinops' EFLinearOperator computes for outputs with more than two
    dimensions: it flattens the output to ``(N·S, C)`` before forming gradients.
    """
    subset = ParameterSubset(problem.model)
    theta = subset.values()
    result = 0
    for X, y in problem.data:

        def terms(p, X=X, y=y):
            f = subset.forward(p, X)
            if problem.loss_name == "CrossEntropyLoss":
                f = f.movedim(1, -1).reshape(-1, f.shape[1])
                return torch.nn.functional.cross_entropy(
                    f, y.reshape(-1), reduction="none"
                )
            flat_f = f.reshape(-1, f.shape[-1])
            flat_y = y.reshape(-1, y.shape[-1])
            return per_datum_loss(problem.loss_name, flat_f, flat_y)

        J = subset.flatten(torch.func.jacrev(terms)(theta))
        result = result + J.T @ J
    return result * problem.reduction_factor


@pytest.mark.parametrize("kind", ["ggn", "hessian", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dense_reference_matches_curvlinops(case, kind):
    """GGN, Hessian and EF equal curvlinops' operators (float64, rtol 1e-10).

    For outputs with extra dimensions curvlinops' EF treats every output position as
    a datum (it flattens the output to (N·S, C)); docs/theory.md §2 defines the EF over
    the
    batch dimension. There we check that the two differ and that curvlinops equals the
    per-position EF, which pins the explanation down.
    """
    problem = case.build()
    ours = curvature_matrix(problem, kind)
    theirs = curvlinops_dense(problem, OPERATORS[kind])
    if kind == "empirical" and not two_dim_output(case):
        assert rel_error(ours, theirs) > 1e-3
        assert_close(
            per_loss_term_empirical_fisher(problem), theirs, what="per-term EF"
        )
    else:
        assert_close(ours, theirs, what=kind)


@pytest.mark.parametrize("case", [c for c in CASES if two_dim_output(c)], ids=str)
def test_mc_fisher_matches_curvlinops_same_samples(case):
    """The MC Fisher draws the same labels as curvlinops for the same seed.

    curvlinops' FisherMCLinearOperator supports 2-D outputs only, and rejects soft BCE
    targets (the MC Fisher does not depend on the targets; that is a limitation).
    """
    problem = case.build()
    if case.loss == "BCEWithLogitsLoss" and case.targets == "soft":
        with pytest.raises(NotImplementedError, match="binary"):
            curvlinops_dense(problem, FisherMCLinearOperator, mc_samples=3, seed=5)
        return
    ours = curvature_matrix(problem, "mc", mc_samples=3, seed=5)
    theirs = curvlinops_dense(problem, FisherMCLinearOperator, mc_samples=3, seed=5)
    if case.loss == "MSELoss":
        # curvlinops builds the sampling std √½ as a float32 tensor, so in float64 its
        # MSE MC Fisher is scaled by (fl32(√½)/√½)² ≈ 1 − 3.4e-8 (a precision finding).
        std32 = torch.tensor(math.sqrt(0.5), dtype=torch.float32).double().item()
        ratio = (std32 / math.sqrt(0.5)) ** 2
        assert rel_error(ours, theirs) > 1e-9
        assert_close(ours * ratio, theirs, what="MC Fisher, float32 std")
    else:
        assert_close(ours, theirs, what="MC Fisher")


@pytest.mark.parametrize(
    "case_id", ["mlp_tanh_cro_mean", "mlp_tanh_bce_mean", "seq_ce_mean"]
)
def test_mc_fisher_converges_to_ggn(case_id):
    """E[MC Fisher] = GGN: the mean of M single-sample estimates lies within a bound.

    With X_m the single-sample MC Fisher (iid over m), Chebyshev gives
    P(‖mean − GGN‖_F ≥ t) ≤ E‖X − GGN‖²_F / (M t²). We take the failure probability
    δ = 1e-3, t = σ / √(M δ), with σ² estimated from the same M samples.
    """
    problem = next(c for c in CASES if c.id == case_id).build()
    ggn = curvature_matrix(problem, "ggn")
    M = 400
    samples = torch.stack(
        [curvature_matrix(problem, "mc", mc_samples=1, seed=s) for s in range(M)]
    )
    mean = samples.mean(0)
    sigma2 = ((samples - ggn) ** 2).sum((1, 2)).mean()
    t = math.sqrt(sigma2 / (M * 1e-3))
    err = (mean - ggn).norm()
    assert err <= t, f"MC mean off by {err:.3e} > bound {t:.3e}"
    assert rel_error(samples[0], ggn) > 1e-3, "a single sample should differ"


@pytest.mark.parametrize("kind", ["ggn", "hessian", "empirical", "mc"])
@pytest.mark.parametrize(
    "case_id",
    ["mlp_relu_inplace_mse_mean", "seq_ce_mean", "conv_stack_pool_mse_mean"],
)
def test_matrix_free_products_match_dense(case_id, kind):
    """CurvatureOperator's products equal the dense matrix (and its scipy form)."""
    problem = next(c for c in CASES if c.id == case_id).build()
    dense = curvature_matrix(problem, kind, mc_samples=2, seed=3)
    op = CurvatureOperator(problem, kind, mc_samples=2, seed=3)
    P = op.shape[0]
    V = torch.randn(P, 3, dtype=torch.float64)
    assert_close(op.matmat(V), dense @ V, what="matmat")
    x = V[:, 0].numpy()
    assert_close(torch.as_tensor(op.to_scipy() @ x), dense @ V[:, 0], what="scipy")


@pytest.mark.parametrize("kind", ["ggn", "hessian", "empirical", "mc"])
@pytest.mark.parametrize(
    "case_id", ["mlp_tanh_cro_sum", "conv_stack_pool_mse_mean", "seq_ce_sum"]
)
def test_blocks_are_slices_of_the_full_matrix(case_id, kind):
    """A per-layer block equals the corresponding slice of the full matrix."""
    case = next(c for c in CASES if c.id == case_id)
    problem = case.build()
    full = curvature_matrix(problem, kind, mc_samples=2, seed=1)
    names = [n for n, _ in problem.named_parameters()]
    sizes = [p.numel() for _, p in problem.named_parameters()]
    offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
    for layer in case.layers:
        pnames = module_parameter_names(problem.model, layer)
        idx = torch.cat(
            [
                torch.arange(
                    offsets[n], offsets[n] + problem.model.get_parameter(n).numel()
                )
                for n in pnames
            ]
        )
        block = curvature_block(problem, layer, kind, mc_samples=2, seed=1)
        assert_close(block, full[idx][:, idx], what=f"{layer} block")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_regression_closed_form(reduction, bias):
    """Single Linear + MSE: GGN = Hessian = 2R (I_C ⊗ Σ_n x̃ x̃ᵀ) in [rvec(W̃)] order."""
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3, bias=bias).double()
    X = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randn(7, 3, dtype=torch.float64)
    problem = Problem(
        model, torch.nn.MSELoss(reduction=reduction), [(X[:5], y[:5]), (X[5:], y[5:])]
    )
    R = 1.0 if reduction == "sum" else 1 / (7 * 3)
    Xt = torch.cat([X, torch.ones(7, 1, dtype=X.dtype)], 1) if bias else X
    closed = 2 * R * torch.kron(torch.eye(3, dtype=X.dtype), Xt.T @ Xt)
    if bias:  # [rvec(W̃)] -> [rvec(W), b]
        from kfac_oracle.conventions import joint_to_canonical_permutation

        perm = joint_to_canonical_permutation(3, 4)
        closed = closed[perm][:, perm]
    assert_close(curvature_matrix(problem, "ggn"), closed, what="GGN")
    assert_close(curvature_matrix(problem, "hessian"), closed, what="Hessian")


@pytest.mark.parametrize("loss", ["MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"])
def test_single_affine_layer_hessian_equals_ggn(loss):
    """For one affine layer the whole Hessian equals the GGN, for any loss (E8)."""
    torch.manual_seed(2)
    model = torch.nn.Linear(4, 3).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    y = {
        "MSELoss": torch.randn(6, 3, dtype=torch.float64),
        "CrossEntropyLoss": torch.randint(0, 3, (6,)),
        "BCEWithLogitsLoss": torch.rand(6, 3, dtype=torch.float64),
    }[loss]
    problem = Problem(model, getattr(torch.nn, loss)(), [(X, y)])
    assert_close(curvature_matrix(problem, "hessian"), curvature_matrix(problem, "ggn"))


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.family == "deep_linear"], ids=str
)
def test_deep_linear_hessian_blocks_equal_ggn_blocks(case):
    """E8: every per-layer Hessian block of a deep linear net is its GGN block."""
    problem = case.build()
    for layer in case.layers:
        assert_close(
            curvature_block(problem, layer, "hessian"),
            curvature_block(problem, layer, "ggn"),
            what=layer,
        )


def test_nonlinear_hessian_differs_from_ggn():
    """A control: for a nonlinear net the Hessian is not the GGN."""
    problem = next(c for c in CASES if c.id == "mlp_tanh_cro_mean").build()
    assert (
        rel_error(
            curvature_matrix(problem, "hessian"), curvature_matrix(problem, "ggn")
        )
        > 1e-3
    )


@pytest.mark.parametrize(
    "loss, shape",
    [
        ("MSELoss", (3, 2, 4)),
        ("CrossEntropyLoss", (3, 5)),
        ("CrossEntropyLoss", (3, 4, 2, 2)),
        ("BCEWithLogitsLoss", (3, 4)),
    ],
)
def test_output_hessian_sqrt_matches_autodiff(loss, shape):
    """Σ_k v_k v_kᵀ equals the autodiff loss Hessian, datum by datum."""
    output = torch.randn(shape, dtype=torch.float64)
    if loss == "CrossEntropyLoss":
        y = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    else:
        y = torch.rand(shape, dtype=torch.float64)
    V = output_hessian_sqrt(loss, output).reshape(-1, shape[0], math.prod(shape[1:]))
    ours = torch.einsum("knf,kng->nfg", V, V)
    assert_close(ours, output_hessian(loss, output, y))


def test_mc_labels_are_reproducible():
    """Same seed, same labels; another seed, other labels."""
    problem = next(c for c in CASES if c.id == "seq_ce_mean").build()
    a, b, c = (mc_labels(problem, 4, s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_float32_ggn_within_derived_tolerance():
    """float32 GGN vs float64: within a bound derived from the dtype and the problem.

    Each entry is a sum of n = N·F products of Jacobian entries that themselves carry
    forward/backward rounding; the classic bound γ_n = n·u (u = eps/2) on inner
    products, applied once for the Jacobians and once for the contraction, gives a
    relative Frobenius bound 2·n·u.
    """
    case = next(c for c in CASES if c.id == "mlp_tanh_cro_mean")
    p64, p32 = case.build(torch.float64), case.build(torch.float32)
    ggn64 = curvature_matrix(p64, "ggn")
    ggn32 = curvature_matrix(p32, "ggn").double()
    n = p64.num_data * 3 + max(p.numel() for p in p64.model.parameters())
    tol = 2 * n * torch.finfo(torch.float32).eps / 2
    assert rel_error(ggn32, ggn64) <= tol
