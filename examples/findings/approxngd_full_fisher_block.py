"""approxngd 0.1.1: FisherBlock.full_fisher_block() raises AttributeError.

FisherBlock.full_fisher_block (approxngd/layers/fisher_block.py) returns
`self._renorm_coeff * kronecker_product(A, G)`, but blocks define the property
`renorm_coeff`, not `_renorm_coeff`. (Its `kronecker_product` also reshapes the second
factor with the first one's shape, valid only for equal shapes.)
Run: python approxngd_full_fisher_block.py
"""

import torch
from torch import nn

from approxngd import KFAC

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 2))
kfac = KFAC(model, learning_rate=0.0, damping=1e-3, cov_ema_decay=1.0, update_cov_manually=True)
with kfac.track_forward():
    loss = model(torch.randn(5, 3)).pow(2).mean()
with kfac.track_backward():
    loss.backward()
kfac.update_cov()
(block,) = [b for b in kfac.blocks if not b.is_static]
try:
    block.full_fisher_block()
    print("no error")
except AttributeError as error:
    print(f"AttributeError: {error}")
