"""curvlinops 3.0.1: type-2 KFAC and the MC Fisher reject soft BCEWithLogitsLoss targets.

The BCE loss Hessian in the logits is diag(σ(f)(1−σ(f))): it does not depend on the
targets, so the type-2 Fisher (= GGN) is well defined for soft targets y ∈ [0, 1].
KFACLinearOperator(fisher_type="type-2") raises NotImplementedError ("Only binary
targets ..."); MC- and EF-KFAC accept them. The dense
FisherMCLinearOperator rejects them too, although its labels are drawn from the model
(the targets are never used). Fixed on curvlinops main by PR #257 (unreleased).
Finding C6 (new, still on main): after the exception, KFACLinearOperator leaves its forward hooks on the
model (no try/finally), so the next curvlinops operator on the same model fails with
"RuntimeError: During a grad (vjp, jvp, grad, etc) transform ... in-place operation".
Only curvlinops and torch. Run: python curvlinops_bce_soft_targets.py
"""

import torch
from curvlinops import FisherMCLinearOperator, KFACLinearOperator
from torch import nn

torch.manual_seed(0)
dt = torch.float64
X, y = torch.randn(6, 5, dtype=dt), torch.rand(6, 3, dtype=dt)  # soft targets


def new_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dt)


def hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model)


def dense(cls, model, **kw):
    op = cls(
        model,
        nn.BCEWithLogitsLoss(),
        list(model.parameters()),
        [(X, y)],
        check_deterministic=False,
        **kw,
    )
    return op @ torch.eye(op.shape[0], dtype=dt)


for fisher_type in ("type-2", "mc", "empirical"):
    model = new_model()
    try:
        dense(KFACLinearOperator, model, fisher_type=fisher_type)
        print(f"KFAC {fisher_type}: computed; hooks left on the model: {hooks(model)}")
    except NotImplementedError as error:
        print(f"KFAC {fisher_type}: NotImplementedError: {str(error)[:60]}...")
        print(f"   hooks left on the model: {hooks(model)}")
        try:
            dense(FisherMCLinearOperator, model)
        except RuntimeError as error2:
            print(f"   next operator on that model: RuntimeError: {str(error2)[:60]}")
try:
    dense(FisherMCLinearOperator, new_model())
    print("FisherMCLinearOperator: computed")
except NotImplementedError as error:
    print(f"FisherMCLinearOperator: NotImplementedError: {str(error)[:60]}...")
