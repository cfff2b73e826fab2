"""Finding L1: laplace-torch's regression EF is twice the EF of its own likelihood.

laplace-torch documents its regression likelihood as N(f, 1), reached from MSELoss with
``factor = 1/2`` (laplace/curvature/curvature.py, CurvatureInterface docstring). The
per-datum gradient of -log N(y | f, 1) is (f - y), so its empirical Fisher is
Σ_n J_nᵀ (f_n - y_n)(f_n - y_n)ᵀ J_n = (1/4)·EF(MSELoss(reduction="sum")).
KronLaplace with the EF backends (CurvlinopsEF, AsdlEF) returns
(1/2)·EF(MSELoss(sum)), twice that: the factor 1/2 is applied linearly to a quantity
that is quadratic in the loss scale (AsdlInterface.kron even calls 0.5 the "correct
scaling").

With one datum EF-KFAC equals the EF block exactly (catalogue claim E1), so the comparison
below is exact.

Run: python examples/findings/laplace_regression_ef_scale.py
"""

import torch
from laplace import KronLaplace
from laplace.curvature import AsdlEF, CurvlinopsEF
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
X, Y = torch.randn(1, 5), torch.randn(1, 3)
W = model[2].weight

# EF of -log N(y | f, 1) for the last layer's weight (one datum).
nll = 0.5 * ((model(X) - Y) ** 2).sum()
(g,) = torch.autograd.grad(nll, W)
ef_likelihood = torch.outer(g.flatten(), g.flatten())

for backend in (CurvlinopsEF, AsdlEF):
    lap = KronLaplace(model, "regression", backend=backend)
    lap.fit(DataLoader(TensorDataset(X, Y), batch_size=1))
    index = [i for i, p in enumerate(lap.params) if p is W][0]
    G, A = lap.H_facs.kfacs[index]
    block = torch.kron(G, A)
    ratio = block.norm() / ef_likelihood.norm()
    err = (block - 2 * ef_likelihood).norm() / (2 * ef_likelihood).norm()
    print(
        f"{backend.__name__}: |Laplace EF| / |EF of N(f,1)| = {ratio:.6f} "
        f"(expected 1); |Laplace EF - 2*EF| / |2*EF| = {err:.2e}"
    )
