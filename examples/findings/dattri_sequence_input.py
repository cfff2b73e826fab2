"""dattri 0.3.0: EK-FAC crashes on sequence inputs that its docstrings describe.

IFAttributorEKFAC's loss documentation speaks of inputs of shape (batch_size, t)
("t is the number of steps, or sequence length of the input data"), but
dattri/func/fisher.py, _update_covariance, only defines `a_prev` when the layer
input is 2-D: a Linear layer applied to (N, S, D) raises UnboundLocalError.
Run: python dattri_sequence_input.py
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm.influence_function import IFAttributorEKFAC
from dattri.task import AttributionTask

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 2))  # applied to every one of S = 3 positions
X, y = torch.randn(5, 3, 4), torch.randn(5, 3, 2)


def loss_func(params, data):
    x, t = data
    out = torch.func.functional_call(model, params, (x,))
    return nn.functional.mse_loss(out, t, reduction="sum") / len(x)


task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
attributor = IFAttributorEKFAC(task=task)
try:
    attributor.cache(DataLoader(TensorDataset(X, y), batch_size=5))
    print("no error")
except UnboundLocalError as error:
    print(f"UnboundLocalError: {error}")
