"""Invariances any correct KFAC satisfies (docs/theory.md §6), on the candidate alone.

Each compares the candidate with itself (or with the reference at new parameters) under
a transformation of the problem (:mod:`kfac_oracle.checks.variants`), float64, relative
Frobenius error 1e-10:

- ``batch_split``: other unequal batch sizes → the same blocks;
- ``shuffle``: permuted data points → the same blocks;
- ``mean_vs_sum``: ``reduction="sum"`` → blocks scaled by ``1/R`` (mean cases);
- ``current_parameters``: perturbed parameters → the reference at the new
  parameters (catches stale caches);
- ``flattened_output``: an MSE/BCE output ``(N, S, C)`` flattened → the same blocks;
- ``bias_modes``: joint and separate bias agree on the diagonal sub-blocks (for
  candidates offering both);
- ``mc_reproducible``: the same seed twice → the same MC results; another seed →
  different ones.

Where the candidate is compared with itself (``batch_split``, ``shuffle``,
``mean_vs_sum``, ``flattened_output``), a block below ``ε`` (the candidate's machine
epsilon) times the case's largest block counts as zero to rounding. In a float32 run
the tolerance of each layer is its measured rounding tolerance
(:func:`layer_tolerance`).

Blocks too large to densify are compared matrix-free
(:func:`kfac_oracle.checks.matrixfree.operator_error`): exactly from the Kronecker
factors where both sides have them (identical factors give exactly 0, as identical
dense blocks do), else with Gaussian probes (``ΔK = 0`` gives exactly 0; a nonzero
``ΔK`` is estimated without bias).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from kfac_oracle import kronecker_statistics as ks
from kfac_oracle.catalogue import Case
from kfac_oracle.checks.compare import EXACT_RTOL, masked_reference, rel_error
from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.matrixfree import (
    block_size_of,
    frobenius_norm,
    operator_error,
    scaled_operator,
)
from kfac_oracle.checks.outcome import Outcome, verdict
from kfac_oracle.checks.registry import Target, check, family
from kfac_oracle.diagnosis import fit_scalar, precision_diagnosis
from kfac_oracle.errors import Unsupported
from kfac_oracle.flavours import FisherType, Flavour, deterministic_fisher_types
from kfac_oracle.operators import KroneckerOperator, is_operator
from kfac_oracle.runner.validate import CandidateResult

family(rank=4)

DIAGNOSES = {
    "split": "depends on how the data are batched: per-batch scaling or weighting "
    "(docs/theory.md §7, pitfalls 1 and 6)",
    "shuffle": "depends on how the data are batched: per-batch scaling or weighting "
    "(docs/theory.md §7, pitfalls 1 and 6)",
    "sum": "reduction scale R not applied consistently (docs/theory.md §7, pitfall 1)",
    "flatten": "depends on the output's shape, not only on the loss",
}


def _applies(case: Case, variant: str) -> bool:
    if variant == "sum":
        return case.reduction == "mean"
    if variant == "flatten":
        return case.loss != "CrossEntropyLoss" and case.output_ndim > 2
    return True


def _variant_targets(
    name: str, variant: str, what: str
) -> Callable[[Case], Iterator[Target]]:
    def targets(case: Case) -> Iterator[Target]:
        if _applies(case, variant):
            yield Target(name, params={"variant": variant, "what": what})

    return targets


def _unique_layers(
    ctx: CheckContext,
    base: CandidateResult,
    flavour: Flavour,
    variants: tuple[str, ...],
) -> list[str]:
    """Layers with a unique reference in every variant (no repeated eigenvalues)."""
    layers = []
    for layer in ctx.case.layers:
        f = flavour.replace(bias=ctx.reference_bias(base.bias[layer]))
        if not any(layer in ctx.ambiguous(f, v) for v in variants):
            layers.append(layer)
    return layers


def _block_error(
    candidate: Any, reference: Any, bias_mode: str, module: nn.Module
) -> float:
    """``‖C − B‖_F / ‖B‖_F``: entrywise, or matrix-free for operators."""
    if is_operator(candidate) or is_operator(reference):
        return operator_error(candidate, reference, bias_mode, module, EXACT_RTOL)
    return rel_error(candidate, reference)


def _same_shape(a: Any, b: Any) -> bool:
    if is_operator(a) or is_operator(b):
        if isinstance(a, KroneckerOperator) and isinstance(b, KroneckerOperator):
            return ks.layout(a) == ks.layout(b)
        return block_size_of(a) == block_size_of(b)
    return a.shape == b.shape


def layer_tolerance(ctx: CheckContext, flavour: Flavour, layer: str) -> float:
    """``1e-10`` in float64; a float32 run's measured rounding tolerance of the layer.

    In float32 the tolerance of the base case's reference for ``flavour``
    (:mod:`kfac_oracle.rounding`): the invariances compare float32 results with
    float32 results, or (perturbed parameters) with the reference of a problem that
    rounds like the base one.
    """
    if ctx.caller.dtype == torch.float64:
        return EXACT_RTOL
    return ctx.references.rounding(ctx.case, flavour)[layer].tolerance


def _worst_ratio(
    errors: dict[str, float], tolerances: dict[str, float]
) -> tuple[str, float, float]:
    """``(layer, error, tolerance)`` of the layer with the largest error/tolerance."""
    layer = max(errors, key=lambda k: errors[k] / tolerances[k])
    return layer, errors[layer], tolerances[layer]


def _compare_with_itself(ctx: CheckContext, *, variant: str, what: str) -> Outcome:
    """The candidate under ``variant`` equals itself (``sum``: scaled by ``1/R``).

    Error ``‖K_base − K_variant‖_F / max(‖K_variant‖_F, ε · max_l ‖K_l‖_F)`` per
    layer, ``ε`` the machine epsilon of the candidate's dtype: a block that is zero
    in exact arithmetic but rounding noise in practice (keys of attention under
    KFAC-reduce, whose position-summed gradient vanishes by the softmax's shift
    invariance) is compared at the rounding level of the case, not with its own
    noise.
    """
    ft, approx = ctx.first_supported(deterministic_fisher_types())
    base = ctx.candidate(ctx.key(ft, approx))
    other = ctx.candidate(ctx.key(ft, approx, variant=variant))
    scale = 1.0 / ctx.problem().reduction_factor if variant == "sum" else 1.0
    layers = _unique_layers(ctx, base, Flavour(ft, approx), ("base", variant))
    if not layers:
        raise Unsupported(
            "EKFAC is not unique for any layer here (repeated eigenvalues)"
        )
    errors: dict[str, float] = {}
    norms = {layer: frobenius_norm(other.blocks[layer]) for layer in layers}
    floor = float(torch.finfo(ctx.caller.dtype).eps) * max(norms.values())
    for layer in layers:
        b, o = base.blocks[layer], other.blocks[layer]
        if not _same_shape(b, o):
            return Outcome(
                "failed", None, EXACT_RTOL, f"{what}: layer {layer} changed shape"
            )
        if is_operator(b) or is_operator(o):
            err = _block_error(
                scaled_operator(b, scale), o, other.bias[layer], ctx.module(layer)
            )
        else:
            err = rel_error(b * scale, o)
        if norms[layer] < floor:  # zero to rounding: relative to the floor instead
            err = err * norms[layer] / floor if norms[layer] > 0 else err / floor
        errors[layer] = err
    tolerances = {
        layer: layer_tolerance(
            ctx, Flavour(ft, approx, ctx.reference_bias(base.bias[layer])), layer
        )
        for layer in layers
    }
    worst_layer, worst, tol = _worst_ratio(errors, tolerances)
    return verdict(
        worst,
        tol,
        f"{what}: worst layer {worst_layer}, relative error {worst:.3e}",
    )


def _diagnose_variant(
    ctx: CheckContext, outcome: Outcome, *, variant: str, what: str
) -> str | None:
    if outcome.error is not None:
        precision = precision_diagnosis(outcome.error, outcome.tolerance or EXACT_RTOL)
        if precision:
            return precision.replace("with the reference", "with itself")
    return DIAGNOSES.get(variant)


@check(
    targets=_variant_targets("batch_split", "split", "re-split batches"),
    diagnose=_diagnose_variant,
    matrix_free=True,
    float32=True,
)
def batch_split(ctx: CheckContext, *, variant: str, what: str) -> Outcome:
    """Re-splitting the data into other unequal batches leaves the blocks unchanged."""
    return _compare_with_itself(ctx, variant=variant, what=what)


@check(
    targets=_variant_targets("shuffle", "shuffle", "shuffled data"),
    diagnose=_diagnose_variant,
    matrix_free=True,
    float32=True,
)
def shuffle(ctx: CheckContext, *, variant: str, what: str) -> Outcome:
    """Permuting the data points (and re-splitting them) leaves the blocks unchanged."""
    return _compare_with_itself(ctx, variant=variant, what=what)


def current_parameters_targets(case: Case) -> Iterator[Target]:
    """One target per case."""
    yield Target("current_parameters")


def _diagnose_stale(ctx: CheckContext, outcome: Outcome) -> str:
    if outcome.error is not None:
        precision = precision_diagnosis(outcome.error, outcome.tolerance or EXACT_RTOL)
        if precision:
            return precision
    ft, approx = ctx.first_supported(deterministic_fisher_types())
    moved = ctx.candidate(ctx.key(ft, approx, variant="perturbed"))
    base = ctx.candidate(ctx.key(ft, approx))
    flavour = Flavour(ft, approx, ctx.reference_bias(next(iter(moved.bias.values()))))
    ref_new = ctx.reference(flavour, "perturbed")
    ref_old = ctx.reference(flavour)
    layers = ctx.case.layers
    depends = any(_differ(ctx, ref_new[k], ref_old[k], k) for k in layers)
    same = all(_identical(ctx, moved.blocks[k], base.blocks[k], k) for k in layers)
    if depends and same:
        return "stale parameters: results do not follow the current parameter values"
    if ctx.approximation.name == "kfac":
        stale = _stale_factor(ctx, moved, flavour)
        if stale:
            return stale
    return "differs from the reference at the new parameters as at the old ones"


def _differ(ctx: CheckContext, new: Any, old: Any, layer: str) -> bool:
    """``not allclose(new, old)`` (matrix-free: relative difference above 1e-8)."""
    if is_operator(new) or is_operator(old):
        module = ctx.module(layer)
        mode = getattr(new, "factors", None)
        bias = mode.bias if mode is not None else "joint"
        return _block_error(new, old, bias, module) > 1e-8
    return not torch.allclose(new, old)


def _identical(ctx: CheckContext, a: Any, b: Any, layer: str) -> bool:
    """``a`` and ``b`` are the same block (matrix-free: a difference of exactly 0)."""
    if is_operator(a) or is_operator(b):
        if not _same_shape(a, b):
            return False
        module = ctx.module(layer)
        bias = getattr(getattr(b, "factors", None), "bias", "joint")
        return _block_error(a, b, bias, module) == 0.0
    return torch.equal(a, b)


def _stale_factor(
    ctx: CheckContext, moved: CandidateResult, flavour: Flavour
) -> str | None:
    """One factor from the old parameters, the other fresh (a half-stale cache)."""
    from kfac_oracle.conventions import kronecker_block
    from kfac_oracle.reference.kfac import KFACSteps

    new = KFACSteps().factors(ctx.problem("perturbed"), flavour, ctx.case.layers)
    old = KFACSteps().factors(ctx.problem(), flavour, ctx.case.layers)
    for layer in ctx.case.layers:
        f_new, f_old = new[layer], old[layer]
        for stale, mixed in (
            (
                "input factor A",
                dataclasses.replace(f_new, input_covariance=f_old.input_covariance),
            ),
            (
                "gradient factor G",
                dataclasses.replace(
                    f_new, gradient_covariance=f_old.gradient_covariance
                ),
            ),
        ):
            moved_block = moved.blocks[layer]
            if is_operator(moved_block):
                if _stale_operator(ctx, moved_block, mixed, f_new, layer):
                    return (
                        f"stale {stale} (layer {layer}): computed at the old "
                        "parameters, the other factor at the new ones "
                        "(docs/theory.md §7, pitfall 10)"
                    )
                continue
            block = masked_reference(
                kronecker_block(mixed), moved.bias[layer], ctx.module(layer)
            )
            fresh = masked_reference(
                kronecker_block(f_new), moved.bias[layer], ctx.module(layer)
            )
            if torch.allclose(block, fresh):
                continue
            if fit_scalar(moved.blocks[layer], block, EXACT_RTOL) is not None:
                return (
                    f"stale {stale} (layer {layer}): computed at the old parameters, "
                    "the other factor at the new ones (docs/theory.md §7, pitfall 10)"
                )
    return None


def _stale_operator(
    ctx: CheckContext, moved: Any, mixed: Any, fresh: Any, layer: str
) -> bool:
    """Whether a large Kronecker block is a multiple of the half-stale factors."""
    if not isinstance(moved, KroneckerOperator):
        return False
    module = ctx.module(layer)
    half = KroneckerOperator(mixed, moved.d_out, moved.d_in)
    new = KroneckerOperator(fresh, moved.d_out, moved.d_in)
    if ks.layout(half) != ks.layout(moved):
        return False
    if _block_error(half, new, fresh.bias, module) <= 1e-8:
        return False
    return ks.fit_scalar(moved, half, EXACT_RTOL) is not None


@check(
    targets=current_parameters_targets,
    diagnose=_diagnose_stale,
    matrix_free=True,
    float32=True,
)
def current_parameters(ctx: CheckContext) -> Outcome:
    """After the parameters move, the candidate equals the reference at the new values.

    Catches results cached by model identity, shapes or names, or computed once.
    """
    ft, approx = ctx.first_supported(deterministic_fisher_types())
    result = ctx.candidate(ctx.key(ft, approx, variant="perturbed"))
    problem = ctx.problem("perturbed")
    errors: dict[str, float] = {}
    tolerances: dict[str, float] = {}
    for layer in ctx.case.layers:
        flavour = Flavour(ft, approx, ctx.reference_bias(result.bias[layer]))
        if layer in ctx.ambiguous(flavour, "perturbed"):
            continue
        ref = ctx.reference(flavour, "perturbed")[layer]
        module = problem.model.get_submodule(layer)
        block = result.blocks[layer]
        if is_operator(ref) or is_operator(block):
            if block_size_of(block) != block_size_of(ref):
                continue
            err = _block_error(block, ref, result.bias[layer], module)
        else:
            ref = masked_reference(ref, result.bias[layer], module)
            if ref.shape != block.shape:
                continue
            err = rel_error(block, ref)
        errors[layer] = err
        tolerances[layer] = layer_tolerance(ctx, flavour, layer)
    if not errors:
        raise Unsupported(
            "no layer with a unique reference (EKFAC, repeated eigenvalues)"
        )
    worst_layer, worst, tol = _worst_ratio(errors, tolerances)
    return verdict(
        worst,
        tol,
        f"perturbed parameters: worst layer {worst_layer} vs reference at the new "
        f"parameters, relative error {worst:.3e}",
    )


def bias_modes_targets(case: Case) -> Iterator[Target]:
    """One target per case."""
    yield Target("bias_modes")


@check(
    targets=bias_modes_targets,
    needs={"bias": {"joint", "separate"}},
    matrix_free=True,
    float32=True,
)
def bias_modes(ctx: CheckContext) -> Outcome:
    """Joint and separate bias give the same weight-weight and bias-bias blocks."""
    ft, approx = ctx.first_supported(deterministic_fisher_types())
    joint = ctx.candidate(ctx.key(ft, approx, bias="joint"))
    sep = ctx.candidate(ctx.key(ft, approx, bias="separate"))
    problem = ctx.problem()
    errors: dict[str, float] = {}
    tolerances: dict[str, float] = {}
    for layer in ctx.case.layers:
        module = problem.model.get_submodule(layer)
        s_block, j_block = sep.blocks[layer], joint.blocks[layer]
        if is_operator(s_block) or is_operator(j_block):
            err = _block_error(s_block, j_block, sep.bias[layer], module)
        else:
            masked = masked_reference(j_block, sep.bias[layer], module)
            err = rel_error(s_block, masked)
        errors[layer] = err
        # both sides round: twice the joint block's tolerance
        tolerances[layer] = 2 * layer_tolerance(ctx, Flavour(ft, approx), layer)
    if ctx.caller.dtype == torch.float64:
        tolerances = dict.fromkeys(errors, EXACT_RTOL)
    _, worst, tol = _worst_ratio(errors, tolerances)
    return verdict(worst, tol, f"joint vs separate bias: relative error {worst:.3e}")


def mc_reproducible_targets(case: Case) -> Iterator[Target]:
    """One target per case with sampling variance, with the case's approximation.

    Cases whose claims say sampling has no variance (``mc_exact``) are left out:
    there another seed must give the same result.
    """
    if any(
        c.statement == "mc_exact"
        for layer in case.layers
        for c in case.claims_for(layer)
    ):
        return
    approx = "reduce" if case.setting == "reduce" else "expand"
    yield Target("mc_reproducible", fisher_type=str(FisherType.MC), kfac_approx=approx)


def _diagnose_seed(ctx: CheckContext, outcome: Outcome, **_: object) -> str:
    return (
        "MC sampling does not follow the request's seed (docs/theory.md §7, pitfall 9)"
    )


MC_REPRODUCIBLE_SAMPLES = (
    16  # discrete labels: with few samples two seeds may draw alike
)


@check(
    targets=mc_reproducible_targets,
    diagnose=_diagnose_seed,
    matrix_free=True,
    float32=True,
)
def mc_reproducible(
    ctx: CheckContext, *, fisher_type: str, kfac_approx: str
) -> Outcome:
    """The same seed gives the same MC result; another seed a different one."""
    M = MC_REPRODUCIBLE_SAMPLES
    layers = ctx.case.layers
    a = ctx.candidate(ctx.key(fisher_type, kfac_approx, M, 11))
    b = ctx.candidate(ctx.key(fisher_type, kfac_approx, M, 11, repeat=1))

    def error(x: CandidateResult, y: CandidateResult, k: str) -> float:
        return _block_error(x.blocks[k], y.blocks[k], y.bias[k], ctx.module(k))

    same = max(error(a, b, k) for k in layers)
    differ = 0.0
    for seed in (12, 13):
        c = ctx.candidate(ctx.key(fisher_type, kfac_approx, M, seed))
        differ = max(differ, *(error(a, c, k) for k in layers))
    if same > 0:
        return Outcome(
            "failed",
            same,
            0.0,
            f"same seed, different MC results (relative difference {same:.3e})",
        )
    if differ == 0:
        return Outcome(
            "failed",
            differ,
            0.0,
            "another seed gave identical MC results: the seed is ignored or nothing "
            "is sampled",
        )
    return Outcome(
        "passed",
        same,
        0.0,
        f"same seed identical; another seed differs by {differ:.3e}",
    )


@check(
    targets=_variant_targets("mean_vs_sum", "sum", "sum reduction × R"),
    diagnose=_diagnose_variant,
    matrix_free=True,
    float32=True,
)
def mean_vs_sum(ctx: CheckContext, *, variant: str, what: str) -> Outcome:
    """With ``reduction="sum"`` the blocks are the mean case's scaled by ``1/R``."""
    return _compare_with_itself(ctx, variant=variant, what=what)


@check(
    targets=_variant_targets("flattened_output", "flatten", "flattened output"),
    diagnose=_diagnose_variant,
    matrix_free=True,
    float32=True,
)
def flattened_output(ctx: CheckContext, *, variant: str, what: str) -> Outcome:
    """Flattening an MSE/BCE output ``(N, S, C)`` to ``(N, S·C)`` changes nothing."""
    return _compare_with_itself(ctx, variant=variant, what=what)
