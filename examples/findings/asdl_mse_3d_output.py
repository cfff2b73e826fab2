"""ASDL 0.1a5: the exact MSE Fisher indexes positions instead of classes for 3-D outputs.

``asdl/fisher.py: FisherExactMSE._fisher_loop`` loops ``for i in range(logits.size(-1))``
(the class axis) but backpropagates ``logits[:, i].sum()``, which selects position i of
an (N, S, C) output (axis 1), summed over its C classes. For a per-position loss the
backpropagated vectors should be the unit vectors e_(s,c), one per position and class.
So for S >= C the result is silently wrong (positions C..S-1 never enter, and the
classes of a position are summed), and for S < C it raises IndexError.

Test network: one Linear(D, C) applied to every position of an (N, S, D) input, output
(N, S, C), criterion ASDL's ``mse`` (½‖f − y‖² per entry) with ``data_size = N·S`` (one
average per token, ASDL's own normalisation for Linear layers on 3-D inputs). For this
last layer the loss Hessian is the identity, so the exact Fisher is
``I ⊗ Σ_{n,s} a aᵀ`` and ASDL's gradient factor must be B = I (C × C). The reference
block comes from torch.func (Jacobians of the network output). The same layer on the
flattened (N·S, D) input, a 2-D output, is the control.
Only ASDL and torch. Run: python asdl_mse_3d_output.py
"""

import asdl
import torch
from torch import nn
from torch.func import functional_call, jacrev

torch.set_default_dtype(torch.float64)
N, D = 4, 5


def asdl_fisher(model, X, y, data_size):
    """ASDL's exact Kronecker-factored MSE Fisher of the model's only Linear layer."""
    cfg = asdl.FisherConfig(
        fisher_type="fisher_exact",
        fisher_shapes=[asdl.SHAPE_KRON],
        loss_type=asdl.LOSS_MSE,
        data_size=data_size,
    )
    fm = asdl.get_fisher_maker(model, cfg)
    dummy = fm.setup_model_call(model, X)
    fm.setup_loss_call(nn.MSELoss(reduction="sum"), dummy, y)
    fm.forward_and_backward()
    return model.fisher.kron.A, model.fisher.kron.B


def exact_weight_block(model, X):
    """Σ_rows Jᵀ J of ½‖f − y‖² w.r.t. the weight (the exact Fisher, identity Hessian)."""
    W = model.weight.detach()
    J = jacrev(lambda w: functional_call(model, {"weight": w}, (X,)))(W)
    J = J.reshape(-1, W.numel())  # one row per output entry (n, s, c)
    return J.T @ J


def run(S, C):
    torch.manual_seed(0)
    layer = nn.Linear(D, C, bias=False)
    X, y = torch.randn(N, S, D), torch.randn(N, S, C)
    for label, inputs, targets in (
        ("3-D output (N, S, C)", X, y),
        ("control, 2-D (N·S, C)", X.reshape(N * S, D), y.reshape(N * S, C)),
    ):
        model = nn.Linear(D, C, bias=False)
        model.load_state_dict(layer.state_dict())
        try:
            A, B = asdl_fisher(model, inputs, targets, data_size=N * S)
        except IndexError as error:
            print(f"S={S}, C={C}, {label}: IndexError: {error}")
            continue
        block = (N * S) * torch.kron(B, A)  # undo ASDL's 1/data_size average
        ref = exact_weight_block(model, inputs)
        err = ((block - ref).norm() / ref.norm()).item()
        print(f"S={S}, C={C}, {label}: B = {[[round(v, 4) for v in r] for r in B.tolist()]}")
        print(f"    (should be the identity); |ASDL - exact| / |exact| = {err:.3e}")


run(S=3, C=2)  # S >= C: silently wrong
run(S=2, C=3)  # S < C: IndexError
