"""The model as a function of a chosen subset of its parameters (torch.func plumbing).

Parameters are flattened row-major (rvec, PyTorch's ``flatten``) and concatenated in
``model.named_parameters()`` order: the canonical layout of docs/theory.md §3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call


class ParameterSubset:
    """A subset of a model's parameters, in ``named_parameters()`` order.

    Args:
        model: The network.
        names: Parameter names; ``None`` means every parameter that requires grad.

    Raises:
        KeyError: If a name is not a parameter of the model.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None):
        all_params = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in all_params.items() if p.requires_grad]
        unknown = [n for n in names if n not in all_params]
        if unknown:
            raise KeyError(f"not parameters of the model: {unknown}")
        wanted = set(names)
        self.model = model
        self.names = [n for n in all_params if n in wanted]
        self.shapes = [all_params[n].shape for n in self.names]
        self.numels = [all_params[n].numel() for n in self.names]
        self.frozen = {
            n: p.detach() for n, p in all_params.items() if n not in wanted
        } | {n: b.detach() for n, b in model.named_buffers()}

    @property
    def size(self) -> int:
        """P, the number of entries of the subset."""
        return sum(self.numels)

    def values(self) -> dict[str, Tensor]:
        """The current values of the subset, detached."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.names}

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Concatenate row-major flattenings, keeping any leading batch dimensions.

        ``tensors[name]`` has shape ``(*lead, *param_shape)``; the result
        ``(*lead, P)``.
        """
        parts = []
        for n, shape in zip(self.names, self.shapes, strict=True):
            t = tensors[n]
            lead = t.shape[: t.ndim - len(shape)]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat vector ``(P,)`` into the subset's parameter shapes."""
        chunks = vector.split(self.numels)
        return {
            n: c.reshape(s)
            for n, c, s in zip(self.names, chunks, self.shapes, strict=True)
        }

    def forward(self, params: dict[str, Tensor], X: Tensor) -> Tensor:
        """The model's output at ``params`` (subset) and the frozen rest."""
        return functional_call(self.model, self.frozen | params, (X,))
