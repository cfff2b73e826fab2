"""ASDL 0.1a5: MSE Fisher and FisherConfig.var.

Documented: "var: The variance of the Gaussian distribution used when
fisher_type='fisher_mc' and loss_type='mse'". The Fisher of N(f, var·I) is JᵀJ/var.
- fisher_exact + mse ignores var and always gives JᵀJ (unit variance, i.e. the GGN of
  ½‖f−y‖²: PyTorch's MSELoss has Hessian 2I, so the canonical block is 2·JᵀJ·R).
- fisher_mc + mse samples ỹ ~ N(f, var) with loss ½‖f−ỹ‖², so E[B] = var·JᵀJ:
  proportional to var instead of 1/var; exact and MC agree only at var = 1.
Run: python asdl_mse_var.py
"""

import asdl
import torch
from torch import nn

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
X, y = torch.randn(6, 5), torch.randn(6, 3)


def kron_B(fisher_type, var):
    cfg = asdl.FisherConfig(
        fisher_type=fisher_type,
        fisher_shapes=[asdl.SHAPE_KRON],
        loss_type=asdl.LOSS_MSE,
        data_size=len(X),
        var=var,
    )
    fm = asdl.get_fisher_maker(model, cfg)
    dummy = fm.setup_model_call(model, X)
    fm.setup_loss_call(nn.MSELoss(), dummy, y)
    fm.forward_and_backward()
    return model[2].fisher.kron.B.clone()


for var in (1.0, 0.5, 4.0):
    B_exact = kron_B("fisher_exact", var)
    torch.manual_seed(0)
    B_mc = sum(kron_B("fisher_mc", var) for _ in range(400)) / 400
    print(
        f"var={var}: trace exact {B_exact.trace():.3f}, trace MC(avg 400) "
        f"{B_mc.trace():.3f}, Gaussian Fisher would be {B_exact.trace() / var:.3f}"
    )
