"""modelgeometry 0.1.1: with weight sharing, G is averaged over tokens: expand / S.

kfac_factors flattens every leading dimension into rows and divides both sums by the
number of rows (N·S for a Linear layer applied to S tokens), so
G = (1/(N·S)) Σ_{n,s} g gᵀ, where KFAC-expand of the per-example-averaged empirical
Fisher has G = (1/N) Σ_{n,s} g gᵀ (A = (1/(N·S)) Σ a aᵀ in both). The module
docstring treats tokens as the unit ("individual per-token values").
Reference: expand factors built by hand (summed loss, per-datum gradients).
Run: python modelgeometry_token_rows.py
"""

import torch
from torch import nn

from modelgeometry import ModelAdapter, kfac_factors

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
N, S = 5, 3
model = nn.Sequential(nn.Linear(4, 2))
X, y = torch.randn(N, S, 4), torch.randn(N, S, 2)
loss_fn = nn.MSELoss(reduction="sum")


class OneLinear(ModelAdapter):
    def qkv_modules(self, layer_idx):
        return {"qkv": self._layers[layer_idx]}

    def qkv_weights(self, layer_idx):
        raise NotImplementedError


f = kfac_factors(model, [(X, y)], N, loss_fn, adapter=OneLinear(model, [model[0]], ""))["0.weight"]
a = torch.cat([X.reshape(-1, 4), torch.ones(N * S, 1)], 1)
z = model(X)
(g,) = torch.autograd.grad(loss_fn(z, y), z)
g = g.reshape(-1, 2)
A_ref, G_ref = a.T @ a / (N * S), g.T @ g / N
ratio = torch.kron(f["G"], f["A"]).norm() / torch.kron(G_ref, A_ref).norm()
print(f"S = {S}: modelgeometry K-FAC / KFAC-expand = {ratio:.6f} (1/S = {1 / S:.6f})")
