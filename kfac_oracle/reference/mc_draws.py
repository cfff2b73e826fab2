"""Many independent draws of the reference MC-KFAC block, in one pass.

The Monte-Carlo checks compare a candidate with the distribution of the reference's
MC-KFAC block at ``M`` samples per datum (:mod:`kfac_oracle.statistics`). ``R`` draws
need not be ``R`` separate runs: one run with ``R·M`` labels per datum (one seed; labels
iid from the model's predictive distribution, docs/theory.md §2) split into ``R`` groups
of ``M`` gives ``R`` independent draws with exactly that distribution. Per group ``r``
and layer, ``G_r = (R_loss/M) Σ_n Σ_{m in group r} g g ᵀ`` (expand or reduce as for
KFAC, docs/theory.md §4) and ``A`` is the same for every draw.

The layer-output gradient of a sampled vector ``v`` is linear in ``v``:
``g(v) = Σ_k v_k g(e_k)``. So one backward pass of the output's basis vectors ``e_k``
(as many as a datum has outputs) gives every sample's gradient by a contraction, instead
of backpropagating all ``R·M`` samples.

Blocks too large to densify (:mod:`kfac_oracle.operators`) are never formed:
:func:`reference_draw_factors` gives, layer by layer, the shared ``A`` and the ``R``
gradient factors ``G_r``, computed in groups of draws so that the sampled gradients
of one group stay within :data:`DRAW_CHUNK_ENTRIES` numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.conventions import kronecker_block
from kfac_oracle.flavours import BiasMode, FisherType, Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.exact import gram
from kfac_oracle.reference.kfac import KFACSteps, supported_layers


def reference_draws(
    problem: Problem,
    flavour: Flavour,
    num_draws: int,
    layers: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """``num_draws`` independent MC-KFAC blocks per layer, ``(R, P, P)`` each.

    Args:
        problem: Model, loss and data.
        flavour: The MC flavour: ``mc_samples`` is ``M`` per draw, ``seed`` seeds the
            whole stream, ``kfac_approx`` and ``bias`` as for KFAC.
        num_draws: ``R``.
        layers: Module names (default: every Linear and Conv2d).

    Returns:
        ``{layer: canonical blocks}``, draws along the first dimension.
    """
    if flavour.fisher_type is not FisherType.MC:
        raise ValueError(f"reference draws are for fisher_type 'mc', not {flavour}")
    steps = _BasisSteps()
    M, R = flavour.mc_samples, num_draws
    layers = list(supported_layers(problem.model) if layers is None else layers)
    modes, columns = {}, {}
    for name in layers:
        has_bias = getattr(problem.model.get_submodule(name), "bias", None) is not None
        modes[name] = flavour.bias if has_bias else BiasMode.NONE
        columns[name] = modes[name] == BiasMode.JOINT
    A_sums: dict[str, Tensor] = {}
    G_sums: dict[str, Tensor] = {}
    positions: dict[str, int] = {}
    for stats in steps.statistics(
        problem, layers, FisherType.MC, columns, R * M, flavour.seed
    ):
        for name, st in stats.items():
            positions[name] = st.inputs.shape[1]
            x = steps.reduce_inputs(st.inputs, flavour.kfac_approx)
            x = x.reshape(-1, x.shape[-1])
            A_sums[name] = A_sums.get(name, 0) + gram(x)
            assert st.gradients is not None
            basis = st.gradients  # (K, B, S, D): gradients of the output basis vectors
            v = steps.sampled[-1]  # (R·M, B, K): the sampled vectors, flattened
            samples = torch.einsum("mnk,knsd->mnsd", v, basis)
            g = steps.reduce_gradients(samples, flavour.kfac_approx)
            # vectors carry √(R_loss/(R·M)); a draw of M samples needs √(R_loss/M)
            g = g.reshape(R, M, *g.shape[1:]) * R**0.5
            g = g.reshape(R, -1, g.shape[-1])
            G_sums[name] = G_sums.get(name, 0) + torch.einsum("rki,rkj->rij", g, g)
    out = {}
    for name in layers:
        A = A_sums[name] / steps.normalisation(
            problem.num_data, positions[name], flavour.kfac_approx
        )
        out[name] = torch.stack(
            [kronecker_block(KroneckerFactors(A, G, modes[name])) for G in G_sums[name]]
        )
    return out


#: Sampled gradients held at once by :func:`reference_draw_factors` (numbers).
DRAW_CHUNK_ENTRIES = 2**24


@dataclass(frozen=True)
class DrawFactors:
    """``R`` reference MC-KFAC draws of one layer, ``G_r ⊗ A`` (one ``A``).

    Attributes:
        layer: The module's name.
        input_covariance: ``A`` (with the bias column for joint bias).
        gradient_covariances: ``(R, d_out, d_out)``: ``G_r`` of every draw.
        bias: The bias mode of the draws (``"none"`` for a module without bias).
    """

    layer: str
    input_covariance: Tensor
    gradient_covariances: Tensor
    bias: str


def reference_draw_factors(
    problem: Problem,
    flavour: Flavour,
    num_draws: int,
    layers: Sequence[str],
) -> Iterator[DrawFactors]:
    """The draws of :func:`reference_draws` as factors, one layer at a time.

    The same labels (one stream of ``R·M`` per datum from ``flavour.seed``) and the
    same ``G_r = (R_loss/M) Σ_n Σ_{m in group r} g gᵀ``; for reduce the basis gradients
    are summed over positions before the contraction (both are linear). Only one
    layer's ``(R, d_out, d_out)`` stack is held at a time.
    """
    if flavour.fisher_type is not FisherType.MC:
        raise ValueError(f"reference draws are for fisher_type 'mc', not {flavour}")
    steps = _BasisSteps()
    M, R = flavour.mc_samples, num_draws
    layers = list(layers)
    modes, columns = {}, {}
    for name in layers:
        has_bias = getattr(problem.model.get_submodule(name), "bias", None) is not None
        modes[name] = flavour.bias if has_bias else BiasMode.NONE
        columns[name] = modes[name] == BiasMode.JOINT
    A_sums: dict[str, Tensor] = {}
    positions: dict[str, int] = {}
    batches: list[tuple[Tensor, dict[str, Tensor]]] = []
    for stats in steps.statistics(
        problem, layers, FisherType.MC, columns, R * M, flavour.seed
    ):
        basis = {}
        for name, st in stats.items():
            positions[name] = st.inputs.shape[1]
            x = steps.reduce_inputs(st.inputs, flavour.kfac_approx)
            x = x.reshape(-1, x.shape[-1])
            A_sums[name] = A_sums.get(name, 0) + gram(x)
            assert st.gradients is not None
            basis[name] = steps.reduce_gradients(st.gradients, flavour.kfac_approx)
        batches.append((steps.sampled[-1], basis))
    for name in layers:
        A = A_sums[name] / steps.normalisation(
            problem.num_data, positions[name], flavour.kfac_approx
        )
        yield DrawFactors(name, A, _draw_gradients(batches, name, R, M), modes[name])


def _draw_gradients(
    batches: list[tuple[Tensor, dict[str, Tensor]]], name: str, R: int, M: int
) -> Tensor:
    """``(R, d_out, d_out)``: the ``G_r`` of one layer, ``R·M`` samples per datum."""
    G: Tensor | None = None
    for v, bases in batches:
        basis = bases[name]  # (K, B, S, D)
        if G is None:
            D = basis.shape[-1]
            G = basis.new_zeros(R, D, D)
        per_draw = M * basis[0].numel()
        chunk = max(1, DRAW_CHUNK_ENTRIES // max(per_draw, 1))
        for start in range(0, R, chunk):
            stop = min(R, start + chunk)
            vs = v[start * M : stop * M]  # (chunk·M, B, K)
            # vectors carry √(R_loss/(R·M)); a draw of M samples needs √(R_loss/M)
            g = torch.einsum("mnk,knsd->mnsd", vs, basis) * R**0.5
            g = g.reshape(stop - start, -1, g.shape[-1])
            G[start:stop] += torch.einsum("rki,rkj->rij", g, g)
    assert G is not None
    return G


class _BasisSteps(KFACSteps):
    """Backpropagates the output's basis vectors; keeps the sampled MC vectors."""

    def __init__(self) -> None:
        self.sampled: list[Tensor] = []

    def backpropagated_vectors(
        self,
        problem: Problem,
        fisher_type: str,
        output: Tensor,
        y: Tensor,
        labels: Tensor | None,
        mc_samples: int,
    ) -> Tensor:
        """Keep the sampled vectors ``(R·M, B, K)``; return the basis ``(K, B, …)``."""
        V = super().backpropagated_vectors(
            problem, fisher_type, output, y, labels, mc_samples
        )
        B, K = output.shape[0], output[0].numel()
        self.sampled.append(V.reshape(V.shape[0], B, K))
        eye = torch.eye(K, dtype=output.dtype, device=output.device)
        return eye.reshape(K, 1, *output.shape[1:]).expand(K, *output.shape).clone()


__all__ = [
    "DRAW_CHUNK_ENTRIES",
    "DrawFactors",
    "reference_draw_factors",
    "reference_draws",
]
