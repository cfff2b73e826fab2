"""Operations: damped inverses, log-determinants, traces, scores, diagonals, spectra.

For candidates that declare ``capabilities["operations"]`` (and ``"damping"``): per
layer, each operation equals the exact value computed in float64 from the reference
block of the candidate's approximation and flavour under each declared damping
convention (docs/theory.md §10), at dampings ``λ = ρ · tr K / P`` for ``ρ`` in
``1e-6 … 1e2`` (``λ = ρ`` for ``mean_eigenvalue``). Tolerance: ``10 · P · κ · eps``
with ``κ`` the condition number of the damped matrix. Where the catalogue claims KFAC
is exact, the operations also equal those of the damped exact block. The undamped
trace, diagonal and eigenvalues equal the reference block's (``10 · P · eps``;
eigenvalues ``10 · P^{3/2} · eps``, Weyl's inequality).

``data_scores`` are the pairwise scores ``S = G K_λ⁻¹ Gᵀ`` of the case's own data
(rows of ``G``: the per-datum gradients ``g_n = ∇ ℓ_n`` of the layer, exactly by
``torch.func``), compared like the scores of the probe vectors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from kfac_oracle.capabilities import DAMPED_OPERATIONS, OPERATIONS
from kfac_oracle.catalogue import Case
from kfac_oracle.checks.compare import masked_reference, rel_error
from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.exactness import positive_claims
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.checks.registry import Target, check, family
from kfac_oracle.checks.vanishing import vanishing_layers
from kfac_oracle.contract import KroneckerFactors
from kfac_oracle.conventions import kronecker_block
from kfac_oracle.damping import (
    DampingConvention,
    block_shift,
    damped_block,
    factor_shifts,
    shifted_factors,
)
from kfac_oracle.errors import CandidateError, Unsupported
from kfac_oracle.flavours import BiasMode, Flavour, deterministic_fisher_types
from kfac_oracle.reference.exact import per_datum_gradients
from kfac_oracle.reference.operations import DenseOperations, probe_vectors
from kfac_oracle.runner.caller import OperationsKey
from kfac_oracle.runner.validate import layer_shapes

family(rank=6)

#: Dampings relative to the mean eigenvalue ``tr K / P`` of the reference block.
RELATIVE_DAMPINGS = (1e-6, 1e-4, 1e-2, 1.0, 1e2)
#: ``c`` in the tolerance ``c · P · κ · eps``.
TOLERANCE_FACTOR = 10.0
_EPS = torch.finfo(torch.float64).eps


def tolerance(condition: float, size: int) -> float:
    """``10 · P · κ · eps``: forward error of a backward-stable solve (Higham §10)."""
    return TOLERANCE_FACTOR * size * condition * _EPS


def _per_layer(name: str) -> Callable[[Case], Iterator[Target]]:
    def targets(case: Case) -> Iterator[Target]:
        for layer in case.layers:
            yield Target(name, layer)

    targets.__name__ = f"every_layer_{name}"
    return targets


def _exact_claims(case: Case) -> Iterator[Target]:
    """One target per layer and positive claim that KFAC equals an exact block."""
    for target in positive_claims(case):
        yield Target(
            f"op_{target.name}",
            target.layer,
            target.fisher_type,
            target.kfac_approx,
            target.params,
        )


# -- the request and the reference -------------------------------------------------


@dataclass
class Setup:
    """One layer's operations request and its reference.

    Attributes:
        ctx: The check's context.
        flavour: The flavour asked for (joint bias, or separate for a candidate
            that offers only that: :func:`operations_bias`).
        conventions: The declared conventions that apply to the approximation and
            are defined on the case.
    """

    ctx: CheckContext
    flavour: Flavour
    conventions: list[DampingConvention]

    @property
    def layer(self) -> str:
        """The check's layer."""
        assert self.ctx.layer is not None
        return self.ctx.layer

    @property
    def block(self) -> Tensor:
        """The reference block ``K`` of the layer."""
        return self.ctx.reference(self.flavour)[self.layer]

    @property
    def factors(self) -> KroneckerFactors | None:
        """``A`` and ``G`` with ``K = G ⊗ A`` (``None`` if the block is not one)."""
        if not self.ctx.approximation.kronecker_product:
            return None
        return self.ctx.references.factors(self.ctx.case, self.flavour)[self.layer]

    @property
    def vectors(self) -> Tensor:
        """The probe vectors of the layer, as the request carried them."""
        problem = self.ctx.problem()
        shapes = layer_shapes(problem.model, self.ctx.case.layers)
        return probe_vectors(shapes, problem.dtype, problem.device)[self.layer]

    @cached_property
    def gradients(self) -> Tensor:
        """``Gᵀ``, ``(P, N)``: the layer's per-datum gradients ``g_n`` as columns."""
        return per_datum_gradients(self.ctx.problem(), self.layer).T.contiguous()

    def probes(self, operation: str) -> Tensor:
        """The vectors an operation acts on: the data's gradients or the probes."""
        return self.gradients if operation == "data_scores" else self.vectors

    def dampings(self, convention: DampingConvention, layer: str) -> tuple[float, ...]:
        """The absolute dampings of one layer (relative ones for mean_eigenvalue)."""
        if convention is DampingConvention.MEAN_EIGENVALUE:
            return RELATIVE_DAMPINGS
        block = self.ctx.reference(self.flavour)[layer]
        mean = block.diagonal().sum().item() / block.shape[0]
        # a block that vanishes in exact arithmetic: λ on the scale of its gradients
        mean = vanishing_layers(self.ctx, self.flavour).get(layer, mean)
        mean = mean if mean > 0 else 1.0
        return tuple(rho * mean for rho in RELATIVE_DAMPINGS)

    def values(self, convention: DampingConvention) -> dict[str, Tensor]:
        """The candidate's operation values of the layer (a cached call)."""
        ctx = self.ctx
        declared = ctx.capabilities.operations or frozenset()
        f = self.flavour
        key = ctx.key(f.fisher_type, f.kfac_approx, bias=str(f.bias))
        damping = tuple(
            (layer, self.dampings(convention, layer)) for layer in ctx.case.layers
        )
        operations = tuple(op for op in OPERATIONS if op in declared)
        key = dataclasses.replace(
            key, operations=OperationsKey(str(convention), damping, operations)
        )
        return ctx.candidate(key).operations[self.layer]

    def damped(self, convention: DampingConvention, damping: float) -> Tensor:
        """The reference damped matrix ``K_λ``."""
        return damped_block(convention, damping, self.block, self.factors)


def undefined_conventions(
    ctx: CheckContext, flavour: Flavour
) -> dict[DampingConvention, str]:
    """Conventions undefined on some layer of the case, with the reason.

    ``mean_eigenvalue`` where a block is zero (``K + λ·0·I`` is singular); ``pi``
    where a factor has zero trace (``π`` is ``0`` or infinite).
    """
    out = {}
    if any(b.diagonal().sum().item() <= 0 for b in ctx.reference(flavour).values()):
        out[DampingConvention.MEAN_EIGENVALUE] = (
            "a layer has a zero block, whose mean_eigenvalue-damped matrix is singular"
        )
    vanishing = sorted(vanishing_layers(ctx, flavour))
    if vanishing:
        why = (
            f"layers {vanishing} have reduce blocks that vanish in exact arithmetic "
            "(rounding noise)"
        )
        out[DampingConvention.MEAN_EIGENVALUE] = (
            f"{why}: their mean eigenvalue is noise"
        )
        out[DampingConvention.PI] = f"{why}: π is a ratio of a factor's noise"
    if ctx.approximation.kronecker_product:
        factors = ctx.references.factors(ctx.case, flavour).values()
        if any(
            M.diagonal().sum().item() <= 0
            for f in factors
            for M in (f.input_covariance, f.gradient_covariance)
        ):
            out[DampingConvention.PI] = (
                "a layer has a Kronecker factor with zero trace, where π is undefined"
            )
    return out


def operations_bias(ctx: CheckContext) -> BiasMode:
    """The block operations are asked on: joint, or separate if only that is offered.

    Raises:
        Unsupported: If the candidate offers neither.
    """
    bias = ctx.capabilities.allowed("bias")
    if bias is None or BiasMode.JOINT in bias:
        return BiasMode.JOINT
    if BiasMode.SEPARATE in bias:
        return BiasMode.SEPARATE
    raise Unsupported(
        f"operations act on the joint or separate bias block; capabilities['bias'] "
        f"declares {sorted(bias)}"
    )


def setup(ctx: CheckContext, flavour: Flavour | None = None) -> Setup:
    """The request of the check's layer; unsupported where nothing applies.

    Factor conventions apply to Kronecker products with the joint bias only.
    """
    bias = operations_bias(ctx)
    if flavour is None:
        ft, approx = ctx.first_supported(deterministic_fisher_types())
        flavour = Flavour(ft, approx, bias)
    declared = ctx.capabilities.damping or frozenset()
    factors_defined = ctx.approximation.kronecker_product and bias == BiasMode.JOINT
    conventions = [
        c
        for c in DampingConvention
        if c in declared and (factors_defined or not c.needs_factors)
    ]
    if not conventions and declared and bias == BiasMode.SEPARATE:
        raise Unsupported(
            f"the declared conventions {sorted(declared)} damp Kronecker factors, "
            "which are defined on the joint-bias block only; the candidate offers "
            "the separate-bias block"
        )
    undefined = undefined_conventions(ctx, flavour)
    if conventions and set(conventions) <= set(undefined):
        raise Unsupported(
            "; ".join(undefined[c] for c in conventions)
            + " (the request covers every layer of the case)"
        )
    conventions = [c for c in conventions if c not in undefined]
    if not conventions:
        raise Unsupported(
            f"no declared damping convention applies to {ctx.approximation.name} "
            f"(declared {sorted(declared)}; per_factor and pi need a Kronecker "
            "product block)"
        )
    if ctx.layer in ctx.ambiguous(flavour):
        raise Unsupported(
            f"{ctx.approximation.name} is not unique on this layer (repeated "
            "eigenvalue of a factor)"
        )
    return Setup(ctx, flavour, conventions)


# -- comparing values ----------------------------------------------------------------


def expected(operation: str, dense: DenseOperations, V: Tensor) -> Tensor:
    """The exact value of a damped operation for the damped matrix ``dense``."""
    if operation == "inverse":
        return dense.inverse_product(V)
    if operation == "logdet":
        return torch.tensor(dense.logdet(), dtype=torch.float64)
    if operation in ("scores", "data_scores"):
        return dense.scores(V, V)
    raise ValueError(f"{operation!r} is not a damped operation")


def discrepancy(operation: str, value: Tensor, exact: Tensor) -> float:
    """Relative Frobenius error; for ``logdet`` the absolute error ``|Δ log det|``."""
    if operation == "logdet":
        return abs(value.item() - exact.item())
    return rel_error(value.to(torch.float64), exact)


@dataclass
class Worst:
    """The worst damping of a sweep, by error over tolerance."""

    ratio: float = -math.inf
    error: float = 0.0
    tol: float = 0.0
    where: str = ""
    loosest: float = 0.0

    def add(self, error: float, tol: float, where: str) -> None:
        """Keep the comparison if it is the worst so far (and the loosest tolerance)."""
        self.loosest = max(self.loosest, tol)
        ratio = error / tol if tol > 0 else math.inf
        if ratio > self.ratio:
            self.ratio, self.error, self.tol, self.where = ratio, error, tol, where


def sweep(
    operation: str,
    values: Tensor,
    dampings: tuple[float, ...],
    matrix: Callable[[float], Tensor | None],
    V: Tensor,
) -> Worst | None:
    """Compare the values over the sweep with the exact ones of ``matrix(λ)``.

    ``None`` when ``matrix`` has no positive definite value at some ``λ``.
    """
    worst = Worst()
    for i, lam in enumerate(dampings):
        M = matrix(lam)
        if M is None:
            return None
        dense = DenseOperations(M)
        if not dense.eigenvalues[0].item() > 0:
            return None
        size = M.shape[0]
        error = discrepancy(operation, values[i], expected(operation, dense, V))
        if operation == "logdet":
            error /= size
        tol = tolerance(dense.condition, size)
        worst.add(error, tol, f"λ = {lam:.3g} (κ = {dense.condition:.2e})")
    return worst


#: A hypothesis is named only where its tolerance is below this at every λ: a
#: matrix so ill-conditioned that ``10·P·κ·eps`` is large matches anything.
DIAGNOSIS_MAX_TOL = 1e-3


def explains(worst: Worst | None) -> bool:
    """Whether a sweep against a hypothesis fits, with tolerances that mean it."""
    return worst is not None and worst.ratio <= 1 and worst.loosest <= DIAGNOSIS_MAX_TOL


def _error_name(operation: str) -> str:
    if operation == "logdet":
        return "|Δ log det| / P"
    return "relative Frobenius error"


def compare_operation(setup: Setup, operation: str) -> Outcome:
    """One damped operation, every declared convention, over the sweep."""
    V = setup.probes(operation)
    overall = Worst()
    convention_of = {}
    for convention in setup.conventions:
        values = setup.values(convention)[operation]
        dampings = setup.dampings(convention, setup.layer)
        worst = sweep(
            operation,
            values,
            dampings,
            lambda lam, c=convention: setup.damped(c, lam),  # type: ignore[misc]
            V,
        )
        assert worst is not None, "the damped reference is positive definite"
        where = f"{convention} damping ({convention.formula}), {worst.where}"
        overall.add(worst.error, worst.tol, where)
        convention_of[where] = convention
        if worst.ratio > 1:
            break
    passed = overall.ratio <= 1
    message = (
        f"layer {setup.layer} {operation} vs reference {setup.flavour.fisher_type} "
        f"{setup.flavour.kfac_approx}, worst at {overall.where}: "
        f"{_error_name(operation)} {overall.error:.3e} "
        f"{'<=' if passed else '>'} 10·P·κ·eps = {overall.tol:.3e} "
        f"(λ/mean eigenvalue in {RELATIVE_DAMPINGS[0]:g}..{RELATIVE_DAMPINGS[-1]:g})"
    )
    if passed:
        return Outcome("passed", overall.error, overall.tol, message)
    convention = convention_of[overall.where]
    return Outcome(
        "failed",
        overall.error,
        overall.tol,
        message,
        diagnosis=diagnose_damping(setup, operation, convention),
    )


# -- diagnosis ---------------------------------------------------------------------


def hypotheses(
    setup: Setup, declared: DampingConvention
) -> list[tuple[str, Callable[[float], Tensor | None]]]:
    """Wrong damped matrices a candidate may have inverted instead, most specific first.

    Each is ``(description, λ ↦ matrix)``: the undamped block, the damping applied
    twice, one factor damped only, another convention, a transposed eigenbasis.
    """
    K, factors = setup.block, setup.factors
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    out: list[tuple[str, Callable[[float], Tensor | None]]] = [
        ("the undamped block K (λ ignored)", lambda lam: K),
    ]
    if declared.needs_factors and factors is not None:
        A, G = factors.input_covariance, factors.gradient_covariance

        def shifted(sa: float, sg: float) -> Callable[[float], Tensor]:
            def matrix(lam: float) -> Tensor:
                a, g = factor_shifts(declared, lam, A, G)
                return kronecker_block(shifted_factors(factors, sa * a, sg * g))

            return matrix

        out += [
            ("damping applied twice (each factor shift doubled)", shifted(2, 2)),
            ("damping on one factor only: A damped, G not", shifted(1, 0)),
            ("damping on one factor only: G damped, A not", shifted(0, 1)),
        ]
    else:
        trace = K.diagonal().sum().item()
        out.append(
            (
                "damping applied twice (K + 2c·I)",
                lambda lam: K + 2 * block_shift(declared, lam, trace, K.shape[0]) * eye,
            )
        )
    for other in DampingConvention:
        if other is declared or (other.needs_factors and factors is None):
            continue
        out.append(
            (
                f"the {other} convention ({other.formula}) instead of the declared "
                f"{declared} ({declared.formula})",
                lambda lam, o=other: damped_block(o, lam, K, factors),  # type: ignore[misc]
            )
        )
    ctx = setup.ctx
    if not ctx.approximation.kronecker_product:
        transposed = ctx.approximation.transposed_eigenbasis(
            ctx.problem(), setup.flavour, [setup.layer]
        )[setup.layer]
        out.append(
            (
                "a transposed eigenbasis (U_Aᵀ, U_Gᵀ in place of U_A, U_G)",
                lambda lam: damped_block(declared, lam, transposed),
            )
        )
    own = own_block(setup)
    if own is not None and not declared.needs_factors:
        out.append(
            (
                f"the candidate's own block damped by the declared {declared}: the "
                "operations are right, the block differs from the reference (see "
                "the agreement checks)",
                lambda lam: damped_block(declared, lam, own),
            )
        )
    return out


def own_block(setup: Setup) -> Tensor | None:
    """The candidate's own block of the layer (the setup's bias), if it returns one."""
    ctx, flavour = setup.ctx, setup.flavour
    try:
        result = ctx.candidate(
            ctx.key(flavour.fisher_type, flavour.kfac_approx, bias=str(flavour.bias))
        )
    except (CandidateError, Unsupported):
        return None
    returned = result.bias[setup.layer]
    if returned != BiasMode.NONE and returned != flavour.bias:
        return None
    return result.blocks[setup.layer]


def diagnose_damping(
    setup: Setup, operation: str, declared: DampingConvention
) -> str | None:
    """The wrong damped matrix whose exact values the candidate's match, if any."""
    values = setup.values(declared)[operation]
    dampings = setup.dampings(declared, setup.layer)
    V = setup.probes(operation)
    for description, matrix in hypotheses(setup, declared):
        worst = sweep(operation, values, dampings, matrix, V)
        if worst is not None and explains(worst):
            return (
                f"{operation} matches {description} at every λ of the sweep "
                f"({_error_name(operation)} {worst.error:.1e})"
            )
    if operation == "data_scores":
        return diagnose_data_scores(setup, declared)
    return None


def diagnose_data_scores(setup: Setup, declared: DampingConvention) -> str | None:
    """Data scores right but for a constant factor, or for the order of the data.

    A factor ``R²`` is the scores of the gradients of ``R·ℓ_n`` (the reduced loss)
    instead of ``ℓ_n``. The order: the permutation that matches the diagonals
    ``S_nn`` (self-influences) sorted, confirmed on the whole matrices.
    """
    values = setup.values(declared)["data_scores"].to(torch.float64)
    dampings = setup.dampings(declared, setup.layer)
    V = setup.gradients
    exact, tols = [], []
    for lam in dampings:
        dense = DenseOperations(setup.damped(declared, lam))
        exact.append(dense.scores(V, V))
        tols.append(tolerance(dense.condition, dense.matrix.shape[0]))
    if max(tols) > DIAGNOSIS_MAX_TOL:
        return None
    S = torch.stack(exact)
    c = float((values * S).sum() / (S * S).sum())
    if c and all(
        rel_error(v, c * e) <= t for v, e, t in zip(values, S, tols, strict=True)
    ):
        R = setup.ctx.problem().reduction_factor
        what = f"a constant factor {c:.6g}"
        if math.isclose(c, R * R, rel_tol=1e-6):
            what += " = R² (gradients of R·ℓ_n, the reduced loss, instead of ℓ_n)"
        elif math.isclose(c, 1 / (R * R), rel_tol=1e-6):
            what += " = 1/R²"
        return f"data_scores are the exact scores times {what}"
    order = torch.argsort(S[0].diagonal())[
        torch.argsort(torch.argsort(values[0].diagonal()))
    ]
    if torch.equal(order, torch.arange(len(order))):
        return None
    if all(
        rel_error(v, e[order][:, order]) <= t
        for v, e, t in zip(values, S, tols, strict=True)
    ):
        moved = (order != torch.arange(len(order))).nonzero().reshape(-1).tolist()
        return (
            "data_scores of the data points in another order (the candidate's "
            f"point n is datum order[n], {len(moved)} of {len(order)} moved, e.g. "
            f"{moved[0]} → {int(order[moved[0]])}); data points are numbered as in "
            "request.data, batches concatenated"
        )
    return None


# -- the checks --------------------------------------------------------------------


@check(targets=_per_layer("op_inverse"), needs={"operations": {"inverse"}})
def op_inverse(ctx: CheckContext) -> Outcome:
    """The damped inverse-vector product ``K_λ⁻¹ V`` equals the exact one.

    ``K_λ`` is the reference block damped by the declared convention (docs/theory.md
    §10), ``V`` the request's probe vectors, for every ``λ`` of the sweep.
    """
    return compare_operation(setup(ctx), "inverse")


@check(targets=_per_layer("op_logdet"), needs={"operations": {"logdet"}})
def op_logdet(ctx: CheckContext) -> Outcome:
    """``log det K_λ`` equals the exact one, for every ``λ`` of the sweep.

    Error ``|Δ log det| / P`` (a relative perturbation ``δ`` of ``K_λ`` moves it by at
    most ``P·κ·δ``).
    """
    return compare_operation(setup(ctx), "logdet")


@check(targets=_per_layer("op_scores"), needs={"operations": {"scores"}})
def op_scores(ctx: CheckContext) -> Outcome:
    """Pairwise scores ``Vᵀ K_λ⁻¹ V`` (influences ``uᵀ K_λ⁻¹ v``) are exact."""
    return compare_operation(setup(ctx), "scores")


@check(targets=_per_layer("op_data_scores"), needs={"operations": {"data_scores"}})
def op_data_scores(ctx: CheckContext) -> Outcome:
    """The data's pairwise influence scores ``S_ij = g_iᵀ K_λ⁻¹ g_j`` are exact.

    ``g_n = ∇ ℓ_n``: the gradient of datum ``n``'s loss term (without ``R``, true
    labels) over the layer's ``[rvec(W), b]``, data in request order; against
    ``Gᵀ K_λ⁻¹ G`` of the damped reference block, tolerance ``10 · P · κ · eps``
    on the relative Frobenius error, for every ``λ`` of the sweep.
    """
    return compare_operation(setup(ctx), "data_scores")


def _undamped(ctx: CheckContext, operation: str) -> tuple[Setup, Tensor]:
    """The setup and the candidate's value of an undamped operation of the layer."""
    ft, approx = ctx.first_supported(deterministic_fisher_types())
    flavour = Flavour(ft, approx, operations_bias(ctx))
    # Undamped values: any convention's request carries them (product if none).
    try:
        convention = setup(ctx, flavour).conventions[0]
    except Unsupported:
        convention = DampingConvention.PRODUCT
    s = Setup(ctx, flavour, [convention])
    return s, s.values(convention)[operation]


#: The undamped operations as functions of a dense block.
UNDAMPED: dict[str, Callable[[Tensor], Tensor]] = {
    "trace": lambda K: K.diagonal().sum(),
    "diagonal": lambda K: K.diagonal(),
    "eigenvalues": lambda K: torch.linalg.eigvalsh(K.to(torch.float64)),
}


def _relative(value: Tensor, exact: Tensor) -> float:
    scale = exact.norm().item()
    return (value - exact).norm().item() / (scale or 1.0)


def _undamped_outcome(
    s: Setup, operation: str, value: Tensor, tol: float, how: str
) -> Outcome:
    """``‖value − exact‖ / ‖exact‖ ≤ tol`` against the reference block's value.

    On failure: the candidate's own block's value (the operation is right, the block
    is not), else a constant factor (not for the trace, a single number).
    """
    exact = UNDAMPED[operation](s.block).reshape(-1)
    value = value.to(exact.dtype).reshape(-1)
    error = _relative(value, exact)
    f = s.flavour
    message = (
        f"layer {s.layer} {operation} vs reference ({f.fisher_type}, "
        f"{f.kfac_approx}): relative error {error:.3e} (tolerance {how} = {tol:.1e})"
    )
    if error <= tol:
        return Outcome("passed", error, tol, message)
    diagnosis = None
    own = own_block(s)
    if own is not None:
        own_value = UNDAMPED[operation](own).reshape(-1).to(exact.dtype)
        if _relative(value, own_value) <= tol:
            diagnosis = (
                f"the {operation} of the candidate's own block: the operation is "
                "right, the block differs from the reference (see the agreement "
                "checks)"
            )
    if diagnosis is None and operation != "trace":
        scale = exact.norm().item()
        c = float(value @ exact) / (scale**2 or 1.0)
        if c and (value - c * exact).norm().item() <= tol * abs(c) * scale:
            diagnosis = f"a constant factor {c:.6g}"
    return Outcome("failed", error, tol, message, diagnosis=diagnosis)


@check(targets=_per_layer("op_trace"), needs={"operations": {"trace"}})
def op_trace(ctx: CheckContext) -> Outcome:
    """``tr K`` (undamped) equals the reference's, to ``10 · P · eps`` relative."""
    s, value = _undamped(ctx, "trace")
    tol = tolerance(1.0, s.block.shape[0])
    return _undamped_outcome(s, "trace", value, tol, "10·P·eps")


@check(targets=_per_layer("op_diagonal"), needs={"operations": {"diagonal"}})
def op_diagonal(ctx: CheckContext) -> Outcome:
    """``diag K`` (undamped, canonical layout) equals the reference block's diagonal.

    Error ``‖Δd‖ / ‖diag K‖``, tolerance ``10 · P · eps``. A diagonal in another
    layout (cvec, bias first) is a permutation of the right one and fails.
    """
    s, value = _undamped(ctx, "diagonal")
    tol = tolerance(1.0, s.block.shape[0])
    return _undamped_outcome(s, "diagonal", value, tol, "10·P·eps")


@check(targets=_per_layer("op_eigenvalues"), needs={"operations": {"eigenvalues"}})
def op_eigenvalues(ctx: CheckContext) -> Outcome:
    """The eigenvalues of ``K`` (undamped; compared sorted) are the reference's.

    Against ``eigvalsh`` of the dense reference block. By Weyl's inequality a
    symmetric perturbation ``E`` moves each eigenvalue by at most ``‖E‖₂``, so a
    backward-stable solver errs by ``O(P · eps · ‖K‖₂)`` per eigenvalue; the
    tolerance on ``‖Δλ‖ / ‖λ‖`` is ``10 · P^{3/2} · eps``.
    """
    s, value = _undamped(ctx, "eigenvalues")
    tol = 10 * s.block.shape[0] ** 1.5 * _EPS
    return _undamped_outcome(s, "eigenvalues", value.sort().values, tol, "10·P^1.5·eps")


def _symmetric_values(s: Setup, convention: DampingConvention) -> Tensor:
    """``Vᵀ K_λ⁻¹ V`` per damping, from the scores or the inverse products."""
    values = s.values(convention)
    if "scores" in values:
        return values["scores"]
    return s.vectors.T.to(values["inverse"].dtype) @ values["inverse"]


@check(targets=_per_layer("op_spd"))
def op_spd(ctx: CheckContext) -> Outcome:
    """The damped inverse is symmetric positive definite.

    ``uᵀ K_λ⁻¹ v = vᵀ K_λ⁻¹ u`` to ``10 · P · κ · eps`` relative (κ of the reference
    ``K_λ``) and ``uᵀ K_λ⁻¹ u > 0`` for every probe ``u`` and ``λ`` of the sweep, from
    the scores (or else the inverse-vector products).
    """
    declared = ctx.capabilities.operations or frozenset()
    if not declared & {"inverse", "scores"}:
        raise Unsupported(
            "needs capabilities['operations'] to declare inverse or scores"
        )
    s = setup(ctx)
    worst = Worst()
    for convention in s.conventions:
        S = _symmetric_values(s, convention)
        for i, lam in enumerate(s.dampings(convention, s.layer)):
            Si = S[i].to(torch.float64)
            where = f"{convention} damping, λ = {lam:.3g}"
            lowest = Si.diagonal().min().item()
            if not lowest > 0:
                return Outcome(
                    "failed",
                    lowest,
                    0.0,
                    f"layer {s.layer}: uᵀ K_λ⁻¹ u = {lowest:.3e} <= 0 at {where}: the "
                    "damped inverse is not positive definite",
                )
            dense = DenseOperations(s.damped(convention, lam))
            asym = rel_error(Si, Si.T)
            worst.add(asym, tolerance(dense.condition, dense.matrix.shape[0]), where)
    passed = worst.ratio <= 1
    return Outcome(
        "passed" if passed else "failed",
        worst.error,
        worst.tol,
        f"layer {s.layer}: ‖S − Sᵀ‖/‖S‖ of S = Vᵀ K_λ⁻¹ V, worst at {worst.where}: "
        f"{worst.error:.3e} {'<=' if passed else '>'} {worst.tol:.3e}; uᵀ K_λ⁻¹ u > 0",
    )


@check(targets=_exact_claims)
def op_exact(
    ctx: CheckContext, *, fisher_type: str, kfac_approx: str, kind: str, claim: str
) -> Outcome:
    """Where KFAC is exact, its damped operations equal those of the exact block.

    For the block conventions (``product``, ``mean_eigenvalue``: defined by ``K``
    alone) and every declared damped operation, against ``K_exact`` damped the same
    way; factor conventions depend on how ``K`` is split, so are not compared.
    """
    declared = ctx.capabilities.operations or frozenset()
    operations = [op for op in DAMPED_OPERATIONS if op in declared]
    if not operations:
        raise Unsupported("no damped operation declared in capabilities['operations']")
    bias = operations_bias(ctx)
    s = setup(ctx, Flavour(fisher_type, kfac_approx, bias))
    conventions = [c for c in s.conventions if not c.needs_factors]
    if not conventions:
        raise Unsupported(
            "the exact block fixes product and mean_eigenvalue damping only; the "
            f"candidate declares {[str(c) for c in s.conventions]}"
        )
    assert ctx.layer is not None
    # Separate bias: the exact block without its weight-bias cross terms (where
    # joint KFAC is exact, separate KFAC is that).
    exact_block = masked_reference(
        ctx.references.exact_block(ctx.case, ctx.layer, kind), bias, ctx.module()
    )
    overall = Worst()
    for where, worst in _sweeps(s, conventions, operations, exact_block):
        assert worst is not None
        overall.add(worst.error, worst.tol, f"{where}, {worst.where}")
    passed = overall.ratio <= 1
    return Outcome(
        "passed" if passed else "failed",
        overall.error,
        overall.tol,
        f"layer {ctx.layer} operations vs the damped exact {kind} block ({claim}), "
        f"worst at {overall.where}: {overall.error:.3e} "
        f"{'<=' if passed else '>'} 10·P·κ·eps = {overall.tol:.3e}",
        diagnosis=None if passed else _own_block_diagnosis(s, conventions, operations),
    )


def _sweeps(
    s: Setup,
    conventions: list[DampingConvention],
    operations: list[str],
    block: Tensor,
) -> Iterator[tuple[str, Worst | None]]:
    """The candidate's values against ``block`` damped by each convention.

    Yields ``("operation, convention", worst)`` over the sweep.
    """
    for convention in conventions:
        values = s.values(convention)
        for operation in operations:
            yield (
                f"{operation}, {convention}",
                sweep(
                    operation,
                    values[operation],
                    s.dampings(convention, s.layer),
                    lambda lam, c=convention: damped_block(c, lam, block),  # type: ignore[misc]
                    s.probes(operation),
                ),
            )


def _own_block_diagnosis(
    s: Setup, conventions: list[DampingConvention], operations: list[str]
) -> str | None:
    """The operations are those of the candidate's own block, which is not exact."""
    own = own_block(s)
    if own is None:
        return None
    if not all(explains(w) for _, w in _sweeps(s, conventions, operations, own)):
        return None
    return (
        "the operations of the candidate's own block, which differs from the exact "
        "block where the claim makes KFAC exact (see the exactness checks)"
    )
