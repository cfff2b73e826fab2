"""A curvature problem: model, loss and data set, validated, with the loss scaling R.

The loss over the whole data set is ``L(θ) = R · Σ_n ℓ_n`` where ``ℓ_n`` is the loss
module with ``reduction="sum"`` applied to datum ``n`` alone (docs/theory.md §1):

- ``R = 1`` for ``reduction="sum"``;
- ``R = 1 / (N · T)`` for ``reduction="mean"``, with ``T`` the number of loss terms per
  datum: every output entry for ``MSELoss`` and ``BCEWithLogitsLoss``; every label entry
  for ``CrossEntropyLoss`` (``T = S`` for logits of shape ``(N, C, S)``).

The mean is over the whole data set, not per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kfac_oracle import independence
from kfac_oracle.capabilities import LOSSES as SUPPORTED_LOSSES
from kfac_oracle.errors import ProblemError


def loss_terms_per_datum(data: list[tuple[Tensor, Tensor]]) -> int:
    """``T``: the number of loss terms per datum, from the targets' shape.

    Every target entry is one loss term: every output entry for ``MSELoss`` and
    ``BCEWithLogitsLoss``, every label entry for ``CrossEntropyLoss`` (``T = S`` for
    logits ``(N, C, S)``).
    """
    _, y = data[0]
    return max(y[0].numel(), 1)


def reduction_factor(reduction: str, num_data: int, terms_per_datum: int) -> float:
    """``R`` with ``L = R Σ_n ℓ_n``: 1 for ``sum``, ``1/(N·T)`` for ``mean``."""
    if reduction == "sum":
        return 1.0
    return 1.0 / (num_data * terms_per_datum)


@dataclass
class Problem:
    """A model, a loss module and a data set given as a list of ``(X, y)`` batches.

    Attributes:
        model: The network.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        data: Batches ``(X, y)``; sizes may differ.
        check_outputs: Also evaluate the model on every batch to check the outputs
            against the targets. Callers that run the model anyway pass ``False``
            and call :func:`validate_output` on the outputs they compute.
    """

    model: nn.Module
    loss_func: nn.Module
    data: list[tuple[Tensor, Tensor]]
    check_outputs: bool = True

    def __post_init__(self):
        self.data = [(X, y) for X, y in self.data]
        validate_problem(self.model, self.loss_func, self.data, self.check_outputs)

    @property
    def loss_name(self) -> str:
        """The loss module's class name."""
        return type(self.loss_func).__name__

    @property
    def reduction(self) -> str:
        """The loss's reduction, ``"mean"`` or ``"sum"``."""
        return str(self.loss_func.reduction)

    @property
    def num_data(self) -> int:
        """N, the number of data points over all batches."""
        return sum(X.shape[0] for X, _ in self.data)

    @property
    def loss_terms_per_datum(self) -> int:
        """``T``, the number of loss terms per datum (docs/theory.md §1)."""
        return loss_terms_per_datum(self.data)

    @property
    def reduction_factor(self) -> float:
        """``R`` with ``L = R Σ_n ℓ_n``: 1 for sum, ``1/(N·T)`` for mean."""
        return reduction_factor(
            self.reduction, self.num_data, self.loss_terms_per_datum
        )

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters in ``model.named_parameters()`` order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' floating-point dtype."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return next(self.model.parameters()).device


def sum_loss(loss_func: nn.Module) -> nn.Module:
    """A copy of ``loss_func`` with ``reduction="sum"``: the per-datum loss ``ℓ_n``."""
    kwargs = {}
    if isinstance(loss_func, nn.CrossEntropyLoss):
        if loss_func.weight is not None or loss_func.label_smoothing != 0.0:
            raise ProblemError(
                "CrossEntropyLoss with class weights or label smoothing is "
                "not supported"
            )
        kwargs["ignore_index"] = loss_func.ignore_index
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        if loss_func.weight is not None or loss_func.pos_weight is not None:
            raise ProblemError(
                "BCEWithLogitsLoss with weight or pos_weight is not supported"
            )
    return type(loss_func)(reduction="sum", **kwargs)


def validate_problem(
    model: nn.Module, loss_func: nn.Module, data, check_outputs: bool = True
) -> None:
    """Check model, loss and data; raise :class:`ProblemError` naming what is wrong.

    Checks: a supported loss with reduction ``"mean"`` or ``"sum"``; a non-empty list
    of ``(X, y)`` pairs of tensors; matching batch sizes; finite floating inputs in the
    parameters' dtype and device (or integer token ids); label and target shapes and
    values that the loss accepts, verified by evaluating the model and the loss on
    every batch; per-datum independence (:mod:`kfac_oracle.independence`): no
    module that mixes data in training mode and, with ``check_outputs``, the largest
    batch's output equal to the outputs of its data run one at a time.
    """
    name = type(loss_func).__name__
    if name not in SUPPORTED_LOSSES:
        raise ProblemError(
            f"unsupported loss {name!r}; supported: {', '.join(SUPPORTED_LOSSES)}"
        )
    reduction = getattr(loss_func, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ProblemError(
            f"unsupported reduction {reduction!r} of {name}; use 'mean' or 'sum'"
        )
    sum_loss(loss_func)
    if not isinstance(data, list | tuple) or len(data) == 0:
        raise ProblemError("data must be a non-empty list of (X, y) batches")
    params = list(model.parameters())
    if not params:
        raise ProblemError("the model has no parameters")
    dtype, device = params[0].dtype, params[0].device
    for p in params:
        if not p.dtype.is_floating_point:
            raise ProblemError(f"parameter of dtype {p.dtype}; expected floating point")
        if not torch.isfinite(p).all():
            raise ProblemError("the model's parameters contain NaN or inf")
    independence.check_modes(model)
    per_datum_shape = None
    for b, batch in enumerate(data):
        if not (isinstance(batch, list | tuple) and len(batch) == 2):
            raise ProblemError(f"batch {b} is not an (X, y) pair")
        X, y = batch
        if not isinstance(X, Tensor) or not isinstance(y, Tensor):
            raise ProblemError(f"batch {b}: X and y must be tensors")
        if X.ndim == 0 or y.ndim == 0 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
            raise ProblemError(
                f"batch {b}: X of shape {tuple(X.shape)} and y of shape "
                f"{tuple(y.shape)} must have the same non-zero batch size (dim 0)"
            )
        if X.dtype != dtype and X.dtype.is_floating_point:
            raise ProblemError(
                f"batch {b}: X has dtype {X.dtype} but the parameters {dtype}"
            )
        if X.device != device or y.device != device:
            raise ProblemError(
                f"batch {b}: data on {X.device}/{y.device}, parameters on {device}"
            )
        if not torch.isfinite(X).all():
            raise ProblemError(f"batch {b}: X contains NaN or inf")
        if y.dtype.is_floating_point and not torch.isfinite(y).all():
            raise ProblemError(f"batch {b}: y contains NaN or inf")
        _validate_targets(name, y, b)
        if per_datum_shape is None:
            per_datum_shape = tuple(y.shape[1:])
        elif tuple(y.shape[1:]) != per_datum_shape:
            raise ProblemError(
                f"batch {b}: targets of per-datum shape {tuple(y.shape[1:])}, "
                f"earlier batches {per_datum_shape}"
            )
        if check_outputs:
            with torch.no_grad():
                output = model(X)
            validate_output(name, output, y, b)
    if check_outputs:
        largest = max(range(len(data)), key=lambda i: data[i][0].shape[0])
        independence.check_per_datum(model, data[largest][0], largest)


def _validate_targets(name: str, y: Tensor, b: int) -> None:
    if name == "CrossEntropyLoss":
        if y.dtype.is_floating_point:
            raise ProblemError(
                f"batch {b}: CrossEntropyLoss needs integer class labels; "
                "probability targets are not supported"
            )
    elif not y.dtype.is_floating_point:
        raise ProblemError(f"batch {b}: {name} needs floating-point targets")
    if name == "BCEWithLogitsLoss" and ((y < 0) | (y > 1)).any():
        raise ProblemError(f"batch {b}: BCEWithLogitsLoss targets must lie in [0, 1]")


def validate_output(name: str, output: Tensor, y: Tensor, b: int) -> None:
    """Check one batch's model output against its targets (shapes, labels, NaN)."""
    if name == "CrossEntropyLoss":
        expected = (output.shape[0], *output.shape[2:])
        if output.ndim < 2 or tuple(y.shape) != expected:
            raise ProblemError(
                f"batch {b}: CrossEntropyLoss needs logits (N, C, ...) and labels "
                f"(N, ...); got output {tuple(output.shape)}, labels {tuple(y.shape)}"
            )
        C = output.shape[1]
        if ((y < 0) | (y >= C)).any():
            raise ProblemError(f"batch {b}: class labels outside [0, {C})")
    elif output.shape != y.shape:
        raise ProblemError(
            f"batch {b}: {name} needs targets of the output's shape; got output "
            f"{tuple(output.shape)}, targets {tuple(y.shape)}"
        )
    if not torch.isfinite(output).all():
        raise ProblemError(f"batch {b}: the model's output contains NaN or inf")
