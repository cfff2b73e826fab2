"""curvlinops 3.0.1: type-2 KFAC with >2-D outputs backpropagates all positions at once.

For an output of shape (N, S, C) (a loss term per position), the type-2 gradient factor
should come from the columns of a symmetric square root of each datum's loss Hessian,
one vector per (position, class). KFACLinearOperator flattens the output to
(N·S, C) and backpropagates each class column e_k at *all* S positions at once,
i.e. the vector Σ_s' e_(s',k). That adds cross-position terms absent from the GGN:

1. KFAC-reduce on a position-wise network with per-position outputs and an affine tail
   (e.g. a Conv2d whose output is the per-pixel prediction): G is exactly S times the
   reference (ḡ = Σ_s g_s collects S identical contributions); with a nonlinear tail
   it is not even a scalar multiple.
2. KFAC-expand where positions mix after the layer: the block differs.
3. curvlinops' own MC-KFAC (one sampled label per position, E[ggᵀ] = the reference's
   type-2) converges to the reference, not to curvlinops' type-2.

Only curvlinops, torch and torch.func. Run: python curvlinops_type2_multidim_output.py
"""

import torch
from curvlinops import KFACLinearOperator
from torch import nn

torch.manual_seed(0)
dt = torch.float64
N, S, D, H, C = 4, 3, 5, 4, 2


class MixPositions(nn.Module):
    """Mixes positions: (N, S, H) -> (N, S, H) with a fixed S×S matrix."""

    def __init__(self):
        super().__init__()
        self.register_buffer("M", torch.randn(S, S, dtype=dt))

    def forward(self, x):
        return torch.einsum("st,nth->nsh", self.M, x)


def reference_block(model, X, approx):
    """Type-2 KFAC of module '0' (bias-free Linear) built by hand: G ⊗ A (rvec)."""
    R = 1.0 / (N * S * C)  # MSELoss(reduction="mean")
    first, rest = model[0], model[1:]
    z = first(X)  # (N, S, H), output of layer '0'
    # J[n]: ∂f(x_n)/∂z_n, shape (S, C, S, H)
    J = torch.func.vmap(torch.func.jacrev(lambda zz: rest(zz[None])[0]))(z)
    vecs = (2 * R) ** 0.5 * J  # columns of sqrt(R·2I): one per (s', k)
    if approx == "expand":
        G = torch.einsum("nakth,nakti->hi", vecs, vecs)  # Σ over n, (s',k), s
        A = torch.einsum("nsd,nse->de", X, X) / (N * S)
    else:
        gbar = vecs.sum(3)  # Σ_s g_s : (N, S', C, H)
        G = torch.einsum("nakh,naki->hi", gbar, gbar)
        abar = X.mean(1)
        A = abar.T @ abar / N
    return torch.kron(G, A)


def curvlinops_block(model, X, y, approx, fisher_type="type-2", **kw):
    op = KFACLinearOperator(
        model,
        nn.MSELoss(),
        [model[0].weight],
        [(X, y)],
        fisher_type=fisher_type,
        kfac_approx=approx,
        check_deterministic=False,
        **kw,
    )
    return op @ torch.eye(op.shape[0], dtype=dt)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


X = torch.randn(N, S, D, dtype=dt)
y = torch.randn(N, S, C, dtype=dt)
positionwise = nn.Sequential(
    nn.Linear(D, H, bias=False), nn.Tanh(), nn.Linear(H, C)
).to(dt)
mixing = nn.Sequential(
    nn.Linear(D, H, bias=False), nn.Tanh(), MixPositions(), nn.Linear(H, C)
).to(dt)

affine = nn.Sequential(nn.Linear(D, H, bias=False), nn.Linear(H, C)).to(dt)
print("1. reduce, position-wise net, per-position outputs:")
for label, net in (("affine tail", affine), ("tanh tail", positionwise)):
    ref = reference_block(net, X, "reduce")
    theirs = curvlinops_block(net, X, y, "reduce")
    ratio = (theirs.norm() / ref.norm()).item()
    print(
        f"   {label}: |curvlinops| / |reference| = {ratio:.12f} (S = {S}); "
        f"relative error of curvlinops / S: {rel(theirs / S, ref):.2e}"
    )

ref = reference_block(mixing, X, "expand")
theirs = curvlinops_block(mixing, X, y, "expand")
print("2. expand, positions mixed after the layer:")
print(f"   relative error curvlinops vs reference: {rel(theirs, ref):.3e}")
ref_pw = reference_block(positionwise, X, "expand")
theirs_pw = curvlinops_block(positionwise, X, y, "expand")
print(f"   (control, position-wise net: {rel(theirs_pw, ref_pw):.2e})")

print("3. curvlinops MC-KFAC (reduce, position-wise), average of 10 seeds × M=300:")
ref = reference_block(positionwise, X, "reduce")
t2 = curvlinops_block(positionwise, X, y, "reduce")
mc = torch.stack(
    [
        curvlinops_block(
            positionwise, X, y, "reduce", fisher_type="mc", mc_samples=300, seed=s
        )
        for s in range(10)
    ]
).mean(0)
print(f"   MC vs reference type-2:  {rel(mc, ref):.3e}")
print(f"   MC vs curvlinops type-2: {rel(mc, t2):.3e}")
