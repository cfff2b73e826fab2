"""MC-KFAC candidates for calibrating the statistics: an independent correct one, and
deliberately wrong ones.

``independent_mc_kfac`` shares no code with the reference KFAC: it works datum by
datum on an ``nn.Sequential`` split at the layer (head, layer, tail), takes the Jacobian
of the tail by ``torch.autograd.functional.jacobian``, samples labels with
``torch.distributions`` from the global generator (seeded through ``fork_rng``), and
forms the factors by explicit sums.

The wrong ones are the reference with one step changed (``KFACSteps`` subclasses).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.reference.kfac import KFACSteps

# An independent correct implementation ----------------------------------------------


def _sample(loss: nn.Module, f: Tensor, M: int) -> Tensor:
    """``M`` labels for one datum's output ``f`` (batch dim 1) from ``p(y | f)``."""
    D = torch.distributions
    if isinstance(loss, nn.CrossEntropyLoss):
        return D.Categorical(logits=f.movedim(1, -1)).sample((M,))
    if isinstance(loss, nn.BCEWithLogitsLoss):
        return D.Bernoulli(logits=f).sample((M,))
    if isinstance(loss, nn.MSELoss):
        return D.Normal(f, math.sqrt(0.5)).sample((M,))
    raise ValueError(f"unsupported loss {type(loss).__name__}")


def _output_gradients(loss: nn.Module, f: Tensor, labels: Tensor) -> Tensor:
    """``∇_f ℓ(f, ỹ_m)`` for each label, by autograd of the loss with ``sum``."""
    M = labels.shape[0]
    fs = f.detach().expand(M, *f.shape).clone().requires_grad_(True)
    # the summed loss separates over samples: its gradient holds each one's
    total = type(loss)(reduction="sum")(fs.flatten(0, 1), labels.flatten(0, 1))
    (grad,) = torch.autograd.grad(total, fs)
    return grad.reshape(M, -1)


def _patches(layer: nn.Module, a: Tensor) -> Tensor:
    """Layer inputs per position ``(S, D_in)`` for one datum (batch dim 1)."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(
            a,
            layer.kernel_size,
            dilation=layer.dilation,
            padding=layer.padding,
            stride=layer.stride,
        )
        return cols[0].T
    return a.reshape(-1, a.shape[-1])


def _positions(layer: nn.Module, g: Tensor, z_shape) -> Tensor:
    """Output gradients ``(M, Z)`` as ``(M, S, D_out)``."""
    g = g.reshape(g.shape[0], *z_shape[1:])
    if isinstance(layer, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def independent_mc_kfac(
    model: nn.Sequential,
    loss: nn.Module,
    data: list[tuple[Tensor, Tensor]],
    layer: str,
    kfac_approx: str,
    mc_samples: int,
    seed: int,
    mix_seed: bool = True,
) -> KroneckerFactors:
    """MC-KFAC factors of one layer, computed datum by datum.

    The global generator is seeded with a hash of ``seed`` (``mix_seed``), so that its
    stream differs from the reference's ``torch.Generator().manual_seed(seed)``; with
    ``mix_seed=False`` CE draws the very same labels as the reference (both end in
    ``torch.multinomial``), which makes the two comparable entry by entry.

    ``A = (1/N) Σ_n ā_n ā_nᵀ`` (reduce; ``ā_n`` the mean over positions) or
    ``(1/(N S)) Σ_{n,s} ã ãᵀ`` (expand), ``ã = [a; 1]``;
    ``G = (R/M) Σ_{n,m} ḡ ḡᵀ`` (reduce; ``ḡ`` the sum over positions) or
    ``(R/M) Σ_{n,m,s} g gᵀ`` (expand), with ``g = J_tailᵀ ∇_f ℓ(f_n, ỹ_nm)``.
    """
    i = int(layer)
    head, module, tail = model[:i], model[i], model[i + 1 :]
    X = torch.cat([x for x, _ in data])
    N = X.shape[0]
    has_bias = module.bias is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 2654435761 + 0x5EED) % 2**32 if mix_seed else seed)
        A = G = None
        terms = None
        for n in range(N):
            x = X[n : n + 1]
            with torch.no_grad():
                a = head(x)
                z = module(a)
            f = tail(z).detach()
            if terms is None:
                y_shape = (
                    f.shape[2:]
                    if isinstance(loss, nn.CrossEntropyLoss)
                    else f.shape[1:]
                )
                terms = max(math.prod(y_shape), 1)
            labels = _sample(loss, f, mc_samples)
            grads = _output_gradients(loss, f, labels)  # (M, F)
            J = torch.autograd.functional.jacobian(
                lambda zz: tail(zz).reshape(-1), z, vectorize=True
            ).reshape(f.numel(), z.numel())
            g = _positions(module, grads @ J, z.shape)  # (M, S, D_out)
            x_in = _patches(module, a)
            if has_bias:
                x_in = torch.cat([x_in, x_in.new_ones(x_in.shape[0], 1)], 1)
            if kfac_approx == "reduce":
                x_in = x_in.mean(0, keepdim=True)
                g = g.sum(1, keepdim=True)
            S = x_in.shape[0]
            a_term = x_in.T @ x_in / S
            gg = g.reshape(-1, g.shape[-1])
            g_term = gg.T @ gg / mc_samples
            A = a_term if A is None else A + a_term
            G = g_term if G is None else G + g_term
    R = 1.0 if loss.reduction == "sum" else 1.0 / (N * terms)
    return KroneckerFactors(A / N, R * G, bias="joint" if has_bias else "none")


# Wrong ones -------------------------------------------------------------------------


class Scale5Percent(KFACSteps):
    """Every MC sample's outer product 5% too large."""

    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        V = super().backpropagated_vectors(problem, fisher_type, output, y, labels, M)
        return V * math.sqrt(1.05) if fisher_type == "mc" else V


class TrueLabels10Percent(KFACSteps):
    """Each sampled label replaced by the true one with probability 0.1."""

    def labels(self, problem, mc_samples, seed):
        labels = super().labels(problem, mc_samples, seed)
        g = torch.Generator().manual_seed(seed + 7919)
        out = []
        for (_, y), lab in zip(problem.data, labels):
            mask = torch.rand(lab.shape, generator=g) < 0.1
            out.append(torch.where(mask, y.unsqueeze(0).expand_as(lab), lab))
        return out


class OneOverMMinusOne(KFACSteps):
    """``1/(M − 1)`` instead of ``1/M`` (``inf`` at ``M = 1``)."""

    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        V = super().backpropagated_vectors(problem, fisher_type, output, y, labels, M)
        if fisher_type != "mc":
            return V
        factor = M / (M - 1) if M > 1 else math.inf
        return V * math.sqrt(factor)


class CappedAt3(KFACSteps):
    """The sampler returns at most 3 labels; the average runs over those."""

    def labels(self, problem, mc_samples, seed):
        return super().labels(problem, min(mc_samples, 3), seed)

    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        m = labels.shape[0] if fisher_type == "mc" else M
        return super().backpropagated_vectors(
            problem, fisher_type, output, y, labels, m
        )


class SharedNoise(KFACSteps):
    """One noise draw per sample shared by every datum of a batch.

    MSE: ``ỹ = f + ε`` with one ``ε`` per batch; CE and BCE: inverse-CDF sampling with
    one uniform per batch. Each datum's labels have the right distribution; the data
    are dependent.
    """

    def labels(self, problem, mc_samples, seed):
        g = torch.Generator().manual_seed(seed)
        M, out = mc_samples, []
        with torch.no_grad():
            for X, _ in problem.data:
                f = problem.model(X)
                shape = (M, 1, *f.shape[1:])
                if problem.loss_name == "MSELoss":
                    eps = torch.randn(shape, generator=g, dtype=f.dtype)
                    out.append(f.unsqueeze(0) + eps * math.sqrt(0.5))
                elif problem.loss_name == "BCEWithLogitsLoss":
                    u = torch.rand(shape, generator=g, dtype=f.dtype)
                    out.append((u < f.sigmoid().unsqueeze(0)).to(f.dtype))
                else:
                    cdf = f.softmax(1).movedim(1, -1).cumsum(-1)
                    u = torch.rand((M, 1, *cdf.shape[1:-1], 1), generator=g)
                    lab = (u.to(f.dtype) > cdf.unsqueeze(0)).sum(-1)
                    out.append(lab.clamp(max=cdf.shape[-1] - 1))
        return out


class NoOneOverM(KFACSteps):
    """The ``1/M`` of the average forgotten."""

    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        V = super().backpropagated_vectors(problem, fisher_type, output, y, labels, M)
        return V * math.sqrt(M) if fisher_type == "mc" else V


class ReuseOneSample(KFACSteps):
    """One label drawn per datum and used ``M`` times."""

    def labels(self, problem, mc_samples, seed):
        labels = super().labels(problem, 1, seed)
        return [lab.expand(mc_samples, *lab.shape[1:]) for lab in labels]


class SeedIgnoredRandom(KFACSteps):
    """The seed is ignored: a fresh random seed on every call."""

    def labels(self, problem, mc_samples, seed):
        return super().labels(problem, mc_samples, int(torch.randint(0, 2**31, ())))


class SeedIgnoredFixed(KFACSteps):
    """The seed is ignored: always seed 0."""

    def labels(self, problem, mc_samples, seed):
        return super().labels(problem, mc_samples, 0)


class TrueLabels(KFACSteps):
    """The true labels instead of sampled ones (empirical Fisher)."""

    def labels(self, problem, mc_samples, seed):
        return [y.unsqueeze(0).expand(mc_samples, *y.shape) for _, y in problem.data]


class MSEVarianceOne(KFACSteps):
    """MSE labels drawn from ``N(f, I)`` instead of ``N(f, ½ I)``."""

    def labels(self, problem, mc_samples, seed):
        labels = super().labels(problem, mc_samples, seed)
        if problem.loss_name != "MSELoss":
            return labels
        out = []
        with torch.no_grad():
            for (X, _), lab in zip(problem.data, labels):
                f = problem.model(X)
                out.append(f + (lab - f) * math.sqrt(2))
        return out


WRONG = {
    "scale_5_percent": Scale5Percent,
    "true_labels_10_percent": TrueLabels10Percent,
    "one_over_M_minus_1": OneOverMMinusOne,
    "capped_at_3": CappedAt3,
    "shared_noise": SharedNoise,
    "no_one_over_M": NoOneOverM,
    "reuse_one_sample": ReuseOneSample,
    "seed_ignored_random": SeedIgnoredRandom,
    "seed_ignored_fixed": SeedIgnoredFixed,
    "true_labels": TrueLabels,
    "mse_variance_one": MSEVarianceOne,
}
