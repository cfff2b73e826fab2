"""BackPACK 1.7.1: second-order extensions crash on in-place activations.

extend() installs full backward hooks; nn.ReLU(inplace=True) then modifies the view
returned by the hook's BackwardHookFunction and autograd raises "RuntimeError: Output 0
of BackwardHookFunction is a view and is being modified inplace". The same network with
nn.ReLU() works. Finding B6, a documented limitation: BackPACK's ResNet example notes
that in-place operations are not compatible with full backward hooks, and its
converter, extend(model, use_converter=True), turns in-place modules into standard
ones ("inplace -> normal"); with it the in-place network gives the same KFLR factors.
laplace-torch's BackPACK backend calls extend(model) and inherits the limitation.
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
factors = {}
for inplace, use_converter in ((False, False), (True, False), (True, True)):
    torch.manual_seed(1)
    model = extend(
        nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=inplace), nn.Linear(4, 3)).double(),
        use_converter=use_converter,
    )
    label = f"ReLU(inplace={inplace}), use_converter={use_converter}"
    try:
        with backpack(KFLR()):
            loss = extend(nn.MSELoss())(model(X), y)
            loss.backward()
        factors[label] = [f.clone() for p in model.parameters() for f in p.kflr]
        print(f"{label}: KFLR computed, G {tuple(factors[label][0].shape)}")
    except RuntimeError as error:
        print(f"{label}: RuntimeError: {str(error)[:80]}...")
plain, converted = factors.values()
diff = max((a - b).abs().max().item() for a, b in zip(plain, converted))
print(f"converted in-place network vs ReLU(): max factor difference {diff:.1e}")
