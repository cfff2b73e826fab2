"""approxngd 0.1.1: Conv2d blocks lack the batch-size factor of Linear blocks (1/N²).

FullyConnectedFisherBlock.backward_hook multiplies the output gradient by the batch
size N (undoing the mean loss's 1/N, as tensorflow/kfac does);
ConvFisherBlock.backward_hook does not (the factor is commented out: "in the original
code they scale by the batch_size, I don't quite understand this"). A Conv2d whose
kernel covers the whole input (one output position, S = renorm_coeff = 1) computes
the same function as a Linear layer, so their curvature renorm_coeff · G ⊗ A must
agree; the conv's is 1/N² of the linear's.
Run: python approxngd_conv_batch_scale.py
"""

import torch
from torch import nn

from approxngd import KFAC

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
N = 4
X, y = torch.randn(N, 2, 3, 3), torch.randint(0, 5, (N,))
conv = nn.Conv2d(2, 5, 3)
linear = nn.Linear(18, 5)
with torch.no_grad():
    linear.weight.copy_(conv.weight.flatten(1))
    linear.bias.copy_(conv.bias)


def curvature(model, inputs):
    kfac = KFAC(model, learning_rate=0.0, damping=1e-3, cov_ema_decay=1.0, update_cov_manually=True)
    with kfac.track_forward():
        loss = nn.functional.cross_entropy(model(inputs), y)
    with kfac.track_backward():
        loss.backward()
    kfac.update_cov()
    (block,) = [b for b in kfac.blocks if not b.is_static]
    G, A = block.sensitivity_covariance, block.activation_covariance
    return block.renorm_coeff * torch.kron(G, A)


F_conv = curvature(nn.Sequential(conv, nn.Flatten()), X)
F_linear = curvature(nn.Sequential(linear), X.flatten(1))
ratio = (F_conv.flatten() @ F_linear.flatten() / F_linear.norm() ** 2).item()
print(f"N = {N}: conv / linear curvature = {ratio:.6f} (1/N^2 = {1 / N**2:.6f}), "
      f"residual {((F_conv - ratio * F_linear).norm() / F_conv.norm()).item():.1e}")
