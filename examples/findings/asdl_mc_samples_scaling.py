"""ASDL 0.1a5: fisher_mc with n_mc_samples=M returns ~1/M of the Fisher.

FisherMCCrossEntropy/FisherMCMSE (asdl/fisher.py) divide each sample's loss by M
and then form g gᵀ per sample, so B carries 1/M² per sample instead of 1/M.
Compare against the exact (type-2) Kronecker factor B of the same model.
Run: python asdl_mc_samples_scaling.py
"""

import asdl
import torch
from torch import nn

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
X, y = torch.randn(6, 5), torch.randint(0, 3, (6,))


def kron_B(fisher_type, M=1):
    cfg = asdl.FisherConfig(
        fisher_type=fisher_type,
        fisher_shapes=[asdl.SHAPE_KRON],
        loss_type=asdl.LOSS_CROSS_ENTROPY,
        n_mc_samples=M,
        data_size=len(X),
    )
    fm = asdl.get_fisher_maker(model, cfg)
    dummy = fm.setup_model_call(model, X)
    fm.setup_loss_call(nn.CrossEntropyLoss(), dummy, y)
    fm.forward_and_backward()
    return model[2].fisher.kron.B.clone()


B_exact = kron_B("fisher_exact")
for M in (1, 10, 1000):
    torch.manual_seed(1)
    B_mc = kron_B("fisher_mc", M)
    ratio = (B_mc.trace() / B_exact.trace()).item()
    print(f"M={M:5d}: trace(B_mc)/trace(B_exact) = {ratio:.4f}  (expected ~1)")
