"""singd 0.0.5: gradient accumulation sums per-micro-batch *averages* of the input factor.

Before the first step SINGD's accumulators hold the Kronecker factors (K = C = I):
H_K = (1/B) Σ ã ãᵀ and H_C = c Σ g gᵀ per backward pass, *summed* over the passes of
a step (singd/optim/optimizer.py, _accumulate_H_terms; c = B for
loss_average="batch"). Following the README's gradient accumulation (PyTorch's
recipe, micro-batch mean losses scaled by B_b / N, as in singd's
test_gradient_accumulation.py) the product H_C ⊗ H_K equals the one-batch value only
for equal micro-batches; with unequal ones it depends on the split. With
loss_average=None (sum) it is k times too large for k micro-batches: singd's own test
skips that case ("Need to fix https://github.com/f-dangel/singd/issues/43 first").
Run: python singd_gradient_accumulation.py
"""

import torch
from torch import nn

from singd.optim.optimizer import SINGD

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))


def kfac_block(sizes, reduction):
    net = __import__("copy").deepcopy(model)
    opt = SINGD(net, loss_average="batch" if reduction == "mean" else None, T=1)
    loss_func = nn.CrossEntropyLoss(reduction=reduction)
    for Xb, yb in zip(X.split(sizes), y.split(sizes)):
        loss = loss_func(net(Xb), yb)
        if reduction == "mean":
            loss = loss * len(Xb) / len(X)  # PyTorch's gradient-accumulation recipe
        loss.backward()
    state = opt.state_dict()
    H_K, H_C = state["H_Ks"]["0"].to_dense(), state["H_Cs"]["0"].to_dense()
    return torch.kron(H_C, H_K)


for reduction, sizes in (("mean", [3, 3]), ("mean", [4, 2]), ("mean", [5, 1]), ("sum", [3, 3])):
    one, acc = kfac_block([6], reduction), kfac_block(sizes, reduction)
    ratio = (acc.flatten() @ one.flatten() / (one.flatten() @ one.flatten())).item()
    err = ((acc - one).norm() / one.norm()).item()
    print(f"{reduction:4s} micro-batches {sizes}: vs one batch of 6: relative error {err:.3e}, "
          f"best scalar {ratio:.4f}")
