"""Check records, items, and the session that calls a candidate safely and caches.

A *check item* is one check on one case (and layer): ``check_name[case_id-layer]``.
Running it yields a :class:`CheckRecord`. The :class:`CheckSession` owns everything
shared between items of one run: the exact references and reference KFAC blocks
(cached per case), and the candidate's results (cached per request). Each candidate call
gets a deep copy of the model and data, is checked for well-formed output, and must
leave its copy of the model unchanged; what a candidate does can therefore never change
another check's result.
"""

from __future__ import annotations

import copy
import signal
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from kfac_oracle.catalogue import Case
from kfac_oracle.contract import (
    DenseBlock,
    KFACRequest,
    KroneckerFactors,
    MatVecBlock,
)
from kfac_oracle.conventions import canonical_block, weight_shape_2d
from kfac_oracle.problem import Problem
from kfac_oracle.reference.exact import curvature_block
from kfac_oracle.reference.kfac import KFACSteps

STATUSES = ("passed", "failed", "unsupported", "xfailed", "error")
FAMILIES = ("exactness", "agreement", "mc", "invariance", "robustness")
EXACT_RTOL = 1e-10


@dataclass
class CheckRecord:
    """The outcome of one check item (one row of ``--json``)."""

    check: str
    case: str
    layer: str | None
    family: str
    status: str
    error: float | None = None
    tolerance: float | None = None
    diagnosis: str | None = None
    message: str = ""
    implementation: str = ""
    seconds: float = 0.0
    reproduce: str = ""

    @property
    def id(self) -> str:
        """``check[case-layer]`` (or ``check[case]``)."""
        inner = self.case if self.layer is None else f"{self.case}-{self.layer}"
        return f"{self.check}[{inner}]"

    def as_dict(self) -> dict:
        """JSON-friendly form, with the id."""
        return {"id": self.id, **asdict(self)}


class CandidateError(Exception):
    """The candidate raised, timed out, or returned something ill-formed."""


class CandidateUnsupported(CandidateError):
    """The candidate raised ``NotImplementedError``: it does not support the request.

    By convention a candidate signals a case its ``capabilities`` cannot express
    (e.g. BCE with several outputs) with ``NotImplementedError``; the check is then
    reported ``unsupported`` with the candidate's message, never passed.
    """


class CheckTimeout(Exception):
    """A candidate call ran past the per-check time limit."""


class Unsupported(Exception):
    """The check needs a capability the candidate does not declare."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`CheckTimeout` after ``seconds`` (main thread, Unix only)."""
    usable = (
        seconds
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise CheckTimeout(f"ran past the time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rel_error(candidate: Tensor, reference: Tensor) -> float:
    """``‖C − B‖_F / ‖B‖_F`` (absolute error when ``B = 0``)."""
    diff = (candidate - reference).norm().item()
    scale = reference.norm().item()
    return diff / scale if scale > 0 else diff


def capability(impl, key: str, default=None):
    """``impl.capabilities[key]`` as a set, or ``default``."""
    caps = getattr(impl, "capabilities", {}) or {}
    value = caps.get(key, default)
    return None if value is None else set(value)


def output_ndim(case: Case) -> int:
    """The model output's number of dimensions (batch included)."""
    problem = case.build()
    X, _ = problem.data[0]
    with torch.no_grad():
        return problem.model(X[:1]).ndim


def unsupported_reason(impl, case: Case, fisher_type=None, kfac_approx=None):
    """Why ``impl`` cannot run ``case`` with this flavour, or ``None``."""
    checks = [
        ("losses", case.loss, "loss"),
        ("reductions", case.reduction, "reduction"),
        ("fisher_type", fisher_type, "fisher_type"),
        ("kfac_approx", kfac_approx, "kfac_approx"),
    ]
    for key, value, what in checks:
        allowed = capability(impl, key)
        if value is not None and allowed is not None and value not in allowed:
            return f"{what} {value!r} not in capabilities {sorted(allowed)}"
    layers = capability(impl, "layers")
    if layers is not None:
        kinds = {case.model[int(name)][0] for name in case.layers}
        if not kinds <= layers:
            return f"layers {sorted(kinds - layers)} not in capabilities"
    ndims = capability(impl, "output_ndim")
    if ndims is not None and output_ndim(case) not in ndims:
        return f"output ndim {output_ndim(case)} not in capabilities {sorted(ndims)}"
    return None


@dataclass(frozen=True)
class RequestKey:
    """What distinguishes one candidate call from another within a run."""

    case: str
    fisher_type: str
    kfac_approx: str
    mc_samples: int = 1
    seed: int = 0
    variant: str = "base"
    bias: str | None = None


@dataclass
class CandidateResult:
    """Validated canonical blocks and the bias mode per layer."""

    blocks: dict[str, Tensor]
    bias: dict[str, str]
    raw: dict = field(default_factory=dict)


def validate_result(
    result, problem: Problem, layers, original_state
) -> CandidateResult:
    """Check a candidate's result and convert it to canonical blocks.

    Raises:
        CandidateError: naming what is wrong: not a dict, a missing layer, an unknown
            result type, wrong dtype or device, wrong shapes, NaN or inf, a
            non-symmetric or indefinite factor or block, or a modified model.
    """
    if not isinstance(result, dict):
        raise CandidateError(
            f"compute() returned {type(result).__name__}, expected a dict "
            "{module name: result}"
        )
    for name, value in problem.model.state_dict().items():
        before = original_state[name]
        if value.shape != before.shape or not torch.equal(value, before):
            raise CandidateError(f"the candidate modified the model's {name!r}")
    dtype, device = problem.dtype, problem.device
    blocks, bias = {}, {}
    for layer in layers:
        if layer not in result:
            raise CandidateError(
                f"result misses layer {layer!r} (got {sorted(map(str, result))})"
            )
        module = problem.model.get_submodule(layer)
        value = result[layer]
        d_out, d_in = weight_shape_2d(module)
        has_bias = getattr(module, "bias", None) is not None
        if isinstance(value, KroneckerFactors):
            _validate_factors(layer, value, d_out, d_in, dtype, device)
            mode = value.bias
        elif isinstance(value, DenseBlock | MatVecBlock):
            mode = "joint" if has_bias else "none"
        else:
            raise CandidateError(
                f"layer {layer!r}: result of type {type(value).__name__}; expected "
                "KroneckerFactors, DenseBlock or MatVecBlock"
            )
        try:
            block = canonical_block(value, module)
        except (RuntimeError, ValueError, TypeError) as error:
            raise CandidateError(f"layer {layer!r}: {error}") from error
        P = d_out * d_in + (d_out if has_bias and mode != "none" else 0)
        if block.shape != (P, P):
            raise CandidateError(
                f"layer {layer!r}: block of shape {tuple(block.shape)}, expected "
                f"({P}, {P}) for bias={mode!r}"
            )
        _validate_matrix(f"layer {layer!r} block", block, dtype, device)
        blocks[layer], bias[layer] = block, mode
    return CandidateResult(blocks, bias, result)


def _validate_factors(layer, f: KroneckerFactors, d_out, d_in, dtype, device):
    if f.bias not in ("joint", "separate", "none"):
        raise CandidateError(f"layer {layer!r}: unknown bias mode {f.bias!r}")
    A, G = f.input_covariance, f.gradient_covariance
    if not isinstance(A, Tensor) or not isinstance(G, Tensor):
        raise CandidateError(f"layer {layer!r}: factors must be torch tensors")
    d_a = d_in + 1 if f.bias == "joint" else d_in
    if A.shape == (d_out, d_out) and G.shape == (d_a, d_a) and d_a != d_out:
        raise CandidateError(
            f"layer {layer!r}: factors swapped: input_covariance has the output "
            f"dimension {d_out} and gradient_covariance the input dimension {d_a}"
        )
    if A.shape != (d_a, d_a):
        raise CandidateError(
            f"layer {layer!r}: input_covariance of shape {tuple(A.shape)}, expected "
            f"({d_a}, {d_a}) for bias={f.bias!r}"
        )
    if G.shape != (d_out, d_out):
        raise CandidateError(
            f"layer {layer!r}: gradient_covariance of shape {tuple(G.shape)}, "
            f"expected ({d_out}, {d_out})"
        )
    _validate_matrix(f"layer {layer!r} input_covariance", A, dtype, device)
    _validate_matrix(f"layer {layer!r} gradient_covariance", G, dtype, device)
    if f.bias == "separate" and f.bias_covariance is not None:
        _validate_matrix(
            f"layer {layer!r} bias_covariance", f.bias_covariance, dtype, device
        )


def _validate_matrix(what: str, M: Tensor, dtype, device) -> None:
    if M.dtype != dtype:
        raise CandidateError(f"{what} has dtype {M.dtype}, expected {dtype}")
    if M.device != device:
        raise CandidateError(f"{what} is on {M.device}, expected {device}")
    if not torch.isfinite(M).all():
        raise CandidateError(f"{what} contains NaN or inf")
    scale = M.abs().max().item()
    if scale == 0:
        return
    eps = torch.finfo(M.dtype).eps
    tol = 1e3 * eps * M.shape[0] * scale
    asym = (M - M.T).abs().max().item()
    if asym > tol:
        raise CandidateError(f"{what} is not symmetric (max |M − Mᵀ| = {asym:.3e})")
    lowest = torch.linalg.eigvalsh((M + M.T) / 2)[0].item()
    if lowest < -tol:
        raise CandidateError(
            f"{what} is not positive semi-definite (smallest eigenvalue {lowest:.3e})"
        )


class CheckSession:
    """Shared state of one run against one implementation.

    Args:
        impl: The candidate (``name``, ``capabilities``, ``compute``).
        time_limit: Seconds per candidate call (``None``: no limit).
        dtype: The dtype of the problems (float64 for checking).
    """

    def __init__(self, impl, time_limit: float | None = 60.0, dtype=torch.float64):
        self.impl = impl
        self.time_limit = time_limit
        self.dtype = dtype
        self._candidate: dict[RequestKey, CandidateResult | CandidateError] = {}
        self._exact: dict[tuple, Tensor] = {}
        self._reference: dict[tuple, dict] = {}
        self._ambiguous: dict[tuple, set] = {}
        self.plot_blocks: dict[str, tuple[Tensor, Tensor]] = {}
        self.current_item: str | None = None

    @property
    def name(self) -> str:
        """The implementation's name."""
        return getattr(self.impl, "name", type(self.impl).__name__)

    def problem(self, case: Case, variant: str = "base") -> Problem:
        """A fresh problem of the case, transformed by ``variant`` (invariances)."""
        from kfac_oracle.checks.variants import make_variant

        return make_variant(case.build(self.dtype), variant)

    def exact_block(self, case: Case, layer: str, kind: str, variant="base") -> Tensor:
        """The exact block ``kind`` of ``layer`` (cached)."""
        key = (case.id, layer, kind, variant)
        if key not in self._exact:
            problem = self.problem(case, variant)
            self._exact[key] = curvature_block(problem, layer, kind)
        return self._exact[key]

    @property
    def approximation(self) -> str:
        """``"kfac"``, or ``"ekfac"`` for candidates declaring it in capabilities."""
        return (
            "ekfac"
            if "ekfac" in (capability(self.impl, "approximation") or ())
            else "kfac"
        )

    def reference_blocks(
        self,
        case: Case,
        fisher_type: str,
        kfac_approx: str,
        bias: str = "joint",
        variant: str = "base",
    ) -> dict[str, Tensor]:
        """Reference (E)KFAC canonical blocks of every layer (cached).

        For EKFAC candidates the reference is EKFAC; where a Kronecker factor has a
        repeated eigenvalue EKFAC is not unique, and the layer is listed in
        :meth:`ekfac_ambiguous`.
        """
        from kfac_oracle.conventions import kronecker_block
        from kfac_oracle.reference.ekfac import ekfac, ekfac_block

        approximation = self.approximation
        key = (case.id, fisher_type, kfac_approx, bias, variant, approximation)
        if key in self._reference:
            return self._reference[key]
        problem = self.problem(case, variant)
        if approximation == "ekfac" and fisher_type != "forward-only":
            factors = ekfac(problem, fisher_type, kfac_approx, bias, layers=case.layers)
            blocks = {name: ekfac_block(f) for name, f in factors.items()}
            kfac_factors = KFACSteps().factors(
                problem, fisher_type, kfac_approx, bias, layers=case.layers
            )
            self._ambiguous[key] = {
                name for name, f in kfac_factors.items() if _repeated_eigenvalue(f)
            }
        else:
            factors = KFACSteps().factors(
                problem, fisher_type, kfac_approx, bias, layers=case.layers
            )
            blocks = {name: kronecker_block(f) for name, f in factors.items()}
        self._reference[key] = blocks
        return blocks

    def ekfac_ambiguous(
        self, case: Case, fisher_type, kfac_approx, bias="joint", variant="base"
    ):
        """Layers whose EKFAC is not unique (a repeated eigenvalue in A or G)."""
        key = (case.id, fisher_type, kfac_approx, bias, variant, self.approximation)
        self.reference_blocks(case, fisher_type, kfac_approx, bias, variant)
        return self._ambiguous.get(key, set())

    def candidate(self, case: Case, key: RequestKey) -> CandidateResult:
        """The candidate's validated result for ``key`` (cached, errors too).

        Raises:
            CandidateError: If the candidate failed for this request.
        """
        if key not in self._candidate:
            self._candidate[key] = self._call(case, key)
        result = self._candidate[key]
        if isinstance(result, CandidateError):
            raise result
        return result

    def _call(self, case: Case, key: RequestKey) -> CandidateResult | CandidateError:
        problem = self.problem(case, key.variant)
        model = copy.deepcopy(problem.model)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        request = KFACRequest(
            model=model,
            loss_func=copy.deepcopy(problem.loss_func),
            data=[(X.clone(), y.clone()) for X, y in problem.data],
            fisher_type=key.fisher_type,
            kfac_approx=key.kfac_approx,
            mc_samples=key.mc_samples,
            seed=key.seed,
            layers=tuple(case.layers),
            bias=key.bias,
            info={"case": case.id, "variant": key.variant},
        )
        try:
            with time_limit(self.time_limit):
                result = self.impl.compute(request)
        except CheckTimeout as error:
            return CandidateError(f"timeout: {error}")
        except NotImplementedError as error:
            return CandidateUnsupported(f"raised NotImplementedError: {error}")
        except Exception as error:  # a candidate may raise anything
            tb = traceback.format_exception_only(type(error), error)[-1].strip()
            return CandidateError(f"compute() raised {tb}")
        checked = Problem.__new__(Problem)
        checked.model, checked.loss_func, checked.data = (
            model,
            problem.loss_func,
            problem.data,
        )
        try:
            return validate_result(result, checked, case.layers, state)
        except CandidateError as error:
            return error
        except Exception as error:
            return CandidateError(f"ill-formed result: {error!r}")


def _repeated_eigenvalue(factors, rtol: float = 1e-8) -> bool:
    """Whether ``A`` or ``G`` has (numerically) repeated eigenvalues."""
    for M in (factors.input_covariance, factors.gradient_covariance):
        ev = torch.linalg.eigvalsh(M)
        gaps = ev[1:] - ev[:-1]
        if len(gaps) and gaps.min() <= rtol * ev.abs().max():
            return True
    return False


@dataclass
class CheckItem:
    """One runnable check: ``check[case-layer]``."""

    check: str
    family: str
    case: Case
    layer: str | None
    run_fn: Callable[[CheckSession], tuple[str, float | None, float | None, str]]
    diagnose_fn: Callable[[CheckSession], str | None] | None = None

    @property
    def id(self) -> str:
        """``check[case-layer]``."""
        inner = self.case.id if self.layer is None else f"{self.case.id}-{self.layer}"
        return f"{self.check}[{inner}]"

    def run(self, session: CheckSession) -> CheckRecord:
        """Run the check; never raises (errors become records)."""
        start = time.perf_counter()
        record = CheckRecord(
            check=self.check,
            case=self.case.id,
            layer=self.layer,
            family=self.family,
            status="error",
            implementation=session.name,
        )
        session.current_item = self.id
        try:
            status, error, tol, message = self.run_fn(session)
            record.status, record.error, record.tolerance = status, error, tol
            record.message = message
            if status == "failed" and self.diagnose_fn is not None:
                try:
                    record.diagnosis = self.diagnose_fn(session)
                except Exception as exc:  # diagnosis must never break a run
                    record.diagnosis = f"diagnosis failed: {exc!r}"
        except (Unsupported, CandidateUnsupported) as exc:
            record.status, record.message = "unsupported", str(exc)
        except CandidateError as exc:
            record.status, record.message = "error", str(exc)
            record.diagnosis = _diagnose_error(str(exc))
        except Exception as exc:
            record.status = "error"
            record.message = f"harness error: {exc!r}"
        record.seconds = time.perf_counter() - start
        if record.status != "failed":
            session.plot_blocks.pop(self.id, None)
        return record


def _diagnose_error(message: str) -> str | None:
    if "factors swapped" in message:
        return "Kronecker factors swapped (A and G exchanged)"
    return None
