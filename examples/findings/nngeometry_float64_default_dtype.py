"""nngeometry 0.4: float64 models need torch's default dtype to be float64.

1. FIM(variant='classif_logits') builds its triangular matrix with the default dtype
   (metrics.py, function_fim: torch.ones(...) without dtype) and crashes on a
   float64 model: "expected m1 and m2 to have the same dtype".
2. The failed call leaves its hooks on the model (no try/finally around the hooks in
   backend/torch_hooks/torch_hooks.py), so the next Fisher on the same model fails
   with "AttributeError: ... no attribute 'i_output'".
3. PMatKFAC.to_torch allocates the dense matrix with the default dtype
   (object/pspace.py: torch.zeros((s, s), device=...)), silently rounding a float64
   KFAC to float32.
1 and 2 are fixed on nngeometry main (commit b602bf2, PR #128), unreleased; 3 is not.
Run: python nngeometry_float64_default_dtype.py
"""

import torch
from nngeometry.metrics import FIM
from nngeometry.object import PMatKFAC
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_default_dtype(torch.float32)  # PyTorch's default
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
loader = DataLoader(TensorDataset(X, y), batch_size=6)
try:
    FIM(model, loader, PMatKFAC, variant="classif_logits")
    print("classif_logits: no error")
except RuntimeError as err:
    print("classif_logits on a float64 model:", err)

Xr = torch.randn(6, 5, dtype=torch.float64)
loader = DataLoader(TensorDataset(Xr, torch.randn(6, 3, dtype=torch.float64)), 6)
try:
    FIM(model, loader, PMatKFAC, variant="regression")
    print("second call on the same model: no error")
except AttributeError as err:
    print("second call on the same model (hooks left behind):", err)

model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
loader = DataLoader(TensorDataset(Xr, torch.randn(6, 3, dtype=torch.float64)), 6)
pmat = FIM(model, loader, PMatKFAC, variant="regression")
a, g = pmat.data["2"]
print("factor dtype:", a.dtype, "| to_torch() dtype:", pmat.to_torch().dtype)
dense64 = torch.kron(g, a)
dense = pmat.to_torch()[-15:, -15:].double()  # last layer's block
err = (dense.norm() - dense64.norm()).abs() / dense64.norm()
print(f"| ||to_torch block|| - ||kron(g, a)|| | / ||kron(g, a)|| = {err:.2e}")
