"""modelgeometry 0.1.1: with a mean loss_fn, kfac_factors' G carries 1/B² per batch.

kfac_factors (modelgeometry/kfac.py) forms G = E_rows[g gᵀ] from the output
gradients of ONE backward pass of loss_fn on the batch; its docstring says these keep
"their individual per-token values". With the mean cross-entropy that the library's
tests and demo pass (and that diagonal_fisher, which differentiates one sample at a
time, expects), every row is scaled by 1/B. On B identical data K-FAC is exact, so
diag(G ⊗ A) must equal diagonal_fisher with the same loss_fn; it is 1/B² of it. A
summed loss_fn gives agreement.
Run: python modelgeometry_mean_loss_scale.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from modelgeometry import ModelAdapter, diagonal_fisher, kfac_factors

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 3, bias=False))
B = 8
X, y = torch.randn(1, 4).repeat(B, 1), torch.tensor([1] * B)


class OneLinear(ModelAdapter):
    def qkv_modules(self, layer_idx):
        return {"qkv": self._layers[layer_idx]}

    def qkv_weights(self, layer_idx):
        raise NotImplementedError


def mean_ce(pred, target):
    return F.cross_entropy(pred, target)  # as in modelgeometry's tests


def sum_ce(pred, target):
    return F.cross_entropy(pred, target, reduction="sum")


for name, loss_fn in (("mean", mean_ce), ("sum", sum_ce)):
    adapter = OneLinear(model, [model[0]], attn_name="")
    f = kfac_factors(model, [(X, y)], n_samples=B, loss_fn=loss_fn, adapter=adapter)["0.weight"]
    diag_kfac = torch.kron(f["G"], f["A"]).diagonal()
    diag_ef = diagonal_fisher(model, [(X, y)], n_samples=B, loss_fn=loss_fn)["0.weight"].flatten()
    print(f"loss_fn {name}: diag(K-FAC) / diagonal_fisher = {(diag_kfac / diag_ef).mean():.6f} "
          f"(1/B^2 = {1 / B**2:.6f})")
