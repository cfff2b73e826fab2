"""Finding L3: KronLaplace's BackPACK backend inherits BackPACK's Conv2d scale (B1).

A Conv2d whose output is the per-pixel prediction with MSE: KFAC-expand is exact here,
and KronLaplace's curvlinops backend reproduces the exact GGN block (times
laplace's documented factor 1/2). The BackPACK backend's weight block is
H_out·W_out = 16 times larger; the bias block agrees.

Run: python examples/findings/laplace_backpack_conv2d.py
"""

import torch
from laplace import KronLaplace
from laplace.curvature import BackPackGGN, CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
X, Y = torch.randn(6, 2, 4, 4), torch.randn(6, 48)
loader = DataLoader(TensorDataset(X, Y), batch_size=3)
blocks = {}
for backend in (CurvlinopsGGN, BackPackGGN):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten())
    lap = KronLaplace(model, "regression", backend=backend)
    lap.fit(loader)
    (G, A), (G_bias,) = lap.H_facs.kfacs
    blocks[backend.__name__] = (torch.kron(G, A), G_bias)
(w_cl, b_cl), (w_bp, b_bp) = blocks["CurvlinopsGGN"], blocks["BackPackGGN"]
print(f"weight |BackPack| / |Curvlinops| = {w_bp.norm() / w_cl.norm():.6f}")
print(
    f"weight |BackPack/16 - Curvlinops| / |Curvlinops| = "
    f"{(w_bp / 16 - w_cl).norm() / w_cl.norm():.2e}"
)
print(
    f"bias   |BackPack - Curvlinops| / |Curvlinops| = "
    f"{(b_bp - b_cl).norm() / b_cl.norm():.2e}"
)
