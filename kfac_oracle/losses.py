"""Loss-specific pieces: per-datum losses, output Hessians and square roots, sampling.

Everything here is per datum and uses the sum reduction ``ℓ_n`` (docs/theory.md §1); the
reduction factor ``R`` is applied by the callers.

Output layouts: ``CrossEntropyLoss`` takes logits ``(B, C, *S)`` and labels ``(B, *S)``;
``MSELoss`` and ``BCEWithLogitsLoss`` take outputs and targets of equal shape.
"""

from __future__ import annotations

import math

import torch
from torch import Generator, Tensor


def per_datum_loss(loss_name: str, output: Tensor, y: Tensor) -> Tensor:
    """``ℓ_n`` for every datum of a batch (sum-reduced per datum), shape ``(B,)``."""
    if loss_name == "MSELoss":
        terms = (output - y) ** 2
    elif loss_name == "CrossEntropyLoss":
        terms = torch.nn.functional.cross_entropy(output, y, reduction="none")
    elif loss_name == "BCEWithLogitsLoss":
        terms = torch.nn.functional.binary_cross_entropy_with_logits(
            output, y, reduction="none"
        )
    else:
        raise ValueError(f"unsupported loss {loss_name!r}")
    return terms.reshape(terms.shape[0], -1).sum(1)


def output_gradient(loss_name: str, output: Tensor, y: Tensor) -> Tensor:
    """``∇_f ℓ_n`` for every datum, same shape as ``output``.

    MSE: ``2 (f − y)``; CE: ``softmax(f) − onehot(y)`` along dim 1; BCE: ``σ(f) − y``.
    """
    if loss_name == "MSELoss":
        return 2 * (output - y)
    if loss_name == "CrossEntropyLoss":
        onehot = torch.nn.functional.one_hot(y, output.shape[1]).to(output.dtype)
        onehot = onehot.movedim(-1, 1)
        return output.softmax(1) - onehot
    if loss_name == "BCEWithLogitsLoss":
        return output.sigmoid() - y
    raise ValueError(f"unsupported loss {loss_name!r}")


def _as_positions(loss_name: str, output: Tensor) -> Tensor:
    """View outputs as ``(B, positions, classes)`` (CE: class dim last; else 1)."""
    B = output.shape[0]
    if loss_name == "CrossEntropyLoss":
        return output.reshape(B, output.shape[1], -1).transpose(1, 2)
    return output.reshape(B, -1, 1)


def output_hessian_sqrt(loss_name: str, output: Tensor) -> Tensor:
    """Vectors whose outer products sum to each datum's output Hessian ``H_n``.

    Returns ``V`` of shape ``(K, *output.shape)`` with ``Σ_k V[k, n] V[k, n]ᵀ = H_n``
    (flattened over the datum's output entries). ``H_n`` is block-diagonal over
    positions, so each vector is supported on one position. MSE: ``√2 e_i``; BCE:
    ``√(σ(1−σ)) e_i`` (``K`` = output entries). CE: per position, ``M Q`` with
    ``M = diag(√p) − p √pᵀ`` (``M Mᵀ = diag(p) − p pᵀ`` as ``Σ p = 1``) and ``Q`` the
    first ``C − 1`` columns of the Householder reflection that maps ``√p`` to
    ``−e_C``: they span the complement of ``√p``, the null vector of ``M``, so
    ``(M Q)(M Q)ᵀ = M Mᵀ`` with ``C − 1`` columns instead of ``C`` (the rank of ``H``).
    """
    z = _as_positions(loss_name, output.detach())
    B, S, C = z.shape
    if loss_name == "CrossEntropyLoss":
        p = z.softmax(-1)
        sqrt_p = p.sqrt()
        M = torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)
        if C > 1:
            w = sqrt_p.clone()
            w[..., -1] += 1.0  # w = √p + e_C, ‖w‖² = 2 + 2 √p_C >= 2
            eye = torch.eye(C, dtype=z.dtype, device=z.device)
            reflection = eye - 2 * w.unsqueeze(-1) * w.unsqueeze(-2) / (w * w).sum(
                -1, keepdim=True
            ).unsqueeze(-1)
            M = M @ reflection[..., : C - 1]
        cols = M  # (B, S, C_row, K_col)
    elif loss_name == "MSELoss":
        cols = torch.full((B, S, 1, 1), math.sqrt(2.0), dtype=z.dtype, device=z.device)
    elif loss_name == "BCEWithLogitsLoss":
        s = z.sigmoid()
        cols = (s * (1 - s)).sqrt().unsqueeze(-1)  # (B, S, 1, 1)
    else:
        raise ValueError(f"unsupported loss {loss_name!r}")
    K = cols.shape[-1]
    # V[(s', k), n, s, c] = δ_{s s'} cols[n, s, c, k]
    eye_s = torch.eye(S, dtype=z.dtype, device=z.device)
    V = torch.einsum("tu,nuck->tknuc", eye_s, cols).reshape(S * K, B, S, C)
    if loss_name == "CrossEntropyLoss":
        V = V.transpose(2, 3)  # back to (K, B, C, S)
    return V.reshape(S * K, *output.shape)


def output_hessian(loss_name: str, output: Tensor, y: Tensor) -> Tensor:
    """``H_n = ∇²_f ℓ_n`` by autodiff, shape ``(B, F, F)`` with ``F`` output entries."""

    def loss_one(f, t):
        return per_datum_loss(loss_name, f.unsqueeze(0), t.unsqueeze(0)).sum()

    H = torch.func.vmap(torch.func.hessian(loss_one))(output.detach(), y)
    F = output[0].numel()
    return H.reshape(output.shape[0], F, F)


def sample_labels(
    loss_name: str, output: Tensor, mc_samples: int, generator: Generator
) -> Tensor:
    """Draw ``mc_samples`` labels per datum from the model's predictive distribution.

    CE: ``Categorical(softmax f)`` along dim 1; BCE: ``Bernoulli(σ(f))``; MSE:
    ``N(f, ½ I)`` (variance ½ since ``∇_f ℓ = 2 (f − ỹ)``, so ``E[∇ℓ ∇ℓᵀ] = 2 I = H``).
    Returns ``(M, *label_shape)``.
    """
    f = output.detach()
    M = mc_samples
    if loss_name == "MSELoss":
        zeros = torch.zeros((M, *f.shape), dtype=f.dtype, device=f.device)
        std = torch.as_tensor(math.sqrt(0.5), dtype=f.dtype, device=f.device)
        return f.unsqueeze(0) + torch.normal(zeros, std, generator=generator)
    if loss_name == "CrossEntropyLoss":
        probs = _as_positions(loss_name, f).reshape(-1, f.shape[1]).softmax(-1)
        draws = torch.multinomial(probs, M, replacement=True, generator=generator)
        label_shape = (f.shape[0], *f.shape[2:])
        return draws.T.reshape(M, *label_shape)
    if loss_name == "BCEWithLogitsLoss":
        probs = f.sigmoid().unsqueeze(0).expand(M, *f.shape)
        return torch.bernoulli(probs, generator=generator)
    raise ValueError(f"unsupported loss {loss_name!r}")
