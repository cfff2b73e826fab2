"""Conv2d cases (E5): per-pixel outputs (expand) and conv-pool-affine (reduce).

Inputs are ``(N, 2, 5, 5)``. Per-pixel predictions are made channels-last with a
``Permute`` so that MSE has a loss term per pixel and channel. Global average pooling
uses ``AdaptiveAvgPool2d(1)`` and ``Flatten``. Rectangular kernels with unequal
stride, padding and dilation per direction, and ``padding="same"`` (asymmetric for an
even kernel), catch code that reads one direction's setting for both.
"""

from kfac_oracle.catalogue import Case, exact, inexact, mc_converges

IN = (2, 5, 5)
# Global average pool with standard modules, at one index: (N, C, H, W) -> (N, C).
GAP = ("Sequential", [("AdaptiveAvgPool2d", 1), ("Flatten",)])
CASES = []

PIXEL = {
    "k3_pad1": {"padding": 1},
    "k3_stride2": {"padding": 1, "stride": 2},
    "k3_dilation2": {"padding": 2, "dilation": 2},
    "k2_nopad_nobias": {"bias": False},
}
for name, kw in PIXEL.items():
    k = 2 if name.startswith("k2") else 3
    for reduction in ("mean", "sum"):
        CASES.append(
            Case(
                id=f"conv_pixel_{name}_mse_{reduction}",
                family="conv_expand",
                model=[("Conv2d", 2, 3, k, kw), ("Permute", 0, 2, 3, 1)],
                input_shape=IN,
                loss="MSELoss",
                reduction=reduction,
                batch_sizes=(2, 1),
                setting="expand",
                claims={
                    "0": [
                        exact("E5", kfac_approx="expand"),
                        inexact("E5", "type-2", "reduce"),
                    ]
                },
                seed=61,
                description="Conv2d predicting per pixel, per-pixel MSE",
            )
        )

# The same per-pixel prediction flattened to (N, C·H·W): a 2-D output, which libraries
# restricted to 2-D outputs can take; the loss and the claims are unchanged.
for reduction in ("mean", "sum"):
    CASES.append(
        Case(
            id=f"conv_flat_k3_pad1_mse_{reduction}",
            family="conv_expand",
            model=[("Conv2d", 2, 3, 3, {"padding": 1}), ("Flatten",)],
            input_shape=IN,
            loss="MSELoss",
            reduction=reduction,
            batch_sizes=(2, 1),
            setting="expand",
            claims={
                "0": [
                    exact("E5", kfac_approx="expand"),
                    inexact("E5", "type-2", "reduce"),
                ]
            },
            seed=61,
            description="Conv2d per-pixel prediction flattened, per-entry MSE",
        )
    )

# A following 1x1 conv keeps the first conv expand-exact; a following 3x3 conv not.
CASES.append(
    Case(
        id="conv_pixel_then_1x1_mse_mean",
        family="conv_expand",
        model=[
            ("Conv2d", 2, 3, 3, {"padding": 1}),
            ("Conv2d", 3, 2, 1),
            ("Permute", 0, 2, 3, 1),
        ],
        input_shape=IN,
        loss="MSELoss",
        batch_sizes=(2, 2),
        setting="expand",
        claims={
            "0": [exact("E5", kfac_approx="expand")],
            "1": [exact("E5", kfac_approx="expand")],
        },
        seed=62,
        description="3x3 conv then 1x1 conv, per-pixel MSE: both expand-exact",
    )
)
CASES.append(
    Case(
        id="conv_pixel_then_3x3_mse_mean",
        family="conv_expand",
        model=[
            ("Conv2d", 2, 3, 3, {"padding": 1}),
            ("Conv2d", 3, 2, 3, {"padding": 1}),
            ("Permute", 0, 2, 3, 1),
        ],
        input_shape=IN,
        loss="MSELoss",
        batch_sizes=(2, 2),
        setting="expand",
        claims={
            "0": [inexact("E5", "type-2", "expand")],
            "1": [exact("E5", kfac_approx="expand")],
        },
        seed=63,
        description="two stacked 3x3 convs, per-pixel MSE: only the last exact",
    )
)

# Conv -> global average pool -> linear -> MSE: reduce-exact for the conv.
POOLED = {
    "k3_pad1": {"padding": 1},
    "k3_stride2": {"stride": 2},
    "k3_dilation2_pad1": {"dilation": 2, "padding": 1},
}
for name, kw in POOLED.items():
    for reduction in ("mean", "sum"):
        CASES.append(
            Case(
                id=f"conv_pool_{name}_mse_{reduction}",
                family="conv_reduce",
                model=[("Conv2d", 2, 3, 3, kw), GAP, ("Linear", 3, 2)],
                input_shape=IN,
                loss="MSELoss",
                reduction=reduction,
                batch_sizes=(3, 2),
                setting="reduce",
                claims={
                    "0": [
                        exact("E5", kfac_approx="reduce"),
                        inexact("E5", "type-2", "expand"),
                    ],
                    "2": [exact("E2", kfac_approx="reduce")],
                },
                seed=64,
                description="conv, global average pool, linear, MSE",
            )
        )

# Two stacked 3x3 convs then pooling: the first conv is not exact (border effects mix
# positions), the second is reduce-exact.
CASES.append(
    Case(
        id="conv_stack_pool_mse_mean",
        family="conv_reduce",
        model=[
            ("Conv2d", 2, 3, 3, {"padding": 1}),
            ("Conv2d", 3, 3, 3, {"padding": 1}),
            GAP,
            ("Linear", 3, 2),
        ],
        input_shape=IN,
        loss="MSELoss",
        batch_sizes=(2, 2),
        setting="reduce",
        claims={
            "0": [inexact("E5", "type-2", "reduce"), inexact("E5", "type-2", "expand")],
            "1": [exact("E5", kfac_approx="reduce"), inexact("E5", "type-2", "expand")],
            "3": [exact("E2", kfac_approx="reduce")],
        },
        seed=65,
        description="two stacked 3x3 convs, pool, linear: first conv inexact",
    )
)

# A nonlinear CNN classifier: nothing exact; MC converges (reduce).
CASES.append(
    Case(
        id="cnn_tanh_ce_mean",
        family="conv_reduce",
        model=[
            ("Conv2d", 2, 3, 3, {"padding": 1}),
            ("Tanh",),
            GAP,
            ("Linear", 3, 4),
        ],
        input_shape=IN,
        loss="CrossEntropyLoss",
        batch_sizes=(3, 2),
        setting="reduce",
        claims={
            "0": [inexact("N", "type-2", "reduce"), mc_converges("reduce")],
            "3": [inexact("N", "type-2", "reduce")],
        },
        seed=66,
        description="conv, tanh, pool, linear, CE",
    )
)

# Rectangular kernel, unequal stride, padding and dilation per direction.
RECT = {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}
CASES.append(
    Case(
        id="conv_pixel_rect_mse_mean",
        family="conv_expand",
        model=[("Conv2d", 2, 3, RECT), ("Permute", 0, 2, 3, 1)],
        input_shape=(2, 6, 7),
        loss="MSELoss",
        batch_sizes=(2, 1),
        setting="expand",
        claims={
            "0": [
                exact("E5", kfac_approx="expand"),
                inexact("E5", "type-2", "reduce"),
            ]
        },
        seed=67,
        description="rectangular kernel, stride/padding/dilation differ per direction",
    )
)
CASES.append(
    Case(
        id="conv_pool_rect_mse_sum",
        family="conv_reduce",
        model=[("Conv2d", 2, 3, RECT), GAP, ("Linear", 3, 2)],
        input_shape=(2, 6, 7),
        loss="MSELoss",
        reduction="sum",
        batch_sizes=(3, 1),
        setting="reduce",
        claims={
            "0": [
                exact("E5", kfac_approx="reduce"),
                inexact("E5", "type-2", "expand"),
            ],
            "2": [exact("E2", kfac_approx="reduce")],
        },
        seed=68,
        description="rectangular conv, global average pool, linear",
    )
)
# padding="same": symmetric for an odd kernel, asymmetric for an even one.
for name, kernel in (("k3", 3), ("k2x4", (2, 4))):
    CASES.append(
        Case(
            id=f"conv_pixel_same_{name}_mse_mean",
            family="conv_expand",
            model=[
                ("Conv2d", 2, 3, kernel, {"padding": "same"}),
                ("Permute", 0, 2, 3, 1),
            ],
            input_shape=IN,
            loss="MSELoss",
            batch_sizes=(2, 1),
            setting="expand",
            claims={
                "0": [
                    exact("E5", kfac_approx="expand"),
                    inexact("E5", "type-2", "reduce"),
                ]
            },
            seed=69,
            description='Conv2d with padding="same", per-pixel MSE',
        )
    )
