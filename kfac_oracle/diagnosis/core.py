"""Diagnosis: which known pitfall (docs/theory.md §7) explains a mismatch exactly.

Given the candidate's canonical block ``C`` and the reference ``B``, each hypothesis
builds what an implementation with that pitfall would return, ``B_alt``, and tests
``C = c · B_alt`` for a scalar ``c`` (least squares ``c = ⟨C, B_alt⟩ / ⟨B_alt, B_alt⟩``,
residual at the failed check's tolerance). The constant is named by :mod:`.scales`:
one named scale, a squared one, or a product of two (combined pitfalls).

The diagnosis never guesses:

- a pitfall whose block is proportional to the reference on this case (``k·B``) is
  one more named scale ``P`` of value ``k`` for a constant factor; one that changes
  nothing here (``k = 1``) explains nothing;
- when several explanations fit (two pitfalls, a pitfall and a scale, or constants
  that coincide on the case, e.g. ``N = K²``), all are listed as *ambiguous on this
  case*; readings with a named constant are preferred to one whose constant matches
  no known scale;
- when none fits, it says "no known pitfall explains this".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kfac_oracle.conventions import weight_shape_2d
from kfac_oracle.diagnosis.ekfac import ekfac_hypotheses
from kfac_oracle.diagnosis.fit import FIT_RTOL, fit_scalar, precision_diagnosis
from kfac_oracle.diagnosis.pitfalls import Hypothesis, kfac_hypotheses
from kfac_oracle.diagnosis.scales import (
    Atom,
    describe_constant,
    scale_atoms,
    scale_explanations,
)
from kfac_oracle.flavours import Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.approximations import approximation as registered

NO_PITFALL = "no known pitfall explains this"
# how :func:`~kfac_oracle.diagnosis.scales.describe_constant` says a constant is unnamed
UNNAMED = ("matching no known scale", "inconclusive on this case")


def diagnose(
    candidate: Tensor,
    problem: Problem,
    layer: str,
    fisher_type: str,
    kfac_approx: str,
    bias: str = "joint",
    mc_samples: int = 1,
    seed: int = 0,
    tolerance: float = FIT_RTOL,
    reference: Tensor | None = None,
    approximation: str = "kfac",
) -> str:
    """The pitfall(s) that explain ``candidate`` exactly, or a statement that none does.

    Each hypothesis is fitted (up to a scalar) at the ``tolerance`` of the check that
    failed, and a mismatch at the level of float32 rounding is named as such first.

    Args:
        candidate: The candidate's canonical block of ``layer``.
        problem: The problem the candidate was given.
        layer: Module name.
        fisher_type: The requested flavour.
        kfac_approx: The requested approximation.
        bias: The candidate's declared bias mode.
        mc_samples: M, for MC requests.
        seed: The seed, for MC requests.
        tolerance: The failed check's tolerance (relative Frobenius).
        reference: The block the check compared with (default: the reference of
            ``approximation``).
        approximation: The candidate's approximation: the pitfalls of ``"kfac"`` and
            ``"ekfac"`` are known; for others only a constant factor is named.
    """
    module = problem.model.get_submodule(layer)
    positions = shared_positions(problem, layer)
    mask = _separate_mask(module, candidate) if bias == "separate" else None

    def masked(B: Tensor) -> Tensor:
        return B * mask if mask is not None and B.shape == mask.shape else B

    flavour = Flavour(fisher_type, kfac_approx, bias, mc_samples, seed)
    if reference is None:
        reference = registered(approximation).blocks(problem, flavour, [layer])[layer]
    B0 = masked(reference)
    if candidate.shape == B0.shape:
        err = (candidate - B0).norm().item() / max(B0.norm().item(), 1e-300)
        precision = precision_diagnosis(err, tolerance)
        if precision:
            return precision

    def constant(
        c: float, per_batch_sums: bool | None = None, extra: list[Atom] | None = None
    ) -> str:
        atoms = scale_atoms(problem, positions, mc_samples, fisher_type, per_batch_sums)
        return describe_constant(c, scale_explanations(atoms + (extra or [])))

    c0 = fit_scalar(candidate, B0, tolerance)
    if c0 is not None and abs(c0 - 1) <= tolerance:
        return "matches the reference (no mismatch)"
    hypotheses = _hypotheses(problem, layer, flavour, positions, approximation)
    if c0 is not None:
        return constant(c0, extra=_rescaling_pitfalls(hypotheses, masked, B0))
    complete: list[str] = []  # readings whose constant is 1 or named
    unnamed: list[str] = []  # a pitfall that fits with an unnamed constant
    for hyp in hypotheses:
        B = _build(hyp, masked)
        if B is None or B.shape != candidate.shape:
            continue
        if fit_scalar(B, B0, FIT_RTOL) is not None:
            continue  # a constant factor here; the candidate is not one
        c = fit_scalar(candidate, B, tolerance)
        if c is None:
            continue
        if abs(c - 1) <= tolerance:
            complete.append(hyp.why)
            continue
        text = constant(c, hyp.per_batch_sums)
        named = not any(s in text for s in UNNAMED)
        (complete if named else unnamed).append(f"{hyp.why}, with {text}")
    fits = complete or unnamed
    if len(fits) == 1:
        return fits[0]
    if fits:
        listed = "; ".join(f"({i}) {fit}" for i, fit in enumerate(fits, 1))
        return f"ambiguous on this case, these explanations coincide: {listed}"
    if bias == "none" and getattr(module, "bias", None) is not None:
        return (
            "missing bias: the module has a bias but the result covers the weight only"
        )
    if approximation == "kfac":
        partial = _weight_block_only(candidate, B0, module, lambda c: constant(c))
        if partial:
            return partial
    return NO_PITFALL


def _build(hyp: Hypothesis, masked: Callable[[Tensor], Tensor]) -> Tensor | None:
    try:
        return masked(hyp.make())
    except Exception:  # noqa: BLE001 - a hypothesis that cannot be built is skipped
        return None


def _rescaling_pitfalls(
    hypotheses: list[Hypothesis], masked: Callable[[Tensor], Tensor], B0: Tensor
) -> list[Atom]:
    """Pitfalls that only rescale the reference on this case, as named scales.

    A pitfall whose block is ``k·B`` here (``k ≠ 1``) is one more reading of a
    constant factor: it joins the named scales as ``P1, P2, ...`` with the value
    ``k``, so that the constant is explained with it, or alongside it when they
    coincide (a per-batch reduction that equals ``T`` on this case).
    """
    atoms: list[Atom] = []
    for hyp in hypotheses:
        B = _build(hyp, masked)
        if B is None or B.shape != B0.shape:
            continue
        k = fit_scalar(B, B0, FIT_RTOL)
        if k is None or abs(k - 1) <= FIT_RTOL or k <= 0:
            continue
        symbol = f"P{len(atoms) + 1}"
        meaning = f"{hyp.why}: a factor {k:.6g} on this case"
        atoms.append(Atom(symbol, meaning, k, ((symbol, 1),)))
    return atoms


def _hypotheses(
    problem: Problem, layer: str, flavour: Flavour, positions: int, approximation: str
) -> list[Hypothesis]:
    if approximation == "kfac":
        return kfac_hypotheses(problem, layer, flavour, positions)
    if approximation == "ekfac":
        return ekfac_hypotheses(problem, layer, flavour)
    return []


def _weight_block_only(
    candidate: Tensor, B: Tensor, module: torch.nn.Module, name: Callable[[float], str]
) -> str | None:
    """The weight block off by a constant while the bias block is right."""
    if getattr(module, "bias", None) is None or candidate.shape != B.shape:
        return None
    d_out, d_in = weight_shape_2d(module)
    n_w = d_out * d_in
    if candidate.shape[0] == n_w:
        return None
    c = fit_scalar(candidate[:n_w, :n_w], B[:n_w, :n_w])
    if c is None or abs(c - 1) <= FIT_RTOL:
        return None
    Cb, Bb = candidate[n_w:, n_w:], B[n_w:, n_w:]
    if (Cb - Bb).norm() > FIT_RTOL * Bb.norm():
        return None
    return f"weight block off by {name(c)}; the bias block is right"


def _separate_mask(module, candidate: Tensor) -> Tensor:
    d_out, d_in = weight_shape_2d(module)
    n_w = d_out * d_in
    mask = torch.zeros_like(candidate)
    mask[:n_w, :n_w] = 1
    mask[n_w:, n_w:] = 1
    return mask


def shared_positions(problem: Problem, layer: str) -> int:
    """S, the number of positions sharing the layer's weight (1 without sharing)."""
    module = problem.model.get_submodule(layer)
    seen = {}

    def hook(mod, args, output):
        if isinstance(mod, torch.nn.Conv2d):
            seen["s"] = output[0, 0].numel()
        else:
            seen["s"] = output[0].numel() // output.shape[-1]

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            problem.model(problem.data[0][0][:1])
    finally:
        handle.remove()
    return seen.get("s", 1)
