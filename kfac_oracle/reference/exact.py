"""Exact curvature matrices by autodiff: dense, per layer, and matrix-free.

With ``L(θ) = R Σ_n ℓ_n`` over the whole data set (docs/theory.md §1), ``J_n =
∂f(x_n)/∂θ``
(flattened output × P) and ``H_n = ∇²_f ℓ_n = S_n S_nᵀ`` (the closed-form symmetric
factor of :func:`kfac_oracle.losses.output_hessian_sqrt`, tested against the autodiff
Hessian of the loss; the matrix-free GGN product uses the autodiff Hessian):

- Hessian: ``∇²_θ L``;
- GGN (= type-2 Fisher for MSE, CE and BCE): ``R Σ_n J_nᵀ H_n J_n``;
- MC Fisher: ``R Σ_n (1/M) Σ_m J_nᵀ ∇_f ℓ(f_n, ỹ_nm) ∇_f ℓ(f_n, ỹ_nm)ᵀ J_n`` with
  ``ỹ_nm`` drawn by :func:`mc_labels` (seeded);
- empirical Fisher: ``R Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ`` with the true labels (curvlinops'
  scaling; the ``½‖f − y‖²`` convention halves the MSE case).

All matrices are over the chosen parameters, flattened rvec in
``named_parameters()`` order. Per-datum quantities are vectorised with
``torch.func.vmap``; the model must treat data independently (no batch norm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from kfac_oracle.losses import output_hessian_sqrt, per_datum_loss, sample_labels
from kfac_oracle.problem import Problem, validate_output
from kfac_oracle.reference.functional import ParameterSubset

CURVATURES = ("ggn", "type-2", "hessian", "empirical", "mc")


def mc_labels(problem: Problem, mc_samples: int, seed: int) -> list[Tensor]:
    """The MC labels ``ỹ`` for every batch, shape ``(M, *y.shape)`` each.

    One ``torch.Generator`` seeded with ``seed`` is consumed batch by batch, in order,
    so the exact MC Fisher and the reference MC-KFAC see the same samples.
    """
    generator = torch.Generator(device=problem.device).manual_seed(seed)
    labels = []
    with torch.no_grad():
        for b, (X, y) in enumerate(problem.data):
            output = problem.model(X)
            validate_output(problem.loss_name, output, y, b)
            labels.append(
                sample_labels(problem.loss_name, output, mc_samples, generator)
            )
    return labels


def _per_datum_jacobian(subset: ParameterSubset, params, X: Tensor) -> Tensor:
    """``J_n`` for every datum of a batch, ``(B, F, P)``."""

    def f_one(p, x):
        return subset.forward(p, x.unsqueeze(0)).reshape(-1)

    J = vmap(jacrev(f_one), in_dims=(None, 0))(params, X)
    return subset.flatten(J)


def _output_gradients(loss_name: str, output: Tensor, labels: Tensor) -> Tensor:
    """``∇_f ℓ(f_n, ỹ)`` by autodiff for labels ``(M, *y.shape)``: ``(M, B, F)``."""

    def loss_one(f, t):
        return per_datum_loss(loss_name, f.unsqueeze(0), t.unsqueeze(0)).sum()

    g = vmap(vmap(grad(loss_one)), in_dims=(None, 0))(output.detach(), labels)
    return g.reshape(labels.shape[0], output.shape[0], -1)


def _loss_gradients(
    subset: ParameterSubset, params, loss_name: str, X: Tensor, y: Tensor
) -> Tensor:
    """``∇_θ ℓ_n`` for every datum of a batch (true labels), ``(B, P)``."""

    def loss_one(p, x, t):
        f = subset.forward(p, x.unsqueeze(0))
        return per_datum_loss(loss_name, f, t.unsqueeze(0)).sum()

    return subset.flatten(vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X, y))


def per_datum_gradients(problem: Problem, module_name: str) -> Tensor:
    """``g_n = ∇ ℓ_n`` over one module's ``[rvec(W), b]`` for every datum, ``(N, P)``.

    ``ℓ_n`` is datum ``n``'s loss term without the reduction factor ``R`` (summed
    over positions), with its true label; rows in the order of ``problem.data``,
    batches concatenated (the ``data_scores`` convention, docs/theory.md §10).
    """
    subset = ParameterSubset(
        problem.model, module_parameter_names(problem.model, module_name)
    )
    theta = subset.values()
    return torch.cat(
        [
            _loss_gradients(subset, theta, problem.loss_name, X, y)
            for X, y in problem.data
        ]
    )


def gram(U: Tensor) -> Tensor:
    """The Gram matrix ``Uᵀ U`` for ``U`` of shape ``(K, P)``, exploiting symmetry.

    For ``P >= 384`` the columns are split into blocks; only the blocks on and above
    the diagonal are multiplied (each entry is still one dot product of two columns
    of ``U``) and mirrored, saving up to half the flops of ``U.T @ U``. Block size:
    about 1024 columns in single precision and 512 in double precision, where the
    mirroring copy weighs more (measured on 2 CPU cores).
    """
    P = U.shape[1]
    if P < 384:
        return U.T @ U
    target = 512 if U.element_size() >= 8 else 1024
    blocks = max(2, math.ceil(P / target))
    size = math.ceil(P / blocks)
    out = U.new_empty(P, P)
    for i in range(0, P, size):
        j = i + size
        rows = out[i:j]
        rows[:, i:] = U[:, i:j].T @ U[:, i:]
        out[j:, i:j] = rows[:, j:].T
    return out


def curvature_matrix(
    problem: Problem,
    kind: str = "ggn",
    params: Sequence[str] | None = None,
    mc_samples: int = 1,
    seed: int = 0,
) -> Tensor:
    """The dense curvature matrix ``kind`` over the parameters ``params``.

    Args:
        problem: Model, loss and data.
        kind: ``"ggn"`` (same as ``"type-2"``), ``"hessian"``, ``"empirical"`` or
            ``"mc"``.
        params: Parameter names (default: all trainable ones).
        mc_samples: M, label samples per datum (``kind="mc"``).
        seed: Seed of the MC labels (``kind="mc"``).

    Returns:
        A ``(P, P)`` matrix in the parameters' dtype and device.
    """
    if kind not in CURVATURES:
        raise ValueError(f"unknown curvature {kind!r}; choose from {CURVATURES}")
    subset = ParameterSubset(problem.model, params)
    theta = subset.values()
    R = problem.reduction_factor
    loss_name = problem.loss_name
    P = subset.size
    labels = mc_labels(problem, mc_samples, seed) if kind == "mc" else None

    if kind == "hessian":
        hess = torch.zeros(P, P, dtype=problem.dtype, device=problem.device)
        flat = subset.flatten(theta)
        for X, y in problem.data:

            def batch_loss(v, X=X, y=y):
                f = subset.forward(subset.unflatten(v), X)
                return per_datum_loss(loss_name, f, y).sum()

            hess += torch.func.hessian(batch_loss)(flat)
        return hess * R

    result: Tensor | None = None
    for b, (X, y) in enumerate(problem.data):
        with torch.no_grad():
            output = subset.forward(theta, X)
        if kind == "empirical":
            g = _loss_gradients(subset, theta, loss_name, X, y)
            result = _accumulate(result, gram(g))
            continue
        J = _per_datum_jacobian(subset, theta, X)  # (B, F, P)
        if kind in ("ggn", "type-2"):
            # H_n = S_n S_nᵀ (closed form): J_nᵀ H_n J_n = U_nᵀ U_n, U_n = S_nᵀ J_n,
            # so the batch's GGN is one symmetric Gram matrix of (K·B, P).
            S = output_hessian_sqrt(loss_name, output)  # (K, B, *output[0].shape)
            S = S.reshape(S.shape[0], S.shape[1], -1)  # (K, B, F)
            U = torch.einsum("knf,nfp->knp", S, J).reshape(-1, P)
            result = _accumulate(result, gram(U))
        else:  # mc
            assert labels is not None
            g = _output_gradients(loss_name, output, labels[b])  # (M, B, F)
            U = torch.einsum("mnf,nfp->mnp", g, J).reshape(-1, P)
            result = _accumulate(result, gram(U).div_(mc_samples))
    assert result is not None, "the problem has no data"
    return result.mul_(R)


def _accumulate(total: Tensor | None, value: Tensor) -> Tensor:
    """``total + value`` in place (``value`` when ``total`` is ``None``)."""
    return value if total is None else total.add_(value)


def module_parameter_names(model: torch.nn.Module, module_name: str) -> list[str]:
    """Names of a module's own parameters, weight before bias (canonical order)."""
    module = model.get_submodule(module_name)
    prefix = f"{module_name}." if module_name else ""
    return [prefix + n for n, _ in module.named_parameters(recurse=False)]


def curvature_block(
    problem: Problem,
    module_name: str,
    kind: str = "ggn",
    mc_samples: int = 1,
    seed: int = 0,
) -> Tensor:
    """The exact diagonal block of ``kind`` for one module, over ``[rvec(W), b]``."""
    names = module_parameter_names(problem.model, module_name)
    return curvature_matrix(problem, kind, names, mc_samples=mc_samples, seed=seed)


def ggn(problem: Problem, params: Sequence[str] | None = None) -> Tensor:
    """The dense GGN ``R Σ_n J_nᵀ H_n J_n``."""
    return curvature_matrix(problem, "ggn", params)


def hessian(problem: Problem, params: Sequence[str] | None = None) -> Tensor:
    """The dense Hessian ``∇²_θ L``."""
    return curvature_matrix(problem, "hessian", params)


def empirical_fisher(problem: Problem, params: Sequence[str] | None = None) -> Tensor:
    """The dense empirical Fisher ``R Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ``."""
    return curvature_matrix(problem, "empirical", params)


def mc_fisher(
    problem: Problem,
    mc_samples: int,
    seed: int,
    params: Sequence[str] | None = None,
) -> Tensor:
    """The dense MC Fisher with ``mc_samples`` labels per datum drawn with ``seed``."""
    return curvature_matrix(problem, "mc", params, mc_samples=mc_samples, seed=seed)


class CurvatureOperator:
    """Matrix-free products with an exact curvature matrix; never builds it.

    Each product makes one pass over the data with forward- and reverse-mode autodiff:

    - GGN: ``R Σ_n J_nᵀ (H_n (J_n v))`` via ``jvp`` → loss ``hvp`` → ``vjp``;
    - Hessian: ``∇_θ (∇_θ L · v)`` via forward-over-reverse;
    - empirical / MC Fisher: the per-datum (per-sample) losses' directional
      derivatives ``d = ∇ℓ · v`` by one ``jvp``, then ``vjp`` with weights ``R d``
      (``R d / M`` for MC).

    Args:
        problem: Model, loss and data.
        kind: One of :data:`CURVATURES`.
        params: Parameter names (default: all trainable ones).
        mc_samples: M for ``kind="mc"``.
        seed: Seed of the MC labels.
    """

    def __init__(
        self,
        problem: Problem,
        kind: str = "ggn",
        params: Sequence[str] | None = None,
        mc_samples: int = 1,
        seed: int = 0,
    ):
        if kind not in CURVATURES:
            raise ValueError(f"unknown curvature {kind!r}; choose from {CURVATURES}")
        self.problem = problem
        self.kind = kind
        self.subset = ParameterSubset(problem.model, params)
        self.mc_samples = mc_samples
        self._labels = mc_labels(problem, mc_samples, seed) if kind == "mc" else None

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``."""
        return (self.subset.size, self.subset.size)

    def matvec(self, v: Tensor) -> Tensor:
        """The product with a flat vector ``v`` of size ``P``."""
        subset, problem = self.subset, self.problem
        theta = subset.values()
        tangent = subset.unflatten(v.to(problem.dtype))
        loss_name = problem.loss_name
        R = problem.reduction_factor
        out = torch.zeros_like(v, dtype=problem.dtype)
        for b, (X, y) in enumerate(problem.data):

            def forward(p, X=X):
                return subset.forward(p, X)

            if self.kind == "hessian":

                def batch_loss(p, X=X, y=y):
                    return per_datum_loss(loss_name, subset.forward(p, X), y).sum()

                hv = jvp(grad(batch_loss), (theta,), (tangent,))[1]
                out += subset.flatten(hv)
            elif self.kind in ("ggn", "type-2"):
                f, Jv = jvp(forward, (theta,), (tangent,))[:2]

                def loss_of_f(f, y=y):
                    return per_datum_loss(loss_name, f, y).sum()

                HJv = jvp(grad(loss_of_f), (f.detach(),), (Jv,))[1]
                pullback = vjp(forward, theta)[1]
                out += subset.flatten(pullback(HJv)[0])
            else:
                if self.kind == "empirical":
                    targets, weight = y.unsqueeze(0), 1.0
                else:
                    assert self._labels is not None
                    targets, weight = self._labels[b], 1.0 / self.mc_samples

                def losses(p, X=X, targets=targets):
                    f = subset.forward(p, X)
                    f = f.unsqueeze(0).expand(targets.shape[0], *f.shape)
                    flat_f = f.reshape(-1, *f.shape[2:])
                    flat_t = targets.reshape(-1, *targets.shape[2:])
                    return per_datum_loss(loss_name, flat_f, flat_t)

                d = jvp(losses, (theta,), (tangent,))[1]
                pullback = vjp(losses, theta)[1]
                out += subset.flatten(pullback(d * weight)[0])
        return out * R

    def matmat(self, V: Tensor) -> Tensor:
        """The product with the columns of ``V`` (``(P, K)``)."""
        return torch.stack([self.matvec(v) for v in V.T], dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            v = torch.as_tensor(
                np.asarray(x).reshape(-1),
                dtype=self.problem.dtype,
                device=self.problem.device,
            )
            return self.matvec(v).detach().cpu().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np.float64)
