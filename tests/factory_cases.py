"""Small cases given by model factories: residual, attention, LayerNorm, embeddings,
eval-mode BatchNorm (fast instances of :mod:`kfac_oracle.architectures`)."""

from torch import nn

from kfac_oracle.architectures import (
    BasicBlock,
    PreNormBlock,
    ResidualMLP,
    SelfAttention,
    Transformer,
    frozen_batchnorm,
)
from kfac_oracle.catalogue import Case, exact, mc_converges


def residual_mlp():
    return ResidualMLP(3, 4, 2, blocks=1)


class AttentionRegressor(nn.Module):
    """LayerNorm → self-attention → position-wise Linear, MSE per token."""

    def __init__(self, causal: bool):
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.attn = SelfAttention(4, 2, causal=causal)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.attn(self.ln(x)))


def tiny_transformer():
    return Transformer(vocab=5, width=4, depth=1, heads=2, seq_len=3, classes=3)


def tiny_pooled_transformer():
    return Transformer(
        vocab=5, width=4, depth=1, heads=2, seq_len=3, classes=3, pooled=True
    )


def tiny_resnet_block():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        frozen_batchnorm(3),
        nn.ReLU(),
        BasicBlock(3, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    )


def prenorm_block():
    return nn.Sequential(PreNormBlock(4, 2, 5, causal=True), nn.Linear(4, 2))


CASES = [
    Case(
        id="factory_residual_mlp_mse",
        family="factory",
        model=residual_mlp,
        input_shape=(3,),
        loss="MSELoss",
        batch_sizes=(2, 1),
        claims={"out": [exact("E2")]},
        seed=3,
    ),
    Case(
        id="factory_attention_mse",
        family="factory",
        model=lambda: AttentionRegressor(causal=False),
        input_shape=(3, 4),
        loss="MSELoss",
        batch_sizes=(2, 1),
        setting="expand",
        claims={"out": [exact("E3", kfac_approx="expand")]},
        seed=4,
    ),
    Case(
        id="factory_causal_attention_mse",
        family="factory",
        model=lambda: AttentionRegressor(causal=True),
        input_shape=(3, 4),
        loss="MSELoss",
        batch_sizes=(2, 1),
        setting="expand",
        claims={"out": [exact("E3", kfac_approx="expand")]},
        seed=5,
    ),
    Case(
        id="factory_transformer_ce",
        family="factory",
        model=tiny_transformer,
        input_shape=(3,),
        vocab=5,
        loss="CrossEntropyLoss",
        batch_sizes=(2, 1),
        setting="expand",
        claims={"head": [mc_converges()]},
        seed=6,
    ),
    Case(
        id="factory_pooled_transformer_ce",
        family="factory",
        model=tiny_pooled_transformer,
        input_shape=(3,),
        vocab=5,
        loss="CrossEntropyLoss",
        batch_sizes=(2, 1),
        setting="reduce",
        seed=8,
    ),
    Case(
        id="factory_resnet_block_ce",
        family="factory",
        model=tiny_resnet_block,
        input_shape=(2, 4, 4),
        loss="CrossEntropyLoss",
        batch_sizes=(2, 1),
        setting="reduce",
        claims={"3.conv2": [mc_converges("reduce")]},
        seed=7,
    ),
]
