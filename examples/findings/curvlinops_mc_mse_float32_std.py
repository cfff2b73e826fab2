"""curvlinops 3.0.1: FisherMCLinearOperator samples MSE labels with a float32 std.

curvlinops/fisher.py (make_grad_output_sampler) builds ``std = as_tensor(sqrt(0.5))``,
a float32 tensor, and draws ``2 * normal(mean, std)``; for a float64 model the
samples are scaled by fl32(√½)/√½ and the MC Fisher (quadratic in them) by
(fl32(√½)/√½)² = 1 − 3.4e-8: far above float64 rounding (1e-16), below float32's.
(KFACLinearOperator's own MC sampling uses the Python float sqrt(0.5): not affected.)
Fixed on curvlinops main (PR #235 builds the std with the output's dtype; PR #255
replaces FisherMCLinearOperator), unreleased.
Only curvlinops and torch. Run: python curvlinops_mc_mse_float32_std.py
"""

import math

import torch
from curvlinops.fisher import make_grad_output_sampler
from torch import nn

output = torch.zeros(1000, 3, dtype=torch.float64)
sampler = make_grad_output_sampler(nn.MSELoss())
gen = torch.Generator().manual_seed(0)
theirs = sampler(output, 2, None, gen)
gen = torch.Generator().manual_seed(0)
exact = 2 * torch.normal(torch.zeros(2, 1000, 3, dtype=torch.float64), math.sqrt(0.5), generator=gen)
ratio = (theirs / exact).unique()
print(f"sample dtype {theirs.dtype}; samples / float64 samples: {ratio.tolist()}")
r = ratio[0].item()
print(f"MC Fisher scale (ratio²) - 1 = {r * r - 1:.3e}")
f32 = torch.tensor(math.sqrt(0.5), dtype=torch.float32).double().item()
print(f"expected (fl32(√½)/√½)² - 1 = {(f32 / math.sqrt(0.5)) ** 2 - 1:.3e}")
