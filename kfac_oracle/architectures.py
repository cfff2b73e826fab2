"""Real-architecture building blocks for cases given by a model factory.

Every module that KFAC covers is a plain ``nn.Linear`` or ``nn.Conv2d`` called once per
forward pass, so that the reference reads its inputs and output gradients with hooks:

- :class:`SelfAttention`: multi-head self-attention with ``q``, ``k``, ``v``, ``o``
  projections (``nn.Linear``), causal or not (Vaswani et al. 2017);
- :class:`PreNormBlock`: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (pre-norm
  transformer block, Xiong et al. 2020);
- :class:`ResidualMLP`: ``x + W₂ σ(W₁ x)``;
- :class:`BasicBlock`: the ResNet basic block (He et al. 2016) with BatchNorm in eval
  mode, using running statistics fixed at construction (no batch statistics);
- :class:`Transformer`, :class:`ResNet`: stacks of the above for the ``large`` family.

Everything works on one datum independently (no batch statistics, no dropout), which
the exact references need (:mod:`kfac_oracle.independence`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class SelfAttention(nn.Module):
    """Multi-head self-attention ``o(softmax(q kᵀ/√d_h + mask) v)`` on ``(N, S, D)``.

    Args:
        width: ``D``.
        heads: Number of heads (``D`` must be divisible by it).
        causal: Mask future positions (decoder self-attention).
    """

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the positions of each datum separately."""
        N, S, D = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(N, S, h, D // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // h)
        if self.causal:
            mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        out = F.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(N, S, D))


class PreNormBlock(nn.Module):
    """A pre-norm transformer block: ``x + Attn(LN(x))``, ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, hidden: int, causal: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        """Residual attention, then a residual GELU MLP."""
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """Token embedding + learned positions, pre-norm blocks, final LayerNorm, head.

    Args:
        vocab: Number of token ids (inputs are ``(N, S)`` integer tokens).
        width: ``D``.
        depth: Number of :class:`PreNormBlock` s.
        heads: Attention heads.
        seq_len: Maximum sequence length ``S``.
        classes: Outputs of the head.
        pooled: ``False``: per-token logits ``(N, C, S)`` (class dim second, for
            per-token cross-entropy; expand setting); ``True``: the mean over
            positions, then the head, ``(N, C)`` (reduce setting).
        causal: Causal attention.
    """

    def __init__(
        self,
        vocab: int,
        width: int,
        depth: int,
        heads: int,
        seq_len: int,
        classes: int,
        pooled: bool = False,
        causal: bool = False,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(seq_len, width))
        self.blocks = nn.ModuleList(
            PreNormBlock(width, heads, 4 * width, causal) for _ in range(depth)
        )
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)
        self.pooled = pooled

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(N, C, S)``, or ``(N, C)`` when pooled."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.ln(x)
        if self.pooled:
            return self.head(x.mean(1))
        return self.head(x).transpose(1, 2)


class ResidualMLP(nn.Module):
    """``x + W₂ tanh(W₁ x)`` repeated, between an input and an output Linear."""

    def __init__(self, d_in: int, width: int, d_out: int, blocks: int = 1):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.fc1 = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.out = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        """Residual tanh blocks."""
        x = self.inp(x)
        for fc1, fc2 in zip(self.fc1, self.fc2, strict=True):
            x = x + fc2(torch.tanh(fc1(x)))
        return self.out(x)


def frozen_batchnorm(channels: int) -> nn.BatchNorm2d:
    """An eval-mode ``BatchNorm2d`` with non-trivial running statistics and affine.

    Running means, variances and the affine parameters are drawn from torch's
    (seeded) random state, so that the normalisation is not the identity.
    """
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(0.1 * torch.randn(channels))
        bn.running_var.copy_(1 + 0.2 * torch.rand(channels))
        bn.weight.copy_(1 + 0.1 * torch.randn(channels))
        bn.bias.copy_(0.1 * torch.randn(channels))
    return bn.eval()


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn(conv(relu(bn(conv x)))) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = frozen_batchnorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = frozen_batchnorm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), frozen_batchnorm(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        """The residual sum."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet-18-shaped network (4 stages of 2 basic blocks) for small images.

    A 3×3 stem (CIFAR style), stages of widths ``width·(1, 2, 4, 8)`` with stride 2
    between stages, global average pooling (``nn.AdaptiveAvgPool2d``) and a Linear
    head. ``width=64`` is the standard ResNet-18.
    """

    def __init__(self, width: int = 64, classes: int = 10, channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn = frozen_batchnorm(width)
        stages, c = [], width
        for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c, w, stride), BasicBlock(w, w)]
            c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, C)``."""
        x = self.stages(F.relu(self.bn(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


__all__ = [
    "BasicBlock",
    "PreNormBlock",
    "ResNet",
    "ResidualMLP",
    "SelfAttention",
    "Transformer",
    "frozen_batchnorm",
]
