"""ASDL 0.1a5: FisherConfig.scale multiplies both Kron factors.

Documented (NaturalGradientMaker docstring): "scale: The scale of Fisher information
matrix". OperationContext.set_cov_scale(scale / data_size) multiplies A *and* B
(asdl/operations/operation.py), so the weight block B ⊗ A scales by scale² while the
bias block B scales by scale (and both by 1/data_size² vs 1/data_size).
Run: python asdl_scale_squared.py
"""

import asdl
import torch
from torch import nn

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
X, y = torch.randn(6, 5), torch.randint(0, 3, (6,))


def factors(scale):
    cfg = asdl.FisherConfig(
        fisher_type="fisher_exact",
        fisher_shapes=[asdl.SHAPE_KRON],
        loss_type=asdl.LOSS_CROSS_ENTROPY,
        data_size=len(X),
        scale=scale,
    )
    fm = asdl.get_fisher_maker(model, cfg)
    dummy = fm.setup_model_call(model, X)
    fm.setup_loss_call(nn.CrossEntropyLoss(), dummy, y)
    fm.forward_and_backward()
    k = model[2].fisher.kron
    return k.A.clone(), k.B.clone()


A1, B1 = factors(1.0)
A3, B3 = factors(3.0)
w = (torch.kron(B3, A3).norm() / torch.kron(B1, A1).norm()).item()
b = (B3.norm() / B1.norm()).item()
print(f"scale=3: weight block ratio {w:.4f} (documented 3), bias block ratio {b:.4f}")
