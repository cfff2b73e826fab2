"""The ``large`` family: real architectures at scale, off by default.

Selected with ``--cases 'large*'`` (or a case id); never part of the default run.
Blocks beyond :data:`kfac_oracle.operators.DENSE_LIMIT` parameters are compared
matrix-free (README, "The large family"). Data sets are small (a few data points) so
that the exact references run on two CPU cores.

- ``large_deep_linear_mse``: a deep linear MLP with 1.19M parameters, MSE; every
  layer's type-2 KFAC equals its GGN block (E2), and MC-KFAC converges to it (E6);
- ``large_conv_pool_mse``: a wide Conv2d (512 channels) → global average pool
  (``nn.AdaptiveAvgPool2d``) → Linear, MSE; KFAC-reduce exact for the conv (E5)
  and the linear layer (E2), MC-KFAC-reduce converges to it (E6);
- ``large_resnet18_ce``: a ResNet-18-shaped network (basic blocks, eval-mode
  BatchNorm; 11.2M parameters) on 8×8 images, cross-entropy;
- ``large_transformer_token_ce``: a 6-block pre-norm transformer of width 256
  (causal attention, 4.8M parameters), per-token cross-entropy (expand setting);
- ``large_transformer_pooled_ce``: the same trunk (bidirectional), mean-pooled
  classification head (reduce setting).
"""

from torch import nn

from kfac_oracle.architectures import ResNet, Transformer
from kfac_oracle.catalogue import Case, exact, mc_converges

DEEP_LINEAR_WIDTHS = (256, 512, 512, 512, 512, 512, 10)


def deep_linear_mlp() -> nn.Module:
    """Linear layers only: 256 → 512 (×5) → 10, 1,187,338 parameters."""
    w = DEEP_LINEAR_WIDTHS
    return nn.Sequential(*(nn.Linear(a, b) for a, b in zip(w[:-1], w[1:])))


def wide_conv_pool() -> nn.Module:
    """Conv2d(16, 512, 3, padding=1) → global average pool → Linear(512, 10)."""
    return nn.Sequential(
        nn.Conv2d(16, 512, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 10),
    )


def resnet18() -> nn.Module:
    """ResNet-18 shape (width 64, 10 classes) for 3×8×8 images, BatchNorm in eval."""
    return ResNet(width=64, classes=10, channels=3)


def transformer_token() -> nn.Module:
    """6 causal pre-norm blocks of width 256, 4 heads, per-token logits (N, C, S)."""
    return Transformer(
        vocab=64, width=256, depth=6, heads=4, seq_len=8, classes=64, causal=True
    )


def transformer_pooled() -> nn.Module:
    """6 pre-norm blocks of width 256, 4 heads, mean over positions, 10 classes."""
    return Transformer(
        vocab=64, width=256, depth=6, heads=4, seq_len=8, classes=10, pooled=True
    )


DEEP_LINEAR_LAYERS = [str(i) for i in range(len(DEEP_LINEAR_WIDTHS) - 1)]

CASES = [
    Case(
        id="large_deep_linear_mse",
        family="large",
        model=deep_linear_mlp,
        input_shape=(256,),
        loss="MSELoss",
        batch_sizes=(3, 2),
        claims={name: [exact("E2"), mc_converges()] for name in DEEP_LINEAR_LAYERS},
        seed=101,
        description="deep linear MLP, 1.19M parameters, MSE: E2 on every layer",
        opt_in=True,
    ),
    Case(
        id="large_conv_pool_mse",
        family="large",
        model=wide_conv_pool,
        input_shape=(16, 8, 8),
        loss="MSELoss",
        batch_sizes=(3, 2),
        setting="reduce",
        claims={
            "0": [exact("E5", kfac_approx="reduce"), mc_converges("reduce")],
            "3": [exact("E2", kfac_approx="reduce"), mc_converges("reduce")],
        },
        seed=102,
        description="wide conv, global average pool, linear, MSE: E5 reduce",
        opt_in=True,
    ),
    Case(
        id="large_resnet18_ce",
        family="large",
        model=resnet18,
        input_shape=(3, 8, 8),
        loss="CrossEntropyLoss",
        batch_sizes=(2, 1),
        setting="reduce",
        seed=103,
        description="ResNet-18 shape, eval-mode BatchNorm, 8x8 images, CE",
        opt_in=True,
    ),
    Case(
        id="large_transformer_token_ce",
        family="large",
        model=transformer_token,
        input_shape=(8,),
        vocab=64,
        loss="CrossEntropyLoss",
        batch_sizes=(2, 1),
        setting="expand",
        seed=104,
        description="6-block causal pre-norm transformer, width 256, per-token CE",
        opt_in=True,
    ),
    Case(
        id="large_transformer_pooled_ce",
        family="large",
        model=transformer_pooled,
        input_shape=(8,),
        vocab=64,
        loss="CrossEntropyLoss",
        batch_sizes=(2, 1),
        setting="reduce",
        seed=105,
        description="6-block pre-norm transformer, width 256, mean-pooled head, CE",
        opt_in=True,
    ),
]
