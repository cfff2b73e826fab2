"""Case properties: what a case *is*, derived from its model, data and loss.

Reports correlate failures with these properties ("fails exactly on the cases with
unequal batch sizes"). Every property is computed from the case's built problem (the
modules of the model, the shapes its layers see on the first batch, the batch sizes,
the loss module) and from its declared weight-sharing setting; nothing is kept by
hand per case, so a user's case file gets its properties too.

A property is a key with one value per case; the value is a phrase that completes
"the cases with ...", e.g. ``{"batch sizes": "unequal batch sizes"}``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from kfac_oracle.problem import Problem

if TYPE_CHECKING:
    from kfac_oracle.catalogue import Case

LAYER_KINDS = (nn.Linear, nn.Conv2d)


def _flag(value: bool, yes: str, no: str) -> str:
    return yes if value else no


def problem_properties(problem: Problem, setting: str = "none") -> dict[str, str]:
    """The properties of a problem (model, loss, data) and its weight-sharing setting.

    Keys and the phrases of their values:

    - ``batch sizes``: equal or unequal (one batch counts as equal);
    - ``batches``: their number;
    - ``data``: one datum or several;
    - ``layer inputs``: whether some Linear/Conv2d layer sees an input with more than
      two dimensions (weight sharing over positions or pixels) or all see 2-D inputs;
    - ``output``: the model output's number of dimensions (2-D or 3-D+);
    - ``setting``: the declared weight-sharing setting (none, expand, reduce);
    - ``reduction``, ``loss``: from the loss module;
    - ``layer kinds``: Linear only, or with Conv2d;
    - ``in-place``: whether some module computes in place (``inplace=True``);
    - ``conv stride``, ``conv dilation``, ``conv padding``: whether some Conv2d has a
      stride or dilation other than 1, or any padding;
    - ``bias``: whether every layer has a bias, none has, or some have.
    """
    model, data = problem.model, problem.data
    sizes = [len(X) for X, _ in data]
    layers = [m for m in model.modules() if isinstance(m, LAYER_KINDS)]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    input_ndims, output_ndim = _layer_input_ndims(model, data[0][0][:1])
    biased = [m.bias is not None for m in layers]
    if all(biased):
        bias = "bias on every layer"
    elif not any(biased):
        bias = "no bias"
    else:
        bias = "bias on some layers"
    loss_name = type(problem.loss_func).__name__
    return {
        "batch sizes": _flag(
            len(set(sizes)) > 1, "unequal batch sizes", "equal batch sizes"
        ),
        "batches": f"{len(sizes)} batch" + ("es" if len(sizes) > 1 else ""),
        "data": _flag(sum(sizes) == 1, "one datum", "several data"),
        "layer inputs": _flag(
            any(n > 2 for n in input_ndims), "3-D+ layer inputs", "2-D layer inputs"
        ),
        "output": _flag(output_ndim > 2, "3-D+ outputs", "2-D outputs"),
        "setting": "no weight sharing"
        if setting == "none"
        else f"weight sharing {setting}",
        "reduction": f"reduction {problem.loss_func.reduction}",
        "loss": f"loss {loss_name}",
        "layer kinds": _flag(bool(convs), "Conv2d layers", "Linear layers only"),
        "in-place": _flag(
            any(getattr(m, "inplace", False) is True for m in model.modules()),
            "in-place activations",
            "no in-place module",
        ),
        "conv stride": _flag(
            any(s != 1 for m in convs for s in m.stride),
            "Conv2d stride > 1",
            "no Conv2d stride > 1",
        ),
        "conv dilation": _flag(
            any(d != 1 for m in convs for d in m.dilation),
            "Conv2d dilation > 1",
            "no Conv2d dilation > 1",
        ),
        "conv padding": _flag(
            any(_padded(m) for m in convs), "Conv2d padding", "no Conv2d padding"
        ),
        "bias": bias,
    }


def case_properties(case: Case) -> dict[str, str]:
    """The properties of a catalogue case (:func:`problem_properties`; cached)."""
    cached = case.__dict__.get("_properties")
    if cached is None:
        cached = problem_properties(case.build(), case.setting)
        case.__dict__["_properties"] = cached
    return dict(cached)


def _padded(conv: nn.Conv2d) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding != "valid"
    return any(p != 0 for p in conv.padding)


def _layer_input_ndims(model: nn.Module, X: torch.Tensor) -> tuple[list[int], int]:
    """The dimensions of each Linear/Conv2d layer's input on ``X``, and the output's."""
    ndims: list[int] = []
    handles = [
        m.register_forward_hook(lambda _m, args, _out: ndims.append(args[0].ndim))
        for m in model.modules()
        if isinstance(m, LAYER_KINDS)
    ]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = model(X)
    finally:
        for h in handles:
            h.remove()
    return ndims, output.ndim
