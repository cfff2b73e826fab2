"""Layout conventions: any result form to the canonical block (docs/theory.md §3).

Canonical: a module's block is over ``[rvec(W), b]``, with ``rvec`` the row-major
flattening of the 2-D weight view ``W ∈ R^{out × in}`` (Conv2d: ``in = C_in·kh·kw``),
which is PyTorch's ``flatten`` of the weight tensor.

- ``rvec(g aᵀ) = g ⊗ a``: a Kronecker block is ``G ⊗ A`` in rvec, ``A ⊗ G`` in cvec.
- Joint bias: ``G ⊗ Ã`` over ``rvec([W | b])``; a fixed permutation brings it to
  ``[rvec(W), b]`` (:func:`joint_to_canonical_permutation`).
- Separate bias: ``blockdiag(G ⊗ A, G_b)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfac_oracle.contract import DenseBlock, KroneckerFactors


def joint_to_canonical_permutation(d_out: int, d_in: int) -> Tensor:
    """Indices ``perm`` with ``canonical = joint[perm]``.

    The joint layout is ``rvec([W | b])`` (bias as the last column), index
    ``i (d_in + 1) + j``; the canonical layout is ``[rvec(W), b]``.
    """
    rows = torch.arange(d_out).unsqueeze(1)
    weight = (rows * (d_in + 1) + torch.arange(d_in)).reshape(-1)
    bias = torch.arange(d_out) * (d_in + 1) + d_in
    return torch.cat([weight, bias])


def cvec_to_rvec_permutation(d_out: int, d_in: int, has_bias: bool) -> Tensor:
    """Indices ``perm`` with ``rvec_block = cvec_block[perm][:, perm]``.

    cvec stacks the columns of the 2-D weight view: entry ``(i, j)`` at ``j d_out + i``;
    rvec puts it at ``i d_in + j``. The bias entries stay last.
    """
    i = torch.arange(d_out).unsqueeze(1)
    j = torch.arange(d_in).unsqueeze(0)
    perm = (j * d_out + i).reshape(-1)
    if has_bias:
        perm = torch.cat([perm, d_out * d_in + torch.arange(d_out)])
    return perm


def kronecker_block(factors: KroneckerFactors) -> Tensor:
    """The canonical block of :class:`KroneckerFactors` over ``[rvec(W), b]``.

    - ``"joint"``: ``(G ⊗ Ã)[perm][:, perm]`` with ``Ã`` of size ``d_in + 1``;
    - ``"separate"``: ``blockdiag(G ⊗ A, G_b)``, ``G_b = bias_covariance`` or ``G``;
    - ``"none"``: ``G ⊗ A`` (weight only).
    """
    A, G = factors.input_covariance, factors.gradient_covariance
    K = torch.kron(G, A)
    if factors.bias == "joint":
        perm = joint_to_canonical_permutation(G.shape[0], A.shape[0] - 1)
        return K[perm][:, perm]
    if factors.bias == "separate":
        Gb = G if factors.bias_covariance is None else factors.bias_covariance
        return torch.block_diag(K, Gb)
    if factors.bias == "none":
        return K
    raise ValueError(f"unknown bias mode {factors.bias!r}")


def weight_shape_2d(module: Any) -> tuple[int, int]:
    """``(d_out, d_in)`` of the weight's 2-D view (Conv2d: ``(C_out, C_in·kh·kw)``)."""
    w = module.weight
    assert isinstance(w, Tensor), f"{type(module).__name__} has no weight tensor"
    return int(w.shape[0]), int(w[0].numel())


def canonical_block(
    result: KroneckerFactors | DenseBlock,
    module: Any,
) -> Tensor:
    """Convert factors or a dense block to the canonical ``[rvec(W), b]`` block.

    ``module`` needs only ``weight`` (for its shape) and ``bias``; operators
    (``MatVecBlock``) are densified by the runner first.
    """
    d_out, d_in = weight_shape_2d(module)
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(result, KroneckerFactors):
        return kronecker_block(result)
    if isinstance(result, DenseBlock):
        matrix, layout = result.matrix, result.layout
    else:
        raise TypeError(
            f"unsupported result type {type(result).__name__}; expected "
            "KroneckerFactors or DenseBlock"
        )
    if layout == "rvec":
        return matrix
    if layout == "cvec":
        bias = has_bias and matrix.shape[0] == d_out * d_in + d_out
        perm = cvec_to_rvec_permutation(d_out, d_in, bias).to(matrix.device)
        return matrix[perm][:, perm]
    raise ValueError(f"unknown layout {layout!r}; expected 'rvec' or 'cvec'")
