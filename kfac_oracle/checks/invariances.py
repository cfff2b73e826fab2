"""Invariances any correct KFAC satisfies (notes §6), checked on the candidate alone.

Each compares the candidate with itself (float64, relative error 1e-10) under a
transformation of the problem (:mod:`kfac_oracle.checks.variants`):

- ``batch_split``: other unequal batch sizes → same blocks;
- ``shuffle``: permuted data points → same blocks;
- ``mean_vs_sum``: ``reduction="sum"`` → blocks scaled by ``1/R`` (mean cases);
- ``current_parameters``: perturbed parameters → the reference KFAC at the new
  parameters (catches stale caches);
- ``flattened_output``: MSE/BCE output ``(N, S, C)`` flattened → same blocks;
- ``bias_modes``: joint and separate bias agree on the diagonal sub-blocks (when
  the candidate offers both);
- ``mc_reproducible``: the same seed twice → identical MC results; another seed →
  different ones.
"""

from __future__ import annotations

import torch

from kfac_oracle.catalogue import Case
from kfac_oracle.checks.base import (
    EXACT_RTOL,
    CheckItem,
    CheckSession,
    RequestKey,
    Unsupported,
    capability,
    output_ndim,
    rel_error,
)
from kfac_oracle.checks.compare import masked_reference
from kfac_oracle.checks.diagnose import supported_or_raise

DETERMINISTIC = ("type-2", "empirical", "forward-only")


def _flavour(session: CheckSession, case: Case) -> tuple[str, str]:
    approx = "reduce" if case.setting == "reduce" else "expand"
    allowed = capability(session.impl, "fisher_type")
    for ft in DETERMINISTIC:
        if allowed is None or ft in allowed:
            supported_or_raise(session.impl, case, ft, approx)
            return ft, approx
    raise Unsupported("no deterministic fisher_type in capabilities")


def _compare_all(case, a, b, what, scale=1.0, skip=()):
    worst_layer, worst = None, -1.0
    for layer in case.layers:
        if layer in skip:
            continue
        if a.blocks[layer].shape != b.blocks[layer].shape:
            return "failed", None, EXACT_RTOL, f"{what}: layer {layer} changed shape"
        err = rel_error(a.blocks[layer] * scale, b.blocks[layer])
        if err > worst:
            worst_layer, worst = layer, err
    if worst_layer is None:
        raise Unsupported(
            "EKFAC is not unique for any layer here (repeated eigenvalues)"
        )
    status = "passed" if worst <= EXACT_RTOL else "failed"
    return (
        status,
        worst,
        EXACT_RTOL,
        f"{what}: worst layer {worst_layer}, relative error {worst:.3e}",
    )


def _variant_item(case: Case, name: str, variant: str, what: str) -> CheckItem:
    def run(session: CheckSession):
        ft, approx = _flavour(session, case)
        base = session.candidate(case, RequestKey(case.id, ft, approx))
        other = session.candidate(
            case, RequestKey(case.id, ft, approx, variant=variant)
        )
        scale = 1.0
        if variant == "sum":
            scale = 1.0 / session.problem(case).reduction_factor
        # EKFAC's eigenbasis is arbitrary within repeated eigenvalues: skip such layers
        skip = set()
        if session.approximation == "ekfac":
            for v in ("base", variant):
                for layer in case.layers:
                    bias = base.bias[layer] if base.bias[layer] != "none" else "joint"
                    if layer in session.ekfac_ambiguous(case, ft, approx, bias, v):
                        skip.add(layer)
        return _compare_all(case, base, other, what, scale, skip)

    return CheckItem(
        name, "invariance", case, None, run, _diagnose_variant(case, variant)
    )


def _diagnose_variant(case: Case, variant: str):
    def run(session: CheckSession) -> str:
        if variant in ("split", "shuffle"):
            return (
                "depends on how the data are batched: per-batch scaling or weighting "
                "(notes §7, pitfalls 1 and 6)"
            )
        if variant == "sum":
            return "reduction scale R not applied consistently (notes §7, pitfall 1)"
        if variant == "flatten":
            return "depends on the output's shape, not only on the loss"
        return None

    return run


def _current_parameters(case: Case) -> CheckItem:
    def run(session: CheckSession):
        ft, approx = _flavour(session, case)
        result = session.candidate(
            case, RequestKey(case.id, ft, approx, variant="perturbed")
        )
        worst, worst_layer = -1.0, None
        problem = session.problem(case, "perturbed")
        for layer in case.layers:
            bias = result.bias[layer] if result.bias[layer] != "none" else "joint"
            if layer in session.ekfac_ambiguous(case, ft, approx, bias, "perturbed"):
                continue
            ref = session.reference_blocks(case, ft, approx, bias, variant="perturbed")[
                layer
            ]
            ref = masked_reference(
                ref, result.bias[layer], problem.model.get_submodule(layer)
            )
            if ref.shape != result.blocks[layer].shape:
                continue
            err = rel_error(result.blocks[layer], ref)
            if err > worst:
                worst, worst_layer = err, layer
        if worst_layer is None:
            raise Unsupported(
                "no layer with a unique reference (EKFAC, repeated eigenvalues)"
            )
        status = "passed" if worst <= EXACT_RTOL else "failed"
        return (
            status,
            worst,
            EXACT_RTOL,
            f"perturbed parameters: worst layer {worst_layer} vs reference at the new "
            f"parameters, relative error {worst:.3e}",
        )

    def diagnose(session):
        ft, approx = _flavour(session, case)
        result = session.candidate(
            case, RequestKey(case.id, ft, approx, variant="perturbed")
        )
        base = session.candidate(case, RequestKey(case.id, ft, approx))
        bias = next(iter(result.bias.values()))
        bias = bias if bias != "none" else "joint"
        ref_new = session.reference_blocks(case, ft, approx, bias, variant="perturbed")
        ref_old = session.reference_blocks(case, ft, approx, bias)
        depends = any(not torch.allclose(ref_new[k], ref_old[k]) for k in case.layers)
        same = all(torch.equal(result.blocks[k], base.blocks[k]) for k in case.layers)
        if depends and same:
            return (
                "stale parameters: results do not follow the current parameter values"
            )
        return "differs from the reference at the new parameters as at the old ones"

    return CheckItem("current_parameters", "invariance", case, None, run, diagnose)


def _bias_modes(case: Case) -> CheckItem:
    def run(session: CheckSession):
        modes = capability(session.impl, "bias")
        if modes is None or not {"joint", "separate"} <= modes:
            raise Unsupported("candidate does not offer both joint and separate bias")
        ft, approx = _flavour(session, case)
        joint = session.candidate(case, RequestKey(case.id, ft, approx, bias="joint"))
        sep = session.candidate(case, RequestKey(case.id, ft, approx, bias="separate"))
        problem = session.problem(case)
        worst = 0.0
        for layer in case.layers:
            module = problem.model.get_submodule(layer)
            masked = masked_reference(joint.blocks[layer], sep.bias[layer], module)
            worst = max(worst, rel_error(sep.blocks[layer], masked))
        status = "passed" if worst <= EXACT_RTOL else "failed"
        return (
            status,
            worst,
            EXACT_RTOL,
            f"joint vs separate bias: relative error {worst:.3e}",
        )

    return CheckItem("bias_modes", "invariance", case, None, run)


def _mc_reproducible(case: Case) -> CheckItem:
    def run(session: CheckSession):
        approx = "reduce" if case.setting == "reduce" else "expand"
        supported_or_raise(session.impl, case, "mc", approx)
        M = 16  # discrete labels: with few samples two seeds may draw alike
        a = session.candidate(case, RequestKey(case.id, "mc", approx, M, 11))
        b = session.candidate(case, RequestKey(case.id, "mc", approx, M, 11, "repeat"))
        same = max(rel_error(a.blocks[k], b.blocks[k]) for k in case.layers)
        differ = 0.0
        for seed in (12, 13):
            c = session.candidate(case, RequestKey(case.id, "mc", approx, M, seed))
            differ = max(
                differ, *(rel_error(a.blocks[k], c.blocks[k]) for k in case.layers)
            )
        if same > 0:
            return (
                "failed",
                same,
                0.0,
                f"same seed, different MC results (relative difference {same:.3e})",
            )
        if differ == 0:
            return (
                "failed",
                differ,
                0.0,
                "another seed gave identical MC results: the seed is ignored or "
                "nothing is sampled",
            )
        return (
            "passed",
            same,
            0.0,
            f"same seed identical; another seed differs by {differ:.3e}",
        )

    def diagnose(session):
        return "MC sampling does not follow the request's seed (notes §7, pitfall 9)"

    return CheckItem("mc_reproducible", "invariance", case, None, run, diagnose)


def items(impl, case: Case) -> list[CheckItem]:
    """The invariance checks applicable to ``case``."""
    out = [
        _variant_item(case, "batch_split", "split", "re-split batches"),
        _variant_item(case, "shuffle", "shuffle", "shuffled data"),
        _current_parameters(case),
        _bias_modes(case),
        _mc_reproducible(case),
    ]
    if case.reduction == "mean":
        out.append(_variant_item(case, "mean_vs_sum", "sum", "sum reduction × R"))
    if case.loss != "CrossEntropyLoss" and output_ndim(case) > 2:
        out.append(
            _variant_item(case, "flattened_output", "flatten", "flattened output")
        )
    return out
