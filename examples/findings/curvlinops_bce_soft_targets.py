"""curvlinops 3.0.1: type-2 (and MC) KFAC reject soft BCEWithLogitsLoss targets.

The BCE loss Hessian in the logits is diag(σ(f)(1−σ(f))): it does not depend on the
targets, so the type-2 Fisher (= GGN) is well defined for soft targets y ∈ [0, 1].
KFACLinearOperator(fisher_type="type-2") raises NotImplementedError ("Only binary
targets ..."), a limitation; the empirical flavour accepts them.
Only curvlinops and torch. Run: python curvlinops_bce_soft_targets.py
"""

import torch
from curvlinops import KFACLinearOperator
from torch import nn

torch.manual_seed(0)
dt = torch.float64
model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dt)
X, y = torch.randn(6, 5, dtype=dt), torch.rand(6, 3, dtype=dt)  # soft targets
for fisher_type in ("type-2", "mc", "empirical"):
    try:
        op = KFACLinearOperator(
            model,
            nn.BCEWithLogitsLoss(),
            list(model.parameters()),
            [(X, y)],
            fisher_type=fisher_type,
            check_deterministic=False,
        )
        op @ torch.eye(op.shape[0], dtype=dt)
        print(f"{fisher_type}: computed")
    except NotImplementedError as error:
        print(f"{fisher_type}: NotImplementedError: {str(error)[:90]}")
