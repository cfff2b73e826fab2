"""Fully connected cases: deep linear nets, nonlinear MLPs, one-datum cases."""

from kfac_oracle.catalogue import (
    Case,
    exact,
    hessian_equals_ggn,
    inexact,
    mc_converges,
    mc_exact,
    one_datum_claims,
)

CASES = []

# Deep linear nets with MSE: every layer's type-2 block is exact (E2: the tail after
# each layer is affine and H = 2I is constant), and the per-layer Hessian block equals
# the GGN block (E8). Depths 1-4, bias on and off, both reductions, batches 4 + 3.
WIDTHS = [5, 4, 4, 3, 2]
for depth in (1, 2, 3, 4):
    for bias in (True, False):
        for reduction in ("mean", "sum"):
            widths = WIDTHS[: depth + 1]
            spec = [
                ("Linear", widths[i], widths[i + 1], {"bias": bias})
                for i in range(depth)
            ]
            layers = [str(i) for i in range(depth)]
            CASES.append(
                Case(
                    id=f"deep_linear_d{depth}_{'bias' if bias else 'nobias'}_mse_"
                    f"{reduction}",
                    family="deep_linear",
                    model=spec,
                    input_shape=(5,),
                    loss="MSELoss",
                    reduction=reduction,
                    batch_sizes=(4, 3),
                    claims={
                        name: [exact("E2"), hessian_equals_ggn()] for name in layers
                    },
                    seed=depth,
                    description="deep linear net, MSE: KFAC exact for every layer",
                )
            )

# Deep linear nets with CE and BCE (N > 1): the Hessian blocks still equal the GGN
# blocks (E8, any loss), but KFAC is not exact (H_n varies over the data).
for loss in ("CrossEntropyLoss", "BCEWithLogitsLoss"):
    for reduction in ("mean", "sum"):
        CASES.append(
            Case(
                id=f"deep_linear_d2_{loss[:3].lower()}_{reduction}",
                family="deep_linear",
                model=[("Linear", 5, 4), ("Linear", 4, 3)],
                input_shape=(5,),
                loss=loss,
                reduction=reduction,
                batch_sizes=(5, 3),
                claims={
                    "0": [hessian_equals_ggn(), inexact()],
                    "1": [hessian_equals_ggn(), inexact()],
                },
                seed=11,
                description="deep linear net, non-constant loss Hessian: Hessian "
                "blocks equal GGN blocks, KFAC inexact",
            )
        )

# Nonlinear MLPs with MSE: only the last layer has an affine tail (E2); the first
# layer's KFAC is inexact. In-place ReLU exercises hook robustness.
ACTIVATIONS = {
    "tanh": ("Tanh",),
    "relu": ("ReLU",),
    "sigmoid": ("Sigmoid",),
    "relu_inplace": ("ReLU", {"inplace": True}),
}
for act_name, act in ACTIVATIONS.items():
    for reduction in ("mean", "sum"):
        CASES.append(
            Case(
                id=f"mlp_{act_name}_mse_{reduction}",
                family="mlp",
                model=[("Linear", 5, 4), act, ("Linear", 4, 3)],
                input_shape=(5,),
                loss="MSELoss",
                reduction=reduction,
                batch_sizes=(4, 2, 3),
                claims={
                    "0": [inexact()] + ([mc_converges()] if act_name == "tanh" else []),
                    "2": [exact("E2")],
                },
                seed=21,
                description="nonlinear MLP, MSE: last layer exact, first not",
            )
        )

# Nonlinear MLPs with CE and BCE over N > 1: KFAC is exact nowhere; MC converges.
for loss in ("CrossEntropyLoss", "BCEWithLogitsLoss"):
    for reduction in ("mean", "sum"):
        CASES.append(
            Case(
                id=f"mlp_tanh_{loss[:3].lower()}_{reduction}",
                family="mlp",
                model=[("Linear", 5, 4), ("Tanh",), ("Linear", 4, 3)],
                input_shape=(5,),
                loss=loss,
                reduction=reduction,
                batch_sizes=(5, 3),
                targets="binary",
                claims={"0": [inexact()], "2": [inexact(), mc_converges()]},
                seed=31,
                description="nonlinear MLP, N > 1: KFAC inexact everywhere",
            )
        )

# One datum (E1): KFAC equals the block of its flavour for any network and loss.
ONE_DATUM = [
    ("MSELoss", "default"),
    ("CrossEntropyLoss", "default"),
    ("BCEWithLogitsLoss", "soft"),
    ("BCEWithLogitsLoss", "binary"),
]
for loss, targets in ONE_DATUM:
    for reduction in ("mean", "sum"):
        suffix = f"_{targets}" if loss == "BCEWithLogitsLoss" else ""
        CASES.append(
            Case(
                id=f"one_datum_{loss[:3].lower()}{suffix}_{reduction}",
                family="one_datum",
                model=[
                    ("Linear", 4, 5),
                    ("Sigmoid",),
                    ("Linear", 5, 3, {"bias": False}),
                ],
                input_shape=(4,),
                loss=loss,
                reduction=reduction,
                batch_sizes=(1,),
                targets=targets,
                claims={"0": one_datum_claims(), "2": one_datum_claims()},
                seed=41,
                description="one datum: every flavour exact",
            )
        )

# N identical data split into batches: the same as one datum (E1).
CASES.append(
    Case(
        id="identical_data_ce_mean",
        family="one_datum",
        model=[("Linear", 4, 5), ("Tanh",), ("Linear", 5, 3)],
        input_shape=(4,),
        loss="CrossEntropyLoss",
        batch_sizes=(2, 3),
        identical_data=True,
        claims={"0": one_datum_claims(), "2": one_datum_claims()},
        seed=42,
        description="N identical data in unequal batches: every flavour exact",
    )
)

# Two layers of the same shape (and repr): per-layer state keyed by shape, repr or
# position in a list of shapes returns one layer's factors for the other.
CASES.append(
    Case(
        id="mlp_twin_layers_mse_mean",
        family="mlp",
        model=[
            ("Linear", 4, 4),
            ("Tanh",),
            ("Linear", 4, 4),
            ("Tanh",),
            ("Linear", 4, 3),
        ],
        input_shape=(4,),
        loss="MSELoss",
        batch_sizes=(3, 2, 2),
        claims={"0": [inexact()], "2": [inexact()], "4": [exact("E2")]},
        seed=23,
        description="two hidden layers of the same shape, MSE: last layer exact",
    )
)
CASES.append(
    Case(
        id="deep_linear_twin_mse_sum",
        family="deep_linear",
        model=[("Linear", 4, 4), ("Linear", 4, 4), ("Linear", 4, 4, {"bias": False})],
        input_shape=(4,),
        loss="MSELoss",
        reduction="sum",
        batch_sizes=(2, 3),
        claims={name: [exact("E2"), hessian_equals_ggn()] for name in ("0", "1", "2")},
        seed=24,
        description="deep linear net of equal widths, MSE: every layer exact",
    )
)

# Zero-variance Monte-Carlo: the last layer's weights and bias are zero, so its
# logits are equal (two-class CE: p = (1/2, 1/2)) or zero (BCE with one output:
# sigma = 1/2). Every sampled gradient outer product then equals the type-2 one, and
# MC-KFAC equals type-2 KFAC for every M and seed: each MC scale error shows exactly.
ZERO = {"init": "zeros"}
CASES.append(
    Case(
        id="mc_zero_variance_ce2_mean",
        family="mc_exact",
        model=[("Linear", 4, 5), ("Tanh",), ("Linear", 5, 2, ZERO)],
        input_shape=(4,),
        loss="CrossEntropyLoss",
        batch_sizes=(3, 2),
        claims={"2": [mc_exact()]},
        seed=25,
        description="two-class CE at equal logits: MC-KFAC equals type-2 exactly",
    )
)
CASES.append(
    Case(
        id="mc_zero_variance_bce_sum",
        family="mc_exact",
        model=[("Linear", 4, 5), ("Tanh",), ("Linear", 5, 1, ZERO)],
        input_shape=(4,),
        loss="BCEWithLogitsLoss",
        reduction="sum",
        batch_sizes=(2, 2, 1),
        targets="binary",
        claims={"2": [mc_exact()]},
        seed=26,
        description="BCE at logit 0: MC-KFAC equals type-2 exactly",
    )
)
