"""ASDL 0.1a5: Linear layers with weight sharing are neither KFAC-expand nor reduce.

asdl/operations/linear.py flattens (N, S, D) inputs to (N·S, D) and forms
A = c Σ_{n,s} a aᵀ without dividing by S, while its Conv2d (conv.py, cov_kron_A)
divides A by the number of positions (KFAC-expand). The Linear weight block is S
times KFAC-expand (Eschenhagen et al. 2023); the bias block (B) agrees.
Reference: the expand factors built by hand, A = (1/(N·S)) Σ a aᵀ, G = R Σ g gᵀ.
Run: python asdl_linear_weight_sharing.py
"""

import asdl
import torch
from torch import nn

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
N, S = 4, 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 4)
        self.l2 = nn.Linear(4 * S, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)).flatten(1))


net = Net()
X, y = torch.randn(N, S, 5), torch.randn(N, 2)
cfg = asdl.FisherConfig(
    fisher_type="fisher_exact",
    fisher_shapes=[asdl.SHAPE_KRON],
    loss_type=asdl.LOSS_MSE,
    data_size=N,
)
fm = asdl.get_fisher_maker(net, cfg)
dummy = fm.setup_model_call(net, X)
fm.setup_loss_call(nn.MSELoss(), dummy, y)
fm.forward_and_backward()
A_asdl, B_asdl = net.l1.fisher.kron.A, net.l1.fisher.kron.B

# hand-made KFAC-expand for the same criterion (unit vectors e_i backpropagated)
a = X.reshape(N * S, 5)
z = net.l1(X)
out = net.l2(torch.tanh(z).flatten(1))
G = 0
for i in range(2):
    (g,) = torch.autograd.grad(out[:, i].sum(), z, retain_graph=True)
    g = g.reshape(N * S, 4)
    G = G + g.T @ g / N
A_expand = a.T @ a / (N * S)
ratio = torch.kron(B_asdl, A_asdl).norm() / torch.kron(G, A_expand).norm()
print(f"S={S}: ASDL weight block / KFAC-expand weight block = {ratio:.4f}")
print(f"bias block ratio = {(B_asdl.norm() / G.norm()):.4f}")
