"""curvlinops 3.0.1: the empirical Fisher treats each output position as a datum.

For outputs of shape (N, S, C) with a loss term per position, the EF of the summed
loss is R Σ_n ∇ℓ_n ∇ℓ_nᵀ with ℓ_n = Σ_s ℓ_{n,s} (one gradient per datum).
EFLinearOperator (and EF-KFAC, which uses the same per-row gradients) flattens the
output to (N·S, C) and forms R Σ_{n,s} ∇ℓ_{n,s} ∇ℓ_{n,s}ᵀ, dropping the cross-position
terms. Both are "empirical Fishers"; they coincide for 2-D outputs (S = 1).
Only curvlinops, torch and torch.func. Run: python curvlinops_ef_multidim_output.py
"""

import torch
from curvlinops import EFLinearOperator
from torch import nn
from torch.func import functional_call, jacrev

torch.manual_seed(0)
dt = torch.float64
N, S, D, C = 4, 3, 5, 2
model = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).to(dt)
X, y = torch.randn(N, S, D, dtype=dt), torch.randn(N, S, C, dtype=dt)
loss_func = nn.MSELoss(reduction="sum")  # R = 1
params = dict(model.named_parameters())


def per_term_losses(p):
    """ℓ_{n,s} = ||f(x_{n,s}) - y_{n,s}||², shape (N, S)."""
    return ((functional_call(model, p, (X,)) - y) ** 2).sum(-1)


J = jacrev(per_term_losses)(params)
J = torch.cat([J[k].reshape(N, S, -1) for k in params], -1)  # (N, S, P)
per_datum = J.sum(1)  # ∇ℓ_n
ef_datum = per_datum.T @ per_datum
ef_position = torch.einsum("nsp,nsq->pq", J, J)

op = EFLinearOperator(
    model, loss_func, list(params.values()), [(X, y)], check_deterministic=False
)
theirs = op @ torch.eye(op.shape[0], dtype=dt)
rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
print(f"curvlinops EF vs per-datum EF (Σ_n ∇ℓ_n ∇ℓ_nᵀ):      {rel(theirs, ef_datum):.3e}")
print(f"curvlinops EF vs per-position EF (Σ_n,s ∇ℓ_ns ∇ℓ_nsᵀ): {rel(theirs, ef_position):.3e}")
