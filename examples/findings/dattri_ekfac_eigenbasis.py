"""dattri 0.3.0: EK-FAC projects onto the rows of the eigenvector matrices, not the columns.

dattri/func/fisher.py, estimate_eigenvector: q_a, q_s = torch.linalg.eigh(cov)[1]
(eigenvectors are the COLUMNS); _update_lambda and IFAttributorEKFAC.transform_test_rep
then use q_s @ dW @ q_a.T, i.e. project on the ROWS. The eigenvalues are therefore
re-fitted in the wrong basis. With a single datum EK-FAC must equal the empirical
Fisher exactly (the per-example gradient g ⊗ a is an eigenvector of G ⊗ A); dattri's
matrix does not, and transposing the eigenvector matrices recovers it.
Run: python dattri_ekfac_eigenbasis.py
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.influence_function import IFAttributorEKFAC
from dattri.task import AttributionTask

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
model = nn.Sequential(nn.Linear(4, 3, bias=False))
X, y = torch.randn(1, 4), torch.randint(0, 3, (1,))


def loss_func(params, data):
    x, t = data
    out = torch.func.functional_call(model, params, (x,))
    return nn.functional.cross_entropy(out, t, reduction="sum") / len(x)


task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
attributor = IFAttributorEKFAC(task=task, damping=0.0)
attributor.cache(DataLoader(TensorDataset(X, y), batch_size=1))
q_a, q_s = attributor.cached_q["0"]
lam = attributor.cached_lambdas["0"].reshape(-1)

# exact empirical Fisher of the one datum (rvec of the weight gradient)
W = model[0].weight.detach().requires_grad_()
(g,) = torch.autograd.grad(nn.functional.cross_entropy(X @ W.T, y, reduction="sum"), W)
EF = torch.outer(g.flatten(), g.flatten())

P = torch.kron(q_s, q_a)  # what transform_test_rep applies: vec(q_s V q_a^T) = P vec(V)
F_dattri = P.T @ torch.diag(lam) @ P
Q = torch.kron(q_s, q_a)  # eigh's columns: the Kronecker eigenbasis
F_ekfac = Q @ torch.diag(torch.diag(Q.T @ EF @ Q)) @ Q.T
rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
print(f"dattri EK-FAC vs exact EF (one datum):        {rel(F_dattri, EF):.3e}")
print(f"EK-FAC in eigh's column basis vs exact EF:    {rel(F_ekfac, EF):.3e}")
print(f"dattri lambda vs diag(P EF P^T), rows basis:  {rel(lam, torch.diag(P @ EF @ P.T)):.3e}")
