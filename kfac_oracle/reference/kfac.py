r"""A from-scratch reference KFAC for Linear and Conv2d layers (docs/theory.md §4).

Math (rvec layout, ``G ⊗ A``; docs/theory.md §3-§4). For a layer ``z = W ã`` with
(augmented)
input ``ã`` and output ``z``, backpropagate vectors ``v`` from the model output and read
``g = ∂(vᵀ f)/∂z``:

- ``type-2``: ``v`` runs over the columns of ``√R · S_n`` with ``S_n S_nᵀ = H_n``
  (:func:`kfac_oracle.losses.output_hessian_sqrt`);
- ``mc``: ``v = √(R/M) · ∇_f ℓ(f_n, ỹ_nm)`` for ``M`` labels drawn from the model's
  predictive distribution (:func:`kfac_oracle.reference.exact.mc_labels`, seeded);
- ``empirical``: ``v = √R · ∇_f ℓ(f_n, y_n)`` (true labels);
- ``forward-only`` (FOOF): ``G = I``, no backward pass.

With weight sharing the layer sees ``S`` positions per datum (sequence positions; the
unfold patches of a Conv2d):

- expand: ``A = (1/(N·S)) Σ_{n,s} ã_{n,s} ã_{n,s}ᵀ``, ``G = Σ_{n,s,v} g g ᵀ``;
- reduce: ``ā_n = mean_s ã_{n,s}``, ``ḡ_{n,v} = Σ_s g_{n,s,v}``,
  ``A = (1/N) Σ_n ā_n ā_nᵀ``, ``G = Σ_{n,v} ḡ ḡᵀ``.

Without weight sharing (``S = 1``) both are ``A = (1/N) Σ_n ã ãᵀ``, ``G = Σ g gᵀ``.
The sums run over the whole data set (all batches), so unequal batch sizes are weighted
correctly. Bias: ``joint`` uses ``ã = [a; 1]``; ``separate`` uses ``a`` for the weight
and the bias block ``G``; ``none`` ignores the bias.

The layer output's gradient is read by adding a zero tensor ``ε`` to the output in a
forward hook and differentiating with respect to ``ε``: this survives in-place
activations downstream, which modify the sum rather than the layer's own output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.conventions import weight_shape_2d
from kfac_oracle.errors import UnsupportedLayerError
from kfac_oracle.flavours import BiasMode, FisherType, Flavour, KFACApprox
from kfac_oracle.losses import output_gradient, output_hessian_sqrt
from kfac_oracle.problem import Problem, validate_output
from kfac_oracle.reference.exact import gram, mc_labels

SUPPORTED_MODULES = (nn.Linear, nn.Conv2d)


def supported_layers(model: nn.Module) -> list[str]:
    """Names of the Linear and Conv2d modules with a trainable weight."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, SUPPORTED_MODULES) and m.weight.requires_grad
    ]


def check_layer(name: str, module: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` unless the reference defines KFAC for it.

    Conv2d with ``groups > 1`` is rejected: each group would need its own factors and
    the block is not a single Kronecker product. Padding modes other than zeros are
    rejected too.
    """
    if not isinstance(module, SUPPORTED_MODULES):
        raise UnsupportedLayerError(
            f"layer {name!r} of type {type(module).__name__} is not supported; "
            "supported: Linear, Conv2d"
        )
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"Conv2d {name!r} has groups={module.groups}: grouped convolutions "
                "have one Kronecker product per group and are not supported"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"Conv2d {name!r} has padding_mode={module.padding_mode!r}; "
                "only 'zeros' is supported"
            )


def layer_inputs(module: nn.Module, a: Tensor, bias_column: bool) -> Tensor:
    """The layer's inputs per datum and position, ``(B, S, D_in[+1])``.

    Linear: ``a`` of shape ``(B, *S, D_in)`` flattened to ``(B, S, D_in)``. Conv2d: the
    unfold patches (padding, stride and dilation respected) ``(B, L, C_in·kh·kw)``,
    whose column order matches ``rvec`` of the ``(C_out, C_in, kh, kw)`` kernel.
    With ``bias_column`` a trailing 1 is appended (``ã = [a; 1]``).
    """
    if isinstance(module, nn.Conv2d):
        a = F.pad(a, module._reversed_padding_repeated_twice)
        patches = F.unfold(
            a, module.kernel_size, dilation=module.dilation, stride=module.stride
        )
        x = patches.transpose(1, 2)
    else:
        x = a.reshape(a.shape[0], -1, a.shape[-1])
    if bias_column:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    return x


def layer_output_gradients(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradients ``(K, B, *z.shape[1:])`` as ``(K, B, S, D_out)``."""
    if isinstance(module, nn.Conv2d):
        K, B, C = g.shape[:3]
        return g.reshape(K, B, C, -1).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


@dataclass
class LayerStatistics:
    """Per-batch inputs and output gradients of one layer.

    Attributes:
        inputs: ``(B, S, D_in[+1])``.
        gradients: ``(K, B, S, D_out)``, ``None`` for forward-only.
    """

    inputs: Tensor
    gradients: Tensor | None


class KFACSteps:
    """The steps of the reference KFAC, one overridable method each.

    The reference uses this class as is; the mutation meta-tests subclass it and break
    one step (a pitfall of docs/theory.md §7) at a time.
    """

    def reduction_factor(self, problem: Problem) -> float:
        """``R`` of docs/theory.md §1."""
        return problem.reduction_factor

    def labels(self, problem: Problem, mc_samples: int, seed: int) -> list[Tensor]:
        """MC labels per batch (:func:`kfac_oracle.reference.exact.mc_labels`)."""
        return mc_labels(problem, mc_samples, seed)

    def hessian_sqrt(self, loss_name: str, output: Tensor) -> Tensor:
        """Columns of ``S_n`` with ``S_n S_nᵀ = H_n``."""
        return output_hessian_sqrt(loss_name, output)

    def output_gradient(self, loss_name: str, output: Tensor, y: Tensor) -> Tensor:
        """``∇_f ℓ(f_n, y)``."""
        return output_gradient(loss_name, output, y)

    def backpropagated_vectors(
        self,
        problem: Problem,
        fisher_type: str,
        output: Tensor,
        y: Tensor,
        labels: Tensor | None,
        mc_samples: int,
    ) -> Tensor:
        """The vectors ``v``, shape ``(K, *output.shape)``, scaled by ``√R``."""
        R = self.reduction_factor(problem)
        loss_name = problem.loss_name
        f = output.detach()
        if fisher_type == FisherType.TYPE2:
            return self.hessian_sqrt(loss_name, f) * R**0.5
        if fisher_type == FisherType.EMPIRICAL:
            return self.output_gradient(loss_name, f, y).unsqueeze(0) * R**0.5
        if fisher_type == FisherType.MC:
            assert labels is not None
            return (
                self.sampled_gradients(loss_name, f, labels) * (R / mc_samples) ** 0.5
            )
        raise ValueError(f"fisher_type {fisher_type!r} has no backpropagated vectors")

    def sampled_gradients(
        self, loss_name: str, output: Tensor, labels: Tensor
    ) -> Tensor:
        """``∇_f ℓ(f_n, ỹ_nm)`` for every sampled label set, ``(M, *output.shape)``."""
        try:
            return torch.vmap(lambda lab: self.output_gradient(loss_name, output, lab))(
                labels
            )
        except RuntimeError:  # an operation without a batching rule
            return torch.stack(
                [self.output_gradient(loss_name, output, y) for y in labels]
            )

    def layer_inputs(self, module: nn.Module, a: Tensor, bias_column: bool) -> Tensor:
        """See :func:`layer_inputs`."""
        return layer_inputs(module, a, bias_column)

    def statistics(
        self,
        problem: Problem,
        layers: Sequence[str],
        fisher_type: str,
        bias_columns: dict[str, bool],
        mc_samples: int = 1,
        seed: int = 0,
    ):
        """Yield, batch by batch, ``{layer: LayerStatistics}``.

        Raises:
            UnsupportedLayerError: If a layer is unsupported or called more than once
                per forward pass (weight tying would need the sum over calls).
        """
        model = problem.model
        modules = {name: model.get_submodule(name) for name in layers}
        for name, module in modules.items():
            check_layer(name, module)
        stochastic = FisherType.parse(fisher_type).stochastic
        labels = self.labels(problem, mc_samples, seed) if stochastic else None

        for b, (X, y) in enumerate(problem.data):
            inputs: dict[str, Tensor] = {}
            perturbations: dict[str, Tensor] = {}

            def hook(module, args, output, name, inputs=inputs, perts=perturbations):
                if name in inputs:
                    raise UnsupportedLayerError(
                        f"layer {name!r} is called more than once in one forward "
                        "pass (weight tying or reuse); KFAC for shared modules is "
                        "not supported"
                    )
                inputs[name] = args[0].detach()
                eps = torch.zeros_like(output, requires_grad=True)
                perts[name] = eps
                return output + eps

            handles = [
                m.register_forward_hook(
                    lambda mod, args, out, name=name: hook(mod, args, out, name)
                )
                for name, m in modules.items()
            ]
            try:
                with torch.enable_grad():
                    output = model(X)
            finally:
                for h in handles:
                    h.remove()
            validate_output(problem.loss_name, output.detach(), y, b)

            grads: dict[str, Tensor | None] = dict.fromkeys(layers)
            if FisherType.parse(fisher_type).info.backpropagates:
                V = self.backpropagated_vectors(
                    problem,
                    fisher_type,
                    output,
                    y,
                    None if labels is None else labels[b],
                    mc_samples,
                )
                eps_list = [perturbations[n] for n in layers]
                grads = dict(zip(layers, _batched_grad(output, eps_list, V)))

            yield {
                name: LayerStatistics(
                    inputs=self.layer_inputs(
                        modules[name], inputs[name], bias_columns[name]
                    ),
                    gradients=_optional(
                        layer_output_gradients, modules[name], grads[name]
                    ),
                )
                for name in layers
            }

    def total(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """The sums over the whole data set (one process: the sums themselves)."""
        return sums

    def num_data(self, problem: Problem) -> int:
        """``N``, the number of data of the whole data set."""
        return problem.num_data

    def normalisation(self, num_data: int, positions: int, kfac_approx: str) -> float:
        """The divisor of ``A``: ``N·S`` for expand, ``N`` for reduce."""
        return num_data * positions if kfac_approx == KFACApprox.EXPAND else num_data

    def reduce_inputs(self, x: Tensor, kfac_approx: str) -> Tensor:
        """Expand keeps every position; reduce averages them: ``ā_n = mean_s ã``."""
        return x.mean(1, keepdim=True) if kfac_approx == KFACApprox.REDUCE else x

    def reduce_gradients(self, g: Tensor, kfac_approx: str) -> Tensor:
        """Expand keeps every position; reduce sums them: ``ḡ = Σ_s g``."""
        return g.sum(2, keepdim=True) if kfac_approx == KFACApprox.REDUCE else g

    def factors(
        self,
        problem: Problem,
        flavour: Flavour | str | None = None,
        layers: Sequence[str] | None = None,
        **fields: object,
    ) -> dict[str, KroneckerFactors]:
        """KFAC factors per layer; see :func:`kfac`."""
        flavour = Flavour.of(flavour, **fields)
        fisher_type, kfac_approx = flavour.fisher_type, flavour.kfac_approx
        mc_samples, seed = flavour.mc_samples, flavour.seed
        layers = list(supported_layers(problem.model) if layers is None else layers)
        modes = {}
        for name in layers:
            module = problem.model.get_submodule(name)
            has_bias = getattr(module, "bias", None) is not None
            modes[name] = flavour.bias if has_bias else BiasMode.NONE
        bias_columns = {name: modes[name] == BiasMode.JOINT for name in layers}

        A_sums: dict[str, Tensor] = {}
        G_sums: dict[str, Tensor] = {}
        positions: dict[str, int] = {}
        for stats in self.statistics(
            problem, layers, fisher_type, bias_columns, mc_samples, seed
        ):
            for name, st in stats.items():
                positions[name] = st.inputs.shape[1]
                x = self.reduce_inputs(st.inputs, kfac_approx)
                x = x.reshape(-1, x.shape[-1])
                _accumulate(A_sums, name, gram(x))
                if st.gradients is not None:
                    g = self.reduce_gradients(st.gradients, kfac_approx)
                    g = g.reshape(-1, g.shape[-1])
                    _accumulate(G_sums, name, gram(g))

        A_sums, G_sums = self.total(A_sums), self.total(G_sums)
        num_data = self.num_data(problem)
        result = {}
        for name in layers:
            A = A_sums[name] / self.normalisation(
                num_data, positions[name], kfac_approx
            )
            if not fisher_type.info.backpropagates:
                d_out = weight_shape_2d(problem.model.get_submodule(name))[0]
                G = torch.eye(d_out, dtype=A.dtype, device=A.device)
            else:
                G = G_sums[name]
            result[name] = KroneckerFactors(
                input_covariance=A, gradient_covariance=G, bias=modes[name]
            )
        return result


def _optional(fn: Any, module: nn.Module, g: Tensor | None) -> Tensor | None:
    return None if g is None else fn(module, g)


def _batched_grad(output: Tensor, eps_list: list[Tensor], V: Tensor) -> list[Tensor]:
    """``∂(v_kᵀ f)/∂ε`` for every vector ``v_k``: one batched backward pass.

    Falls back to one backward pass per vector when an operation does not support
    batched gradients.
    """
    try:
        return list(
            torch.autograd.grad(
                output, eps_list, V, is_grads_batched=True, retain_graph=True
            )
        )
    except RuntimeError:
        per_vector = [
            torch.autograd.grad(output, eps_list, v, retain_graph=True) for v in V
        ]
        return [torch.stack(gs) for gs in zip(*per_vector, strict=True)]


def kfac(
    problem: Problem,
    flavour: Flavour | str | None = None,
    layers: Sequence[str] | None = None,
    **fields: object,
) -> dict[str, KroneckerFactors]:
    """Reference KFAC factors per layer (module docstring has the formulas).

    Args:
        problem: Model, loss and data.
        flavour: A :class:`~kfac_oracle.flavours.Flavour`, or a fisher type
            (``"type-2"``, ``"mc"``, ``"empirical"``, ``"forward-only"``); further
            fields (``kfac_approx``, ``bias``, ``mc_samples``, ``seed``) as keywords.
            Layers without a bias get ``bias="none"``.
        layers: Module names (default: every Linear and Conv2d).
        **fields: Flavour fields overriding ``flavour``'s.

    Returns:
        ``{layer: KroneckerFactors}`` with ``A`` normalised by ``N`` (expand: ``N·S``)
        and ``G`` carrying ``R``; the product ``G ⊗ A`` is the canonical block.
    """
    return KFACSteps().factors(problem, flavour, layers, **fields)


def _accumulate(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
    sums[name] = value if name not in sums else sums[name] + value
