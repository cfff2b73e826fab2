"""BackPACK 1.7.1: second-order extensions crash on in-place activations.

extend() installs full backward hooks; nn.ReLU(inplace=True) then modifies the view
returned by the hook's BackwardHookFunction and autograd raises "RuntimeError: Output 0
of BackwardHookFunction is a view and is being modified inplace". The same network with
nn.ReLU() works. (A limitation: BackPACK does not support in-place operations, like
torch's own full backward hooks; it fails loudly, not silently.) laplace-torch's
BackPACK backend inherits it.
Only BackPACK and torch. Run: python backpack_inplace_relu.py
"""

import warnings

import torch
from backpack import backpack, extend
from backpack.extensions import KFLR
from torch import nn

warnings.filterwarnings("ignore", message="Full backward hook")
torch.manual_seed(0)
X, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
for inplace in (False, True):
    torch.manual_seed(1)
    model = extend(
        nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=inplace), nn.Linear(4, 3)).double()
    )
    try:
        with backpack(KFLR()):
            loss = extend(nn.MSELoss())(model(X), y)
            loss.backward()
        print(f"ReLU(inplace={inplace}): KFLR computed, G {tuple(model[0].weight.kflr[0].shape)}")
    except RuntimeError as error:
        print(f"ReLU(inplace={inplace}): RuntimeError: {str(error)[:80]}...")
