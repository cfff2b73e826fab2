"""BackPACK 1.7.1: KFRA fails or returns float32 factors for float64 models.

KFLR and KFAC work in float64. KFRA (LossHessianStrategy.SUM, batch-averaged
backpropagation) builds some of its matrices in torch's default dtype (float32), so on a
float64 model it either crashes, "RuntimeError: expected scalar type Double but found
Float" (two or more Linear layers), or silently returns float32 factors (one Linear
layer). With torch.set_default_dtype(torch.float64) it runs (and matches KFLR where
KFRA is exact, docs/adapters/backpack.md).
Only BackPACK and torch. Run: python backpack_kfra_float64.py
"""

import warnings

import torch
from backpack import backpack, extend
from backpack.extensions import KFLR, KFRA
from torch import nn

warnings.filterwarnings("ignore", message="Full backward hook")
torch.manual_seed(0)
X, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)


def factors(model, ext):
    model = extend(model.double())
    loss = extend(nn.MSELoss())(model(X), y)
    with backpack(ext):
        loss.backward()
    return getattr(model[0].weight, ext.savefield)


for label, layers in (
    ("Linear", [nn.Linear(5, 3)]),
    ("Linear-Linear", [nn.Linear(5, 4), nn.Linear(4, 3)]),
):
    torch.manual_seed(1)
    model = nn.Sequential(*layers)
    for ext in (KFLR(), KFRA()):
        try:
            f = factors(model, ext)
            print(f"{label} {type(ext).__name__}: factor dtypes {[t.dtype for t in f]}")
        except RuntimeError as error:
            print(f"{label} {type(ext).__name__}: RuntimeError: {error}")
torch.set_default_dtype(torch.float64)
torch.manual_seed(1)
model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
kflr = torch.kron(*[t.contiguous() for t in factors(model, KFLR())])
kfra = torch.kron(*[t.contiguous() for t in factors(model, KFRA())])
rel = ((kfra - kflr).norm() / kflr.norm()).item()
print(f"default dtype float64, Linear-Linear: KFRA vs KFLR (exact here) {rel:.1e}")
