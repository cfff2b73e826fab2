"""What a KFAC implementation with one structural pitfall returns (docs/theory.md §7).

Each :class:`Hypothesis` rebuilds the block ``B_alt`` an implementation with that
pitfall would return, from the reference steps (:class:`~kfac_oracle.reference.kfac.
KFACSteps`) with one step replaced. The diagnosis fits ``C = c · B_alt``, so every
structural pitfall is also tried *together with* a constant factor (a scale pitfall on
top of a layout error, say); the constant is named by :mod:`.scales`.

The structural pitfalls: the bias entry placed first or its 1 missing; the ``[W | b]``
layout read as ``[rvec(W), b]`` (or the converse, a reshape that scrambles the bias
entries); Kronecker order swapped or the cvec layout; Conv2d patches unfolded without
the padding, the stride or the dilation, or flattened ``(kh, kw, C_in)``; KFAC-expand
and reduce exchanged; another flavour's backpropagated vectors; only the first batch;
per-batch factors given equal weights (averaged, or summed: with ``K`` or ``K²``) over
unequal batches; the loss reduction taken per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.conventions import (
    cvec_to_rvec_permutation,
    joint_to_canonical_permutation,
    kronecker_block,
    weight_shape_2d,
)
from kfac_oracle.flavours import FisherType, Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.kfac import KFACSteps


@dataclass
class Hypothesis:
    """One explanation: the block an implementation with the pitfall returns.

    Attributes:
        why: The pitfall, as the diagnosis names it (``""``: the reference itself).
        make: Builds ``B_alt`` (lazily: most hypotheses are never needed).
        per_batch_sums: Whether ``K``/``K²`` (factors summed over batches) name its
            constant; ``None``: only where that is a constant (equal batches).
    """

    why: str
    make: Callable[[], Tensor]
    per_batch_sums: bool | None = None


def _with_bias_column(x: Tensor, bias_column: bool) -> Tensor:
    if bias_column:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    return x


class UnfoldWithoutPadding(KFACSteps):
    """Pitfall 8: Conv2d patches unfolded without the layer's padding."""

    def layer_inputs(self, module, a, bias_column):
        """Unfold ignoring ``module.padding``."""
        if not isinstance(module, torch.nn.Conv2d):
            return super().layer_inputs(module, a, bias_column)
        patches = F.unfold(
            a, module.kernel_size, dilation=module.dilation, stride=module.stride
        )
        return _with_bias_column(patches.transpose(1, 2), bias_column)


class UnfoldWithoutStride(KFACSteps):
    """Pitfall 8: Conv2d patches unfolded with stride 1 (``module.stride`` ignored).

    ``A`` then averages over every stride-1 patch, ``N·L₁`` of them for expand.
    """

    def layer_inputs(self, module, a, bias_column):
        """Unfold (with padding and dilation) at stride 1."""
        if not isinstance(module, torch.nn.Conv2d):
            return super().layer_inputs(module, a, bias_column)
        a = F.pad(a, module._reversed_padding_repeated_twice)
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation, stride=1)
        return _with_bias_column(patches.transpose(1, 2), bias_column)


class UnfoldWithoutDilation(KFACSteps):
    """Pitfall 8: Conv2d patches unfolded with dilation 1 (``dilation`` ignored)."""

    def layer_inputs(self, module, a, bias_column):
        """Unfold (with padding and stride) of an undilated kernel."""
        if not isinstance(module, torch.nn.Conv2d):
            return super().layer_inputs(module, a, bias_column)
        a = F.pad(a, module._reversed_padding_repeated_twice)
        patches = F.unfold(a, module.kernel_size, stride=module.stride)
        return _with_bias_column(patches.transpose(1, 2), bias_column)


class KernelOrderSwapped(KFACSteps):
    """Pitfall 8: patches flattened ``(kh, kw, C_in)`` instead of ``(C_in, kh, kw)``."""

    def layer_inputs(self, module, a, bias_column):
        """Reorder each patch's entries."""
        x = super().layer_inputs(module, a, False)
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            shape = (*x.shape[:-1], module.in_channels, k)
            x = x.reshape(shape).transpose(-1, -2).reshape(x.shape)
        return _with_bias_column(x, bias_column)


class PerBatchReduction(KFACSteps):
    """Pitfall 1/6: the mean reduction taken per batch, ``R_b = 1/(B_b·T)``.

    Each batch's gradient outer products then carry ``N/B_b`` times their weight: not a
    single constant over unequal batches.
    """

    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        """The reference vectors, times ``√(N/B_b)`` under the mean reduction."""
        V = super().backpropagated_vectors(problem, fisher_type, output, y, labels, M)
        if problem.reduction == "mean":
            V = V * math.sqrt(problem.num_data / output.shape[0])
        return V


CONV_STEPS = (
    (UnfoldWithoutPadding, "Conv2d patches unfolded without the padding", "padding"),
    (UnfoldWithoutStride, "Conv2d patches unfolded without the stride", "stride"),
    (UnfoldWithoutDilation, "Conv2d patches unfolded without the dilation", "dilation"),
    (
        KernelOrderSwapped,
        "Conv2d patches flattened (kh, kw, C_in), not (C_in, kh, kw)",
        None,
    ),
)


def _is_default(module: torch.nn.Conv2d, attribute: str) -> bool:
    value = getattr(module, attribute)
    if attribute == "padding":
        return value == "valid" or value in ((0, 0), 0)
    return tuple(value) == (1, 1)


def kfac_hypotheses(
    problem: Problem, layer: str, flavour: Flavour, positions: int
) -> list[Hypothesis]:
    """The structural pitfalls of KFAC that apply to this layer and request."""
    module = problem.model.get_submodule(layer)
    has_bias = getattr(module, "bias", None) is not None

    def factors(
        pb: Problem = problem,
        steps: KFACSteps | None = None,
        fisher_type: str | None = None,
        kfac_approx: str | None = None,
    ) -> KroneckerFactors:
        fl = Flavour(
            fisher_type or flavour.fisher_type,
            kfac_approx or flavour.kfac_approx,
            flavour.bias,
            flavour.mc_samples,
            flavour.seed,
        )
        return (steps or KFACSteps()).factors(pb, fl, [layer])[layer]

    def block(fisher_type: str | None = None, kfac_approx: str | None = None):
        return lambda: kronecker_block(factors(problem, None, fisher_type, kfac_approx))

    hyps: list[Hypothesis] = []
    joint = str(flavour.bias) == "joint" and has_bias
    if joint:
        hyps += _bias_hypotheses(factors)
    hyps += _layout_hypotheses(factors, module)
    if isinstance(module, torch.nn.Conv2d):
        for steps_cls, why, attribute in CONV_STEPS:
            if attribute is not None and _is_default(module, attribute):
                continue
            hyps.append(Hypothesis(why, _steps_block(factors, steps_cls)))
    if positions > 1:
        requested = str(flavour.kfac_approx)
        other = "reduce" if requested == "expand" else "expand"
        hyps.append(
            Hypothesis(
                f"KFAC-{other} computed where KFAC-{requested} was asked",
                block(kfac_approx=other),
            )
        )
    requested_ft = FisherType.parse(str(flavour.fisher_type))
    if requested_ft.info.backpropagates:
        for ft in FisherType:
            if ft == requested_ft or ft.stochastic or not ft.info.backpropagates:
                continue
            why = f"{ft.info.vectors} instead of the requested flavour"
            hyps.append(Hypothesis(why, block(fisher_type=str(ft))))
    if len(problem.data) > 1:
        hyps += _batch_hypotheses(problem, factors)
    return hyps


def _steps_block(
    factors: Callable[..., KroneckerFactors], steps_cls: type[KFACSteps]
) -> Callable[[], Tensor]:
    return lambda: kronecker_block(factors(steps=steps_cls()))


def _bias_hypotheses(factors: Callable[..., KroneckerFactors]) -> list[Hypothesis]:
    """Pitfall 5 with ``bias="joint"``: where the bias entry of ``ã`` goes."""

    def bias_first() -> Tensor:
        f = factors()
        A = f.input_covariance
        n = A.shape[0]
        order = torch.cat([torch.tensor([n - 1]), torch.arange(n - 1)])
        f.input_covariance = A[order][:, order]
        return kronecker_block(f)

    def bias_zero() -> Tensor:
        f = factors()
        f.input_covariance[-1, :] = 0
        f.input_covariance[:, -1] = 0
        return kronecker_block(f)

    def joint_layout() -> Tensor:
        f = factors()
        return torch.kron(f.gradient_covariance, f.input_covariance)

    def permuted_twice() -> Tensor:
        f = factors()
        perm = joint_to_canonical_permutation(
            f.gradient_covariance.shape[0], f.input_covariance.shape[0] - 1
        )
        return kronecker_block(f)[perm][:, perm]

    return [
        Hypothesis("bias entry placed first in the augmented input [1; a]", bias_first),
        Hypothesis(
            "missing 1 in the augmented input [a; 1] (bias column zero)", bias_zero
        ),
        Hypothesis(
            "bias entries scrambled: the [W | b] block (bias in every row) "
            "read as [rvec(W), b] without reordering",
            joint_layout,
        ),
        Hypothesis(
            "bias entries scrambled: the [rvec(W), b] block reshaped as if it were "
            "[W | b] (reordered twice)",
            permuted_twice,
        ),
    ]


def _layout_hypotheses(
    factors: Callable[..., KroneckerFactors], module: torch.nn.Module
) -> list[Hypothesis]:
    """Pitfall 4: Kronecker order and vectorisation."""
    d_out, d_in = weight_shape_2d(module)

    def swapped() -> Tensor:
        f = factors()
        return permuted_canonical(
            torch.kron(f.input_covariance, f.gradient_covariance), f
        )

    def cvec() -> Tensor:
        B = kronecker_block(factors())
        perm = cvec_to_rvec_permutation(d_out, d_in, B.shape[0] > d_out * d_in)
        inv = torch.argsort(perm)
        return B[inv][:, inv]

    return [
        Hypothesis(
            "Kronecker order swapped (A ⊗ G in rvec, i.e. the cvec layout)", swapped
        ),
        Hypothesis("block in cvec (column-stacking) layout declared as rvec", cvec),
    ]


def _batch_hypotheses(
    problem: Problem, factors: Callable[..., KroneckerFactors]
) -> list[Hypothesis]:
    """Pitfalls 1 and 6: how batches are combined."""
    first = Problem(problem.model, problem.loss_func, problem.data[:1])

    def equal_weights() -> Tensor:
        per_batch = [
            factors(pb=Problem(problem.model, problem.loss_func, [batch]))
            for batch in problem.data
        ]
        f = per_batch[0]
        f.input_covariance = torch.stack([p.input_covariance for p in per_batch]).mean(
            0
        )
        f.gradient_covariance = torch.stack(
            [p.gradient_covariance for p in per_batch]
        ).mean(0)
        return kronecker_block(f)

    return [
        Hypothesis(
            "only the first batch used", lambda: kronecker_block(factors(pb=first))
        ),
        Hypothesis(
            "per-batch factors given equal weights over unequal batches (averaged, "
            "not weighted by batch size)",
            equal_weights,
            per_batch_sums=True,
        ),
        Hypothesis(
            "the mean reduction taken per batch (1/B_b instead of 1/N: batch b "
            "weighted by N/B_b)",
            lambda: kronecker_block(factors(steps=PerBatchReduction())),
        ),
    ]


def permuted_canonical(K: Tensor, f: KroneckerFactors) -> Tensor:
    """A Kronecker product over the layout of ``f`` brought to ``[rvec(W), b]``."""
    if f.bias == "joint":
        perm = joint_to_canonical_permutation(
            f.gradient_covariance.shape[0], f.input_covariance.shape[0] - 1
        )
        if K.shape[0] == perm.numel():
            return K[perm][:, perm]
    if f.bias == "separate":
        Gb = f.gradient_covariance if f.bias_covariance is None else f.bias_covariance
        return torch.block_diag(K, Gb)
    return K
