"""approxngd 0.1.1: Conv2d input patches ignore the dilation.

ConvFisherBlock.extract_patches pads and calls x.unfold(dim, kernel_size, stride),
never using module.dilation: for a dilated convolution the patches (and their
number, renorm_coeff) are those of an undilated kernel. Reference: torch's
F.unfold with the layer's dilation, bias column appended, averaged over N·S rows.
Run: python approxngd_conv_dilation.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from approxngd import KFAC

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
conv = nn.Conv2d(2, 3, 3, padding=1, dilation=2)
model = nn.Sequential(conv, nn.Flatten())
X = torch.randn(4, 2, 6, 6)
kfac = KFAC(model, learning_rate=0.0, damping=1e-3, cov_ema_decay=1.0, update_cov_manually=True)
with kfac.track_forward():
    out = model(X)
with kfac.track_backward():
    out.pow(2).mean().backward()
kfac.update_cov()
(block,) = [b for b in kfac.blocks if not b.is_static]

patches = F.unfold(X, 3, dilation=2, padding=1).transpose(1, 2).reshape(-1, 18)
patches = torch.cat([patches, torch.ones(len(patches), 1)], 1)
A_ref = patches.T @ patches / len(patches)
A_lib = block.activation_covariance
S_true = conv(X).shape[2] * conv(X).shape[3]
print(f"output positions: {S_true}, approxngd renorm_coeff (patches per datum): {block.renorm_coeff}")
print(f"input covariance vs dilated patches: relative error {((A_lib - A_ref).norm() / A_ref.norm()).item():.3e}")
