"""Weight sharing over sequence positions: the expand and reduce settings (E3, E4).

Inputs are ``(N, S, D)``; ``Linear`` layers act on every position.
"""

from kfac_oracle.catalogue import Case, exact, inexact, mc_converges

S, D = 3, 4
CASES = []

for reduction in ("mean", "sum"):
    # Expand setting, linear: a loss term per position, nothing mixes positions. Every
    # layer is expand-exact; reduce averages inputs over positions and is not.
    CASES.append(
        Case(
            id=f"seq_expand_linear_mse_{reduction}",
            family="seq_expand",
            model=[("Linear", D, 5), ("Linear", 5, 3)],
            input_shape=(S, D),
            loss="MSELoss",
            reduction=reduction,
            batch_sizes=(3, 2),
            setting="expand",
            claims={
                name: [
                    exact("E3", kfac_approx="expand"),
                    inexact("E3", "type-2", "reduce"),
                ]
                for name in ("0", "1")
            },
            seed=51,
            description="position-wise linear net, per-position MSE",
        )
    )
    # Reduce setting: position-wise linear layers, a pooling over positions, an
    # affine tail. Layers before the pooling are reduce-exact and not expand-exact;
    # after the pooling there is no weight sharing and both coincide.
    pool = "MeanPool" if reduction == "mean" else "SumPool"
    CASES.append(
        Case(
            id=f"seq_reduce_{pool.lower()}_mse_{reduction}",
            family="seq_reduce",
            model=[("Linear", D, 5), ("Linear", 5, 4), (pool, 1), ("Linear", 4, 3)],
            input_shape=(S, D),
            loss="MSELoss",
            reduction=reduction,
            batch_sizes=(2, 3),
            setting="reduce",
            claims={
                "0": [
                    exact("E4", kfac_approx="reduce"),
                    inexact("E4", "type-2", "expand"),
                ],
                "1": [
                    exact("E4", kfac_approx="reduce"),
                    inexact("E4", "type-2", "expand"),
                ],
                "3": [
                    exact("E2", kfac_approx="reduce"),
                    exact("E2", kfac_approx="expand"),
                ],
            },
            seed=52,
            description="position-wise linear layers, pooling over positions, linear",
        )
    )

# Expand setting with a nonlinearity: only the last layer keeps an affine tail.
CASES.append(
    Case(
        id="seq_expand_tanh_mse_mean",
        family="seq_expand",
        model=[("Linear", D, 5), ("Tanh",), ("Linear", 5, 3)],
        input_shape=(S, D),
        loss="MSELoss",
        batch_sizes=(4, 1),
        setting="expand",
        claims={
            "0": [inexact("N", "type-2", "expand"), inexact("N", "type-2", "reduce")],
            "2": [
                exact("E3", kfac_approx="expand"),
                inexact("E3", "type-2", "reduce"),
                mc_converges("expand"),
            ],
        },
        seed=53,
        description="position-wise MLP, per-position MSE: last layer exact",
    )
)

# A layer that mixes positions (a token-mixing linear) breaks expand-exactness of the
# layers before it; the position-wise last layer stays exact.
CASES.append(
    Case(
        id="seq_mixing_mse_mean",
        family="seq_expand",
        model=[
            ("Linear", D, 5),
            ("Permute", 0, 2, 1),
            ("Linear", S, S),
            ("Permute", 0, 2, 1),
            ("Linear", 5, 3),
        ],
        input_shape=(S, D),
        loss="MSELoss",
        batch_sizes=(3, 3),
        setting="expand",
        claims={
            "0": [inexact("N", "type-2", "expand")],
            "4": [exact("E3", kfac_approx="expand")],
        },
        seed=54,
        description="positions mixed by a token-mixing layer: earlier layers inexact",
    )
)

# Cross-entropy over sequences: logits permuted to (N, C, S), labels (N, S).
for reduction in ("mean", "sum"):
    CASES.append(
        Case(
            id=f"seq_ce_{reduction}",
            family="seq_ce",
            model=[("Linear", D, 5), ("Tanh",), ("Linear", 5, 3), ("Permute", 0, 2, 1)],
            input_shape=(S, D),
            loss="CrossEntropyLoss",
            reduction=reduction,
            batch_sizes=(3, 2),
            setting="expand",
            claims={
                "0": [inexact("N", "type-2", "expand")],
                "2": [inexact("N", "type-2", "expand"), mc_converges("expand")],
            },
            seed=55,
            description="CE per position, logits (N, C, S)",
        )
    )

# BCE per position (soft labels), expand setting, linear net: the loss Hessian varies
# over data, so KFAC is inexact.
CASES.append(
    Case(
        id="seq_bce_soft_mean",
        family="seq_ce",
        model=[("Linear", D, 3)],
        input_shape=(S, D),
        loss="BCEWithLogitsLoss",
        batch_sizes=(2, 2),
        setting="expand",
        targets="soft",
        claims={"0": [inexact("N", "type-2", "expand")]},
        seed=56,
        description="BCE per position with soft labels",
    )
)
