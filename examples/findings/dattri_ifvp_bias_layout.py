"""dattri 0.3.0: the EK-FAC IFVP mixes up weight and bias entries of biased layers.

IFAttributorEKFAC.transform_test_rep concatenates [W.flatten(), b] and reshapes the
result to (out, in + 1), as if it were the row-major flattening of [W | b] (bias as
last column); the product is flattened back the same way. For out > 1 this assigns
bias entries to weight columns and vice versa. Reference: the damped inverse of the
library's own EK-FAC matrix (from cached_q, cached_lambdas), applied in the right
parameter order. A bias-free layer is the control.
Run: python dattri_ifvp_bias_layout.py
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.influence_function import IFAttributorEKFAC
from dattri.task import AttributionTask

torch.set_default_dtype(torch.float64)
DAMPING = 0.1


def ifvp_error(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=bias))
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def loss_func(params, data):
        x, t = data
        out = torch.func.functional_call(model, params, (x,))
        return nn.functional.cross_entropy(out, t, reduction="sum") / len(x)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorEKFAC(task=task, damping=DAMPING)
    attributor.cache(DataLoader(TensorDataset(X, y), batch_size=4))
    P_count = sum(p.numel() for p in model.parameters())
    M_dattri = attributor.transform_test_rep(0, torch.eye(P_count))

    q_a, q_s = attributor.cached_q["0"]
    lam = attributor.cached_lambdas["0"].reshape(-1)
    P = torch.kron(q_s, q_a)
    inv_joint = P.T @ torch.diag(1 / (lam + DAMPING)) @ P  # over rvec([W | b])
    if bias:  # permute rvec([W | b]) to PyTorch's parameter order [rvec(W), b]
        idx = torch.arange(3 * 5).reshape(3, 5)
        perm = torch.cat([idx[:, :4].flatten(), idx[:, 4]])
        inv_joint = inv_joint[perm][:, perm]
    return ((M_dattri - inv_joint).norm() / inv_joint.norm()).item()


print(f"bias=True : IFVP vs damped inverse of dattri's own EK-FAC: {ifvp_error(True):.3e}")
print(f"bias=False: IFVP vs damped inverse of dattri's own EK-FAC: {ifvp_error(False):.3e}")
