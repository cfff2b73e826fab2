"""dattri 0.3.0: with an in-place activation after a Linear layer, EK-FAC is silently wrong.

The forward hook keeps the layer's output tensor and reads `output.grad`
(outputs.retain_grad() in IFAttributorEKFAC.cache). An in-place activation
(nn.ReLU(inplace=True)) overwrites that tensor, so its .grad is the gradient with
respect to the activation's output, not the layer's: the ReLU mask is missing from
the gradient covariance. The same network with nn.ReLU() is the reference.
Run: python dattri_inplace_activation.py
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.influence_function import IFAttributorEKFAC
from dattri.task import AttributionTask

torch.set_default_dtype(torch.float64)


def ekfac_matrix(inplace):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 2))
    X, y = torch.randn(16, 4), torch.randn(16, 2)

    def loss_func(params, data):
        x, t = data
        out = torch.func.functional_call(model, params, (x,))
        return nn.functional.mse_loss(out, t, reduction="sum") / len(x)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorEKFAC(task=task, module_name=["0"])
    attributor.cache(DataLoader(TensorDataset(X, y), batch_size=8))
    q_a, q_s = attributor.cached_q["0"]
    lam = attributor.cached_lambdas["0"].reshape(-1)
    P = torch.kron(q_s, q_a)
    return P.T @ torch.diag(lam) @ P


ref, inplace = ekfac_matrix(False), ekfac_matrix(True)
print(f"ReLU(inplace=True) vs ReLU(): relative difference {((inplace - ref).norm() / ref.norm()).item():.3e}")
