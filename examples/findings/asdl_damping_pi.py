"""ASDL 0.1a5: K-FAC damping is the π-heuristic, not the documented K + δI.

Documented (PreconditioningConfig docstring, asdl/precondition/prec_grad_maker.py):
"damping: The damping value. An identity matrix multiplied by the damping value will be
added to the curvature matrix before taking its inverse". For the Kronecker shape,
Kron.update_inv (asdl/symmatrix.py) instead damps each factor by Martens & Grosse's
π-heuristic: A + max(√δ·π, 1e-7) I and B + max(√δ/π, 1e-7) I with
π = sqrt((tr A / dim A) / (tr B / dim B)). This preconditions a gradient with
KfacGradientMaker and compares it with both.
Run: python asdl_damping_pi.py
"""

import math

import asdl
import torch
from torch import nn
from torch.nn import functional as F

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False)
)
X, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
delta = 0.1

# ASDL's Kronecker factors of the last layer (the Fisher the preconditioner inverts).
fisher_config = asdl.FisherConfig(
    fisher_type="fisher_exact",
    fisher_shapes=[asdl.SHAPE_KRON],
    loss_type=asdl.LOSS_CROSS_ENTROPY,
    data_size=len(X),
)
fm = asdl.get_fisher_maker(model, fisher_config)
dummy = fm.setup_model_call(model, X)
fm.setup_loss_call(F.cross_entropy, dummy, y, reduction="sum")
fm.forward_and_backward()
A, B = model[2].fisher.kron.A.clone(), model[2].fisher.kron.B.clone()
del model[2].fisher, model[0].fisher

# The gradient of the mean loss, and KfacGradientMaker's preconditioned gradient.
model.zero_grad()
F.cross_entropy(model(X), y).backward()
g = model[2].weight.grad.clone().flatten()
model.zero_grad()
config = asdl.PreconditioningConfig(data_size=len(X), damping=delta)
gm = asdl.KfacGradientMaker(
    model, config, fisher_type="fisher_exact", loss_type=asdl.LOSS_CROSS_ENTROPY
)
dummy = gm.setup_model_call(model, X)
gm.setup_loss_call(F.cross_entropy, dummy, y)
gm.forward_and_backward()
value = model[2].weight.grad.flatten()

K = torch.kron(B, A)
documented = torch.linalg.solve(K + delta * torch.eye(len(K)), g)
pi = math.sqrt((A.trace() / len(A)) / (B.trace() / len(B)))
root = math.sqrt(delta)
heuristic = torch.linalg.solve(
    torch.kron(B + root / pi * torch.eye(len(B)), A + root * pi * torch.eye(len(A))), g
)
for label, ref in (("documented K + δI", documented), ("π-heuristic", heuristic)):
    error = (torch.linalg.norm(value - ref) / torch.linalg.norm(ref)).item()
    print(f"preconditioned gradient vs {label}: relative error {error:.2e}")
