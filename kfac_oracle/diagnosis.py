"""Diagnosis: which known pitfall (docs/theory.md §7) explains a mismatch exactly.

Given the candidate's canonical block ``C`` and the reference ``B``, each hypothesis
builds what an implementation with that pitfall would return, ``B_alt``, and tests
``C = c · B_alt`` for a scalar ``c`` (least squares ``c = ⟨C, B_alt⟩ / ⟨B_alt, B_alt⟩``,
residual ``≤ 1e-8 ‖C‖``). A hypothesis that fits is reported, with the constant named
when it is one of the problem's scales (N, T, N·T, 2, M, S, a batch size).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kfac_oracle.conventions import (
    cvec_to_rvec_permutation,
    joint_to_canonical_permutation,
    kronecker_block,
    weight_shape_2d,
)
from kfac_oracle.flavours import FisherType, Flavour
from kfac_oracle.problem import Problem
from kfac_oracle.reference.kfac import KFACSteps

FIT_RTOL = 1e-10
# A mismatch this small (relative) is rounding, not a pitfall: float32 has eps 1.2e-7,
# and accumulating n terms in float32 gives errors up to about n·eps.
FLOAT32_LEVEL = 1e-5


def precision_diagnosis(error: float, tolerance: float) -> str | None:
    """Name rounding as the cause of a failed comparison, if the error is that small.

    A float64 candidate that computes in float32 (or accumulates in a lower precision)
    agrees with the reference to about float32 rounding; say so, instead of naming a
    pitfall that does not apply.
    """
    if not tolerance < error <= FLOAT32_LEVEL:
        return None
    eps = torch.finfo(torch.float32).eps
    return (
        f"agrees with the reference to {error:.1e}, the size of float32 rounding "
        f"(eps {eps:.1e}): computed in float32 (or a lower precision) although the "
        "problem is float64?"
    )


class UnfoldWithoutPadding(KFACSteps):
    """Pitfall 8: Conv2d patches unfolded without the layer's padding."""

    def layer_inputs(self, module, a, bias_column):
        """Unfold ignoring ``module.padding``."""
        if not isinstance(module, torch.nn.Conv2d):
            return super().layer_inputs(module, a, bias_column)
        patches = torch.nn.functional.unfold(
            a, module.kernel_size, dilation=module.dilation, stride=module.stride
        )
        x = patches.transpose(1, 2)
        if bias_column:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return x


class KernelOrderSwapped(KFACSteps):
    """Pitfall 8: patches flattened ``(kh, kw, C_in)`` instead of ``(C_in, kh, kw)``."""

    def layer_inputs(self, module, a, bias_column):
        """Reorder each patch's entries."""
        x = super().layer_inputs(module, a, False)
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            shape = (*x.shape[:-1], module.in_channels, k)
            x = x.reshape(shape).transpose(-1, -2).reshape(x.shape)
        if bias_column:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return x


def fit_scalar(C: Tensor, B: Tensor, rtol: float = FIT_RTOL) -> float | None:
    """``c`` with ``C = c · B`` to a relative Frobenius residual ``rtol``, or ``None``.

    Diagnoses fit at the tolerance of the check that failed, so a failed record is
    never explained as "matches the reference".
    """
    if C.shape != B.shape:
        return None
    denom = (B * B).sum()
    if denom == 0:
        return None
    c = ((C * B).sum() / denom).item()
    if (C - c * B).norm() <= rtol * max(C.norm().item(), 1e-300):
        return c
    return None


def named_scales(problem: Problem, positions: int, mc_samples: int) -> dict[str, float]:
    """Scales an implementation may get wrong, by name (docs/theory.md §7)."""
    N = problem.num_data
    T = problem.loss_terms_per_datum
    scales = {
        "2 (MSELoss Hessian 2·I, or MC variance ½)": 2.0,
        "N (reduction over the data)": float(N),
        "T (loss terms per datum: mean over N instead of N·T)": float(T),
        "N·T (the mean reduction ignored)": float(N * T),
        "2·T (MSE factor 2 and mean over output entries)": 2.0 * T,
    }
    if mc_samples > 1:
        scales["M (MC samples: 1/M missing or applied twice)"] = float(mc_samples)
    if positions > 1:
        scales["S (shared positions: expand/reduce normalisation)"] = float(positions)
        scales["S² (shared positions)"] = float(positions**2)
    for b, (X, _) in enumerate(problem.data):
        scales[f"N/B_{b} (batch {b} of size {len(X)} treated as the data set)"] = (
            N / len(X)
        )
    return {k: v for k, v in scales.items() if v != 1.0}


def name_scalar(c: float, scales: dict[str, float], rtol: float = 1e-8) -> str:
    """Describe a constant factor by the scale it matches (to ``rtol``), if any."""
    matches = []
    for name, s in scales.items():
        for value, how in ((s, "too large by"), (1 / s, "too small by")):
            dist = abs(c - value) / abs(value)
            if dist <= rtol:
                matches.append((dist, how, name))
    if not matches:
        return f"a constant factor {c:.6g} matching no known scale"
    best = min(d for d, _, _ in matches)
    # scales that coincide in this problem (e.g. S = T) are all named
    tied = [(how, name) for d, how, name in matches if d <= best + 1e-12]
    how = tied[0][0]
    return f"a constant factor {how} " + " = ".join(name for _, name in tied)


def _alt_blocks(
    problem: Problem,
    layer: str,
    fisher_type: str,
    kfac_approx: str,
    bias: str,
    mc_samples: int,
    seed: int,
) -> list[tuple[str, Callable[[], Tensor]]]:
    """Hypotheses: (explanation, lazily built alternative block)."""
    steps = KFACSteps()
    module = problem.model.get_submodule(layer)

    def ref(pb=problem, ft=fisher_type, approx=kfac_approx, b=bias):
        flavour = Flavour(ft, approx, b, mc_samples, seed)
        f = steps.factors(pb, flavour, [layer])[layer]
        return f

    def block(**kw):
        return lambda: kronecker_block(ref(**kw))

    hyps = [("", block())]
    if bias == "joint" and getattr(module, "bias", None) is not None:

        def bias_first():
            f = ref()
            A = f.input_covariance
            order = torch.cat(
                [torch.tensor([A.shape[0] - 1]), torch.arange(A.shape[0] - 1)]
            )
            f.input_covariance = A[order][:, order]
            return kronecker_block(f)

        hyps.append(
            ("bias entry placed first in the augmented input [1; a]", bias_first)
        )

        def bias_zero():
            f = ref()
            f.input_covariance[-1, :] = 0
            f.input_covariance[:, -1] = 0
            return kronecker_block(f)

        hyps.append(
            ("missing 1 in the augmented input [a; 1] (bias column zero)", bias_zero)
        )

    d_out, d_in = weight_shape_2d(module)

    def swapped():
        f = ref()
        return _permuted_canonical(
            torch.kron(f.input_covariance, f.gradient_covariance), f
        )

    def cvec():
        B = kronecker_block(ref())
        has_b = B.shape[0] > d_out * d_in
        perm = cvec_to_rvec_permutation(d_out, d_in, has_b)
        inv = torch.argsort(perm)
        return B[inv][:, inv]

    hyps.append(
        ("Kronecker order swapped (A ⊗ G in rvec, i.e. the cvec layout)", swapped)
    )
    hyps.append(("block in cvec (column-stacking) layout declared as rvec", cvec))
    if isinstance(module, torch.nn.Conv2d):
        for steps_cls, why in (
            (UnfoldWithoutPadding, "Conv2d patches unfolded without the padding"),
            (
                KernelOrderSwapped,
                "Conv2d patches flattened (kh, kw, C_in), not (C_in, kh, kw)",
            ),
        ):
            hyps.append(
                (
                    why,
                    lambda cls=steps_cls: kronecker_block(
                        cls().factors(
                            problem,
                            Flavour(fisher_type, kfac_approx, bias, mc_samples, seed),
                            [layer],
                        )[layer]
                    ),
                )
            )
    other = "reduce" if kfac_approx == "expand" else "expand"
    hyps.append(
        (
            f"KFAC-{other} computed where KFAC-{kfac_approx} was asked",
            block(approx=other),
        )
    )
    requested = FisherType.parse(fisher_type)
    if requested.info.backpropagates:
        for ft in FisherType:
            if ft == requested or ft.stochastic or not ft.info.backpropagates:
                continue
            why = f"{ft.info.vectors} instead of the requested flavour"
            hyps.append((why, block(ft=ft)))
    if len(problem.data) > 1:
        first = Problem(problem.model, problem.loss_func, problem.data[:1])
        hyps.append(("only the first batch used", block(pb=first)))

        def equal_weights():
            per_batch = [
                ref(pb=Problem(problem.model, problem.loss_func, [batch]))
                for batch in problem.data
            ]
            f = per_batch[0]
            f.input_covariance = sum(p.input_covariance for p in per_batch) / len(
                per_batch
            )
            f.gradient_covariance = sum(p.gradient_covariance for p in per_batch) / len(
                per_batch
            )
            return kronecker_block(f)

        hyps.append(
            (
                "per-batch factors averaged with equal weights over unequal batches",
                equal_weights,
            )
        )
    return hyps


def _permuted_canonical(K: Tensor, f) -> Tensor:
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
    """The pitfall that explains ``candidate`` exactly, or a statement that none does.

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
        reference: The block the check compared with (default: reference KFAC).
        approximation: The candidate's approximation; KFAC pitfalls are tried for
            ``"kfac"`` only.
    """
    module = problem.model.get_submodule(layer)
    positions = shared_positions(problem, layer)
    scales = named_scales(problem, positions, mc_samples)
    if bias == "separate":
        mask = _separate_mask(module, candidate)
    else:
        mask = None
    if reference is not None:
        ref = reference * mask if mask is not None else reference
        if candidate.shape == ref.shape:
            err = (candidate - ref).norm().item() / max(ref.norm().item(), 1e-300)
            precision = precision_diagnosis(err, tolerance)
            if precision:
                return precision
    hypotheses = _alt_blocks(
        problem, layer, fisher_type, kfac_approx, bias, mc_samples, seed
    )
    if reference is not None:
        hypotheses[0] = ("", lambda: reference)
        if approximation != "kfac":  # the pitfalls below are those of KFAC
            hypotheses = hypotheses[:1]
    for why, make in hypotheses:
        try:
            B = make()
        except Exception:  # noqa: BLE001 - a hypothesis that cannot be built is skipped
            continue
        if mask is not None and B.shape == mask.shape:
            B = B * mask
        c = fit_scalar(candidate, B, tolerance)
        if c is None:
            continue
        exact_scale = abs(c - 1) <= tolerance
        if not why and exact_scale:
            return "matches the reference (no mismatch)"
        if not why:
            return name_scalar(c, scales)
        return why if exact_scale else f"{why}, with {name_scalar(c, scales)}"
    if bias == "none" and getattr(module, "bias", None) is not None:
        return (
            "missing bias: the module has a bias but the result covers the weight only"
        )
    partial = _weight_block_only(
        candidate,
        problem,
        layer,
        fisher_type,
        kfac_approx,
        bias,
        mc_samples,
        seed,
        scales,
    )
    return partial or "no known pitfall explains this"


def _weight_block_only(
    candidate, problem, layer, fisher_type, kfac_approx, bias, mc_samples, seed, scales
) -> str | None:
    """The weight block off by a constant while the bias block is right."""
    module = problem.model.get_submodule(layer)
    if getattr(module, "bias", None) is None or bias == "none":
        return None
    f = KFACSteps().factors(
        problem, Flavour(fisher_type, kfac_approx, bias, mc_samples, seed), [layer]
    )
    B = kronecker_block(f[layer])
    d_out, d_in = weight_shape_2d(module)
    n_w = d_out * d_in
    c = fit_scalar(candidate[:n_w, :n_w], B[:n_w, :n_w])
    if c is None or abs(c - 1) <= FIT_RTOL:
        return None
    Cb, Bb = candidate[n_w:, n_w:], B[n_w:, n_w:]
    if (Cb - Bb).norm() > FIT_RTOL * Bb.norm():
        return None
    return f"weight block off by {name_scalar(c, scales)}; the bias block is right"


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
