"""modelgeometry 0.1.1: kfac_factors fails on a Linear layer followed by an in-place ReLU.

HookRegistry.capture_grad_output uses register_full_backward_hook, which PyTorch does
not allow when the module's output is modified in place (here by
nn.ReLU(inplace=True)); the forward pass raises. The same network with nn.ReLU()
works.
Run: python modelgeometry_inplace_relu.py
"""

import torch
from torch import nn

from modelgeometry import ModelAdapter, kfac_factors

torch.manual_seed(0)


class Linears(ModelAdapter):
    def qkv_modules(self, layer_idx):
        return {"qkv": self._layers[layer_idx]}

    def qkv_weights(self, layer_idx):
        raise NotImplementedError


for inplace in (False, True):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 2))
    X, y = torch.randn(6, 4), torch.randn(6, 2)
    try:
        kfac_factors(model, [(X, y)], 6, nn.MSELoss(reduction="sum"), Linears(model, [model[0]], ""))
        print(f"ReLU(inplace={inplace}): ok")
    except RuntimeError as error:
        print(f"ReLU(inplace={inplace}): RuntimeError: {str(error)[:110]}...")
