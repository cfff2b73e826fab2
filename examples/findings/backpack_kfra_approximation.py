"""Finding B4 (documented convention): KFRA is a further approximation of KFLR.

KFRA (Botev et al. 2017) backpropagates the batch-summed loss Hessian and averages
over the batch after each layer, E[Jᵀ E[H] J] instead of E[Jᵀ H J]. It equals KFLR
(type-2 KFAC) only where at most one datum-dependent Jacobian lies between the layer
and a datum-independent loss Hessian (e.g. any layer of a deep linear net with MSE, the
last two layers of a tanh MLP with MSE). This script shows the gap on the first layer of
a 5-4-4-3 tanh MLP (MSE) and of a 5-4-3 tanh MLP (cross-entropy).

Run: python examples/findings/backpack_kfra_approximation.py
"""

import copy

import torch
from backpack import backpack, extend
from backpack.extensions import KFLR, KFRA
from torch import nn

torch.set_default_dtype(torch.float64)


def factors(model, loss_func, X, y, ext, field):
    """Return BackPACK's block G ⊗ A of layer 0 for extension ``ext``."""
    model, loss_func = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_func))
    with backpack(ext):
        loss_func(model(X), y).backward()
    G, A = getattr(model[0].weight, field)
    return torch.kron(G.contiguous(), A)


torch.manual_seed(0)
X = torch.randn(6, 5)
cases = {
    "MSE, 5-4-4-3": (
        nn.Sequential(
            nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)
        ),
        nn.MSELoss(),
        torch.randn(6, 3),
    ),
    "CE, 5-4-3": (
        nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
        nn.CrossEntropyLoss(),
        torch.randint(0, 3, (6,)),
    ),
}
for name, (model, loss_func, y) in cases.items():
    kflr = factors(model, loss_func, X, y, KFLR(), "kflr")
    kfra = factors(model, loss_func, X, y, KFRA(), "kfra")
    err = (kfra - kflr).norm() / kflr.norm()
    print(f"{name}: |KFRA - KFLR| / |KFLR| on layer 0 = {err:.3e}")
