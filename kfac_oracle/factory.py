"""Cases whose model is any ``nn.Module``, given by a factory.

A case's ``model`` is either a list of layer specs (:mod:`kfac_oracle.models`) or a
*factory*: a callable with no arguments returning an ``nn.Module`` (a residual network,
a transformer, ...). The factory is called under a fixed seed and torch's default
dtype ``float32`` (so its random initialisation, and any random buffers it sets, depend
on the case's seed only), then the model is converted to the problem's dtype.

The layers KFAC is requested for are the model's ``nn.Linear`` and ``nn.Conv2d``
modules with a trainable weight, by name (``model.named_modules()``); parameters of
other modules (norms, embeddings, positional parameters) are simply not requested.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kfac_oracle.torchstate import fixed_defaults

ModelFactory = Callable[[], nn.Module]
KFAC_MODULES = (nn.Linear, nn.Conv2d)


def is_factory(model: object) -> bool:
    """Whether a case's ``model`` is a factory (a callable), not layer specs."""
    return callable(model) and not isinstance(model, list | tuple)


def build_from_factory(
    factory: ModelFactory, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Module:
    """Call ``factory`` with a fixed seed and defaults; convert to ``dtype``.

    Raises:
        TypeError: If the factory does not return an ``nn.Module``.
    """
    with torch.random.fork_rng(devices=[]), fixed_defaults():
        torch.default_generator.manual_seed(seed)  # models are built on the CPU
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"the model factory returned a {type(model).__name__}, not an nn.Module"
        )
    return model.to(dtype)


def kfac_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` and ``nn.Conv2d`` modules with a trainable weight."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, KFAC_MODULES) and m.weight.requires_grad
    ]


def describe_factory(factory: ModelFactory) -> str:
    """A one-line name: the factory's ``__name__`` or its class name."""
    name = getattr(factory, "__name__", None) or type(factory).__name__
    return f"factory:{name}"


__all__ = [
    "KFAC_MODULES",
    "ModelFactory",
    "build_from_factory",
    "describe_factory",
    "is_factory",
    "kfac_layers",
]
