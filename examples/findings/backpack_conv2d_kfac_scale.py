"""Finding B1 (known): BackPACK's Conv2d KFLR/KFAC weight block is G_reduce ⊗ S·A_expand.

Setting where KFAC-expand is exact (catalogue claim E5): a Conv2d whose output is the
per-pixel prediction, MSELoss. BackPACK 1.7.1 builds the gradient factor from the
spatially *summed* output gradients (the bias GGN) but the input factor from the
*sum* (not the mean) of the unfolded patch outer products, so the weight block is
S = H_out·W_out times the exact GGN block. The bias block is exact. Source:
backpack/extensions/secondorder/hbp/convnd.py: the HBPConvNd.weight and
_factor_from_sqrt docstrings document the factor |T| (BackPACK PR #290). Here the
output is per-pixel, so G_reduce = G_expand and the block is S × KFAC-expand.

Run: python examples/findings/backpack_conv2d_kfac_scale.py
"""

import copy
import warnings

import torch
from backpack import backpack, extend
from backpack.extensions import KFLR
from torch import nn
from torch.func import functional_call, jacrev

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
N, C_in, C_out, H, W = 6, 2, 3, 4, 4
model = nn.Sequential(nn.Conv2d(C_in, C_out, 3, padding=1), nn.Flatten())
X = torch.randn(N, C_in, H, W)
Y = torch.randn(N, C_out * H * W)
loss_func = nn.MSELoss(reduction="sum")

# Exact GGN block of the conv weight: Σ_n J_nᵀ (2·I) J_n.
params = {k: v.detach() for k, v in model.named_parameters()}


def f(w):
    """Model output as a function of the conv weight."""
    return functional_call(model, {**params, "0.weight": w}, (X,))


J = jacrev(f)(params["0.weight"]).reshape(N, C_out * H * W, -1)
ggn = 2 * torch.einsum("nvp,nvq->pq", J, J)

J_b = jacrev(lambda b: functional_call(model, {**params, "0.bias": b}, (X,)))(
    params["0.bias"]
).reshape(N, C_out * H * W, -1)
ggn_b = 2 * torch.einsum("nvp,nvq->pq", J_b, J_b)

# BackPACK's KFLR factors [G, A], block G ⊗ A (rvec); bias factor [G_bias].
bp_model, bp_loss = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_func))
with backpack(KFLR()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bp_loss(bp_model(X), Y).backward()
G, A = bp_model[0].weight.kflr
(G_bias,) = bp_model[0].bias.kflr
block = torch.kron(G, A)

S = H * W  # output spatial size (padding=1 keeps 4x4)
print(f"weight: |BackPACK - GGN| / |GGN|     = {(block - ggn).norm() / ggn.norm():.3e}")
print(f"weight: |BackPACK| / |GGN|           = {block.norm() / ggn.norm():.6f}")
err_scaled = (block / S - ggn).norm() / ggn.norm()
err_bias = (G_bias - ggn_b).norm() / ggn_b.norm()
print(f"weight: |BackPACK/S - GGN| / |GGN|   = {err_scaled:.3e}")
print(f"bias:   |BackPACK - GGN| / |GGN|     = {err_bias:.3e}")
