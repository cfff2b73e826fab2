"""Declarative model specifications: a list of layer specs built into ``nn.Sequential``.

A layer spec is a tuple ``(kind, *args)`` with an optional trailing ``dict`` of keyword
arguments, e.g. ``("Linear", 5, 4)``, ``("Linear", 5, 4, {"bias": False})``,
``("Conv2d", 2, 3, 3, {"padding": 1})``, ``("ReLU", {"inplace": True})``,
``("Sequential", [("AdaptiveAvgPool2d", 1), ("Flatten",)])``,
``("Permute", 0, 2, 1)``. Module names are the Sequential's indices ``"0"``, ``"1"``,
...; standard ``torch.nn`` modules are used wherever one does the job (``MeanPool`` and
``SumPool`` average or sum over the positions of ``(N, S, D)`` sequences, for which
``torch.nn`` has no module).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kfac_oracle.torchstate import fixed_defaults


class Permute(nn.Module):
    """``x.permute(*dims)``: e.g. channels last, or CE's class dim second."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        """Permute the dimensions."""
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        """The permutation."""
        return ", ".join(map(str, self.dims))


class MeanPool(nn.Module):
    """Mean over the given dimensions (pooling over positions)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        """Average over ``dims``."""
        return x.mean(dim=self.dims)


class SumPool(nn.Module):
    """Sum over the given dimensions (pooling over positions)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        """Sum over ``dims``."""
        return x.sum(dim=self.dims)


LAYERS = {
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "Tanh": nn.Tanh,
    "ReLU": nn.ReLU,
    "Sigmoid": nn.Sigmoid,
    "Flatten": nn.Flatten,
    "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d,
    "AvgPool2d": nn.AvgPool2d,
    "Permute": Permute,
    "MeanPool": MeanPool,
    "SumPool": SumPool,
}


def build_layer(spec: Sequence) -> nn.Module:
    """Build one module from a layer spec ``(kind, *args[, kwargs])``.

    ``("Sequential", [spec, ...])`` nests specs in one module (e.g. a global average
    pool as ``AdaptiveAvgPool2d(1)`` then ``Flatten``, at one index). The keyword
    ``init="zeros"`` sets a layer's parameters to zero after construction.
    """
    kind, *args = spec
    kwargs = dict(args.pop()) if args and isinstance(args[-1], dict) else {}
    if kind == "Sequential":
        (inner,) = args
        return nn.Sequential(*(build_layer(s) for s in inner))
    if kind not in LAYERS:
        raise ValueError(f"unknown layer kind {kind!r}; known: {sorted(LAYERS)}")
    init = kwargs.pop("init", None)
    module = LAYERS[kind](*args, **kwargs)
    if init == "zeros":
        with torch.no_grad():
            for p in module.parameters():
                p.zero_()
    elif init is not None:
        raise ValueError(f"unknown init {init!r}; use 'zeros'")
    return module


def build_model(
    spec: Sequence[Sequence], seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Sequential:
    """Build an ``nn.Sequential`` from layer specs with seeded initialisation.

    Parameters are initialised in float32 on the CPU from ``seed`` (independent of
    torch's global defaults and random state), then converted to ``dtype``.
    """
    with torch.random.fork_rng(devices=[]), fixed_defaults():
        torch.default_generator.manual_seed(seed)  # models are built on the CPU
        model = nn.Sequential(*(build_layer(s) for s in spec))
    return model.to(dtype)


def describe(spec: Sequence[Sequence]) -> str:
    """A compact one-line description, e.g. ``Linear(5,4)-Tanh-Linear(4,3)``."""
    parts = []
    for s in spec:
        kind, *args = s
        if kind == "Sequential":
            parts.append(f"[{describe(args[0])}]")
            continue
        kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
        inner = [str(a) for a in args] + [f"{k}={v}" for k, v in kwargs.items()]
        parts.append(f"{kind}({','.join(inner)})" if inner else kind)
    return "-".join(parts)
