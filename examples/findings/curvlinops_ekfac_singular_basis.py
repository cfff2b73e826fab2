"""curvlinops 3.0.1: EKFAC depends on the eigenbasis chosen for a singular factor.

EKFAC (George et al. 2018) is Q diag(d) Qᵀ with Q = U_G ⊗ U_A the Kronecker
eigenbasis and d = diag(Qᵀ B Q) re-fitted from per-datum gradients (B = the exact block
of the same flavour, catalogue claim E7). With a repeated eigenvalue (here: KFAC-reduce with
fewer data than inputs, so A has a zero eigenvalue of multiplicity > 1) the eigenbasis
is not unique and the EKFAC matrix depends on that choice. curvlinops satisfies E7
exactly in the basis it picked (torch.linalg.eigh), and a rotated basis of the same
eigenspaces gives another, equally valid, EKFAC block. A non-uniqueness, not a finding about curvlinops:
compare EKFAC implementations only where the factors are non-singular (or in a common
basis).
Only curvlinops, torch and torch.func. Run: python curvlinops_ekfac_singular_basis.py
"""

import torch
from curvlinops import EKFACLinearOperator
from torch import nn
from torch.func import functional_call, grad, vmap

torch.manual_seed(0)
dt = torch.float64
N, S, D, H, C = 2, 3, 5, 4, 2


class MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(1)


model = nn.Sequential(
    nn.Linear(D, H, bias=False), nn.Tanh(), MeanPool(), nn.Linear(H, C)
).to(dt)
X, y = torch.randn(N, S, D, dtype=dt), torch.randn(N, C, dtype=dt)
W = model[0].weight
op = EKFACLinearOperator(
    model,
    nn.MSELoss(reduction="sum"),
    [W],
    [(X, y)],
    fisher_type="empirical",
    kfac_approx="reduce",
    check_deterministic=False,
)
theirs = op @ torch.eye(op.shape[0], dtype=dt)

# Exact EF block of W (R = 1): per-datum gradients by torch.func.
others = {k: v.detach() for k, v in model.named_parameters() if k != "0.weight"}


def loss(w, x, t):
    f = functional_call(model, {**others, "0.weight": w}, (x[None],))
    return ((f - t[None]) ** 2).sum()


g = vmap(grad(loss), in_dims=(None, 0, 0))(W.detach(), X, y).reshape(N, -1)
B = g.T @ g

U_A = op._input_covariances_eigenvectors["0"]
U_G = op._gradient_covariances_eigenvectors["0"]
abar = X.mean(1)
A = abar.T @ abar / N
print("eigenvalues of A:", [f"{e:.1e}" for e in torch.linalg.eigvalsh(A).tolist()])


def ekfac(UG, UA):
    Q = torch.kron(UG, UA)
    return Q @ torch.diag(torch.diag(Q.T @ B @ Q)) @ Q.T


rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
print(f"E7 in curvlinops' basis: |theirs - EKFAC(theirs' basis)| = {rel(theirs, ekfac(U_G, U_A)):.2e}")
# Rotate the eigenvectors of A's zero eigenvalue (first D - N columns after eigh).
evals = torch.diag(U_A.T @ A @ U_A)
null = evals.abs() < 1e-12 * evals.abs().max()
rot, _ = torch.linalg.qr(torch.randn(int(null.sum()), int(null.sum()), dtype=dt))
U_A2 = U_A.clone()
U_A2[:, null] = U_A[:, null] @ rot
print(f"rotated basis still diagonalises A: {rel(U_A2.T @ A @ U_A2, torch.diag(evals)):.1e}")
print(f"EKFAC in the rotated basis vs curvlinops: relative difference {rel(ekfac(U_G, U_A2), theirs):.3e}")
