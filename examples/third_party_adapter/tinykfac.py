"""tinykfac: a small, self-contained KFAC for ``nn.Linear`` layers.

This file stands for a library outside kfac_oracle: it imports only torch and has
its own conventions, which ``tinykfac_adapter.py`` translates to the oracle's
contract. Its documented conventions:

- Supported: ``nn.Linear`` layers seeing ``(batch, features)`` inputs, losses
  ``MSELoss`` and ``CrossEntropyLoss`` on ``(batch, outputs)`` model outputs.
- Fisher types: ``"empirical"`` (true labels) and ``"mc"`` (``mc_samples`` labels per
  datum drawn from the model's predictive distribution: ``Categorical(softmax(f))``
  for cross-entropy, ``N(f, ½ I)`` for PyTorch's ``MSELoss``, whose Hessian is ``2 I``).
- Per-datum averages. With ``ℓ_n`` the *sum-reduced* loss of datum ``n`` (the
  reduction of the loss module is ignored), ``g_n = ∂ℓ_n/∂z_n`` at the layer output
  and ``ã_n = [1; a_n]`` (the homogeneous coordinate **first**; ``a_n`` alone for a
  layer without bias)::

      A = (1/N) Σ_n ã_n ã_nᵀ,      G = (1/N) Σ_n g_n g_nᵀ  (MC: (1/(N·M)) Σ_{n,m}),

  accumulated over every batch passed to :meth:`KFAC.update`, so batches of any size
  are weighted by their number of data.
- The curvature of layer ``W`` (as ``[b | W]``) is approximated by ``A ⊗ G`` in the
  column-stacking (cvec) layout of ``[b | W]``.

Hooks: a forward hook stores the layer's input and output, and hands the next module
a *copy* of the output, so an in-place activation after the layer cannot change the
tensor whose gradient is read. Gradients come from ``torch.autograd.grad``: no
``.grad`` is written. Hooks live only inside ``with KFAC(...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__version__ = "0.1"

SUPPORTED_LOSSES = ("MSELoss", "CrossEntropyLoss")


class KFAC:
    """Kronecker factors ``(A, G)`` of every ``nn.Linear`` of a model.

    Usage::

        with KFAC(model, loss_func, fisher_type="empirical") as kfac:
            for X, y in batches:
                kfac.update(X, y)
        factors = kfac.factors()  # {module name: (A, G)}

    Args:
        model: The network (its parameters are not changed).
        loss_func: ``nn.MSELoss`` or ``nn.CrossEntropyLoss``.
        fisher_type: ``"empirical"`` or ``"mc"``.
        mc_samples: Labels drawn per datum for ``"mc"``.
        seed: Seed of the MC labels.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        seed: int = 0,
    ):
        loss_name = type(loss_func).__name__
        if loss_name not in SUPPORTED_LOSSES:
            raise ValueError(f"tinykfac supports {SUPPORTED_LOSSES}, not {loss_name}")
        if fisher_type not in ("empirical", "mc"):
            raise ValueError(f"unknown fisher_type {fisher_type!r}")
        self.model = model
        self.loss_name = loss_name
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.layers = {
            name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
        }
        self._A: dict[str, Tensor] = {}
        self._G: dict[str, Tensor] = {}
        self._num_data = 0
        self._seen: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> KFAC:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            (a,) = args
            if a.ndim != 2:
                raise NotImplementedError(
                    f"tinykfac: layer {name!r} sees a {a.ndim}-D input; only "
                    "(batch, features) inputs are supported"
                )
            self._seen[name] = (a.detach(), output)
            return output.clone()  # an in-place op downstream modifies the copy

        return hook

    def update(self, X: Tensor, y: Tensor) -> None:
        """Add one batch to the running sums."""
        self._seen.clear()
        with torch.enable_grad():
            f = self.model(X)
        if f.ndim != 2:
            raise NotImplementedError("tinykfac supports (batch, outputs) outputs only")
        outputs = [self._seen[name][1] for name in self.layers]
        for labels in self._labels(f.detach(), y):
            loss = self._sum_loss(f, labels)
            grads = torch.autograd.grad(loss, outputs, retain_graph=True)
            for name, g in zip(self.layers, grads):
                self._add(self._G, name, g.T @ g)
        for name, module in self.layers.items():
            a = self._seen[name][0]
            if module.bias is not None:
                a = torch.cat([torch.ones_like(a[:, :1]), a], dim=1)
            self._add(self._A, name, a.T @ a)
        self._num_data += len(X)
        self._seen.clear()

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (A, G)}``, per-datum averages (module docstring)."""
        N = self._num_data
        M = self.mc_samples if self.fisher_type == "mc" else 1
        return {
            name: (self._A[name] / N, self._G[name] / (N * M)) for name in self.layers
        }

    def _labels(self, f: Tensor, y: Tensor) -> list[Tensor]:
        if self.fisher_type == "empirical":
            return [y]
        out = []
        for _ in range(self.mc_samples):
            if self.loss_name == "CrossEntropyLoss":
                p = torch.softmax(f, dim=1).cpu()
                out.append(torch.multinomial(p, 1, generator=self.generator)[:, 0])
            else:
                noise = torch.randn(f.shape, generator=self.generator, dtype=f.dtype)
                out.append(f + noise.to(f.device) * 0.5**0.5)
        return [label.to(f.device) for label in out]

    def _sum_loss(self, f: Tensor, y: Tensor) -> Tensor:
        if self.loss_name == "CrossEntropyLoss":
            return nn.functional.cross_entropy(f, y, reduction="sum")
        return nn.functional.mse_loss(f, y, reduction="sum")

    @staticmethod
    def _add(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
        sums[name] = value if name not in sums else sums[name] + value
