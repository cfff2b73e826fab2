"""Reading a candidate's result: a plain copy first, then validation and canonical form.

Two steps, so that everything the candidate controls runs inside its time limit (and,
with process isolation, inside its process):

1. :func:`materialize` reads the candidate's result into plain tensors: every requested
   layer is looked up (lazy mappings evaluated), factors and dense blocks are copied
   (contiguous, detached: a candidate that reuses its output buffers cannot change a
   result the harness already holds), ``MatVecBlock`` s are densified after their
   claimed size has been checked against the layer's — or, for a block too large to
   densify (:data:`~kfac_oracle.operators.DENSE_LIMIT`), applied to the oracle's
   fixed Gaussian probes only — numpy arrays become tensors.
2. :func:`validate` checks the copies against the contract (shapes, dtype, device,
   finite, symmetric, positive semi-definite) and turns them into canonical blocks
   ``[rvec(W), b]`` (docs/theory.md §3): dense tensors, or for large blocks
   operators (:mod:`kfac_oracle.operators`) that are never densified.

For a request of operations, step 1 calls each layer's
:class:`~kfac_oracle.contract.LayerOperations` at the request's dampings and vectors
(:func:`materialize_operations`), and step 2 checks the values (shapes, dtype, finite).

Both raise :class:`~kfac_oracle.errors.CandidateError` with a message naming the layer
and what is wrong.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kfac_oracle.contract import (
    DenseBlock,
    KroneckerFactors,
    LayerOperations,
    MatVecBlock,
    OperationsRequest,
)
from kfac_oracle.conventions import (
    canonical_block,
    cvec_to_rvec_permutation,
    weight_shape_2d,
)
from kfac_oracle.errors import CandidateError
from kfac_oracle.flavours import BiasMode
from kfac_oracle.operators import (
    DenseOperator,
    KroneckerOperator,
    ProbedOperator,
    gaussian_probes,
    too_large,
)


@dataclass(frozen=True)
class LayerShape:
    """What the harness expects of one layer's result.

    Attributes:
        d_out: Rows of the weight's 2-D view.
        d_in: Columns of the weight's 2-D view (Conv2d: ``C_in·kh·kw``).
        has_bias: Whether the module has a bias.
    """

    d_out: int
    d_in: int
    has_bias: bool

    @property
    def size(self) -> int:
        """``P``: entries of ``[weight, bias]``."""
        return self.d_out * self.d_in + (self.d_out if self.has_bias else 0)

    def describe_size(self) -> str:
        """``"weight 20 + bias 4"``."""
        weight = f"weight {self.d_out * self.d_in}"
        return f"{weight} + bias {self.d_out}" if self.has_bias else weight


def layer_shapes(
    model: nn.Module, layers: list[str] | tuple[str, ...]
) -> dict[str, LayerShape]:
    """The expected shape of every requested layer's result."""
    out = {}
    for name in layers:
        module = model.get_submodule(name)
        d_out, d_in = weight_shape_2d(module)
        out[name] = LayerShape(d_out, d_in, getattr(module, "bias", None) is not None)
    return out


@dataclass
class PlainResult:
    """A candidate's result for one layer, copied into plain tensors.

    Attributes:
        kind: ``"factors"``, ``"dense"`` (a densified ``MatVecBlock`` too) or
            ``"probed"`` (a large ``MatVecBlock`` applied to the probes), or
            ``"operations"``.
        tensors: ``{"A", "G", "bias_covariance"}``, ``{"matrix"}``,
            ``{"probes", "products"}`` (canonical layout), or the values of the
            operations (:func:`materialize_operations`).
        bias: The declared bias mode (factors) or ``"joint"``/``"none"`` (blocks).
        layout: ``"rvec"`` or ``"cvec"`` (blocks).
    """

    kind: str
    tensors: dict[str, Tensor | None]
    bias: str = "joint"
    layout: str = "rvec"


@dataclass
class CandidateResult:
    """Validated canonical blocks and the bias mode per layer (or operation values).

    ``operations`` holds, for a request of operations, ``{layer: {operation:
    values}}`` as :func:`materialize_operations` describes them.

    A block is a dense tensor, or an operator for a block too large to densify.
    """

    blocks: dict[str, Any]
    bias: dict[str, str]
    operations: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def widened(result: CandidateResult) -> CandidateResult:
    """The result in float64, exactly (a float32 candidate's values, validated).

    Checks then compare float64 numbers only; the precision a candidate computed in
    is judged by its tolerances (:mod:`kfac_oracle.rounding`), not by its dtype.
    """

    def wide(block: Any) -> Any:
        if isinstance(block, Tensor):
            return block.to(torch.float64)
        if isinstance(block, KroneckerOperator):
            f = block.factors
            bias_cov = f.bias_covariance
            factors = dataclasses.replace(
                f,
                input_covariance=f.input_covariance.to(torch.float64),
                gradient_covariance=f.gradient_covariance.to(torch.float64),
                bias_covariance=None if bias_cov is None else bias_cov.double(),
            )
            return KroneckerOperator(factors, block.d_out, block.d_in)
        if isinstance(block, ProbedOperator):
            return ProbedOperator(block.probes.double(), block.products.double())
        if isinstance(block, DenseOperator):
            return DenseOperator(block.matrix.double())
        return block

    return CandidateResult(
        {layer: wide(b) for layer, b in result.blocks.items()},
        dict(result.bias),
        {
            layer: {name: v.to(torch.float64) for name, v in values.items()}
            for layer, values in result.operations.items()
        },
    )


def _copy(what: str, value: Any) -> Tensor:
    """A detached, contiguous copy of a tensor (numpy arrays accepted)."""
    if isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.number):
            raise CandidateError(f"{what} is a numpy array of dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, Tensor):
        raise CandidateError(
            f"{what} is a {type(value).__name__}; the contract expects a torch tensor"
        )
    if value.layout != torch.strided:
        raise CandidateError(
            f"{what} is a {value.layout} tensor; the contract expects dense (strided) "
            "tensors"
        )
    return value.detach().clone(memory_format=torch.contiguous_format)


def _densify(
    what: str,
    block: MatVecBlock,
    shape: LayerShape,
    dtype: torch.dtype,
    device: Any,
    vectors: Tensor | None = None,
) -> Tensor:  # noqa: C901 - one message per way an operator can be wrong
    """Apply a ``MatVecBlock`` to the identity's columns, after checking its size.

    With ``vectors`` (``(P, k)``, the block's own layout), to those columns instead.
    """
    size = block.size
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise CandidateError(f"{what}: MatVecBlock.size must be an int, got {size!r}")
    if int(size) != shape.size:
        raise CandidateError(
            f"{what}: MatVecBlock.size {size}, expected {shape.size} "
            f"({shape.describe_size()})"
        )
    mv: Any = block.matvec
    is_scipy = hasattr(mv, "matvec") and hasattr(mv, "shape")
    if not is_scipy and not callable(mv):
        raise CandidateError(
            f"{what}: MatVecBlock.matvec is a {type(mv).__name__}, neither callable "
            "nor "
            "a scipy LinearOperator"
        )
    columns = []
    if vectors is None:
        vectors = torch.eye(shape.size, dtype=dtype, device=device)
    for e in vectors.T.to(dtype=dtype, device=device):
        out = mv.matvec(e.cpu().numpy()) if is_scipy else mv(e)
        out = _copy(f"{what}: MatVecBlock.matvec output", out).to(device)
        if out.dtype != dtype and not (is_scipy and out.dtype.is_floating_point):
            raise CandidateError(
                f"{what}: MatVecBlock.matvec returned {out.dtype} vectors, expected "
                f"{dtype}"
            )
        if out.numel() != shape.size:
            raise CandidateError(
                f"{what}: MatVecBlock.matvec returned {out.numel()} entries, expected "
                f"{shape.size}"
            )
        columns.append(out.reshape(-1).to(dtype))
    return torch.stack(columns, dim=1)


def _value(what: str, value: Any, shape: tuple[int, ...]) -> Tensor:
    """A copy of one operation's value, checked to have ``shape``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = torch.tensor(float(value), dtype=torch.float64)
    out = _copy(what, value)
    if tuple(out.shape) != shape and not (shape == () and out.numel() == 1):
        raise CandidateError(f"{what} has shape {tuple(out.shape)}, expected {shape}")
    return out.reshape(shape)


def _data_scores(what: str, value: Any, num_data: int | None) -> Tensor:
    """A copy of the ``(N, N)`` data scores (square if ``N`` is not known)."""
    if num_data is not None:
        return _value(what, value, (num_data, num_data))
    out = _copy(what, value)
    if out.ndim != 2 or out.shape[0] != out.shape[1]:
        raise CandidateError(f"{what} has shape {tuple(out.shape)}, expected (N, N)")
    return out


#: The shapes of the undamped operations' values, for a block of ``P`` entries.
UNDAMPED_SHAPES: dict[str, Callable[[int], tuple[int, ...]]] = {
    "trace": lambda size: (),
    "diagonal": lambda size: (size,),
    "eigenvalues": lambda size: (size,),
}


def materialize_operations(
    where: str,
    value: object,
    operations: OperationsRequest,
    layer: str,
    size: int,
    num_data: int | None = None,
) -> PlainResult:
    """Call one layer's :class:`LayerOperations` at every requested damping.

    The values, for ``n`` dampings and ``V`` of shape ``(P, k)``: ``"inverse"``
    ``(n, P, k)``, ``"logdet"`` ``(n,)``, ``"trace"`` ``()``, ``"scores"``
    ``(n, k, k)`` (``scores(V, V, λ)``), ``"diagonal"`` and ``"eigenvalues"``
    ``(P,)``, ``"data_scores"`` ``(n, N, N)`` for the request's ``N = num_data``
    data points (``None``: any square shape).

    Raises:
        CandidateError: Not a ``LayerOperations``, a requested operation missing, or
            a value of the wrong shape or type.
    """
    if not isinstance(value, LayerOperations):
        raise CandidateError(
            f"{where}: result of type {type(value).__name__}; a request of operations "
            "expects LayerOperations"
        )
    V = operations.vectors[layer]
    k = V.shape[1]
    dampings = operations.damping[layer]
    tensors: dict[str, Tensor | None] = {}
    for name in operations.operations:
        attribute = "inverse_product" if name == "inverse" else name
        function = getattr(value, attribute)
        if function is None:
            raise CandidateError(
                f"{where}: LayerOperations.{attribute} is None, but the capabilities "
                f"declare {name!r}"
            )
        what = f"{where} {attribute}"
        if name in UNDAMPED_SHAPES:
            result = function() if callable(function) else function
            tensors[name] = _value(what, result, UNDAMPED_SHAPES[name](size))
            continue
        if not callable(function):
            raise CandidateError(f"{what} is a {type(function).__name__}, not callable")
        values = []
        for lam in dampings:
            if name == "inverse":
                values.append(_value(what, function(V.clone(), lam), (size, k)))
            elif name == "logdet":
                values.append(_value(what, function(lam), ()))
            elif name == "data_scores":
                values.append(_data_scores(what, function(lam), num_data))
            else:
                values.append(_value(what, function(V.clone(), V.clone(), lam), (k, k)))
        tensors[name] = torch.stack(values)
    return PlainResult("operations", tensors, bias=operations.bias)


def materialize(
    result: object,
    shapes: Mapping[str, LayerShape],
    dtype: torch.dtype,
    device: Any,
    operations: OperationsRequest | None = None,
    num_data: int | None = None,
) -> dict[str, PlainResult]:
    """Copy a candidate's result into :class:`PlainResult` s (step 1 of 2).

    ``num_data`` is the request's ``N``, the size of its ``data_scores``.

    Raises:
        CandidateError: If the result is not a mapping holding every requested layer
            in a form of the contract, or a lazy part of it fails.
    """
    if not isinstance(result, Mapping):
        raise CandidateError(
            f"compute() returned {type(result).__name__}, expected a dict "
            "{module name: result}"
        )
    out = {}
    for layer, shape in shapes.items():
        if layer not in result:
            keys = sorted(map(repr, result))
            hint = ""
            if any(not isinstance(k, str) for k in result):
                hint = " (keys must be module names, as str)"
            raise CandidateError(f"result misses layer {layer!r}{hint} (got {keys})")
        value = result[layer]
        where = f"layer {layer!r}"
        if operations is not None:
            out[layer] = materialize_operations(
                where, value, operations, layer, shape.size, num_data
            )
        elif isinstance(value, KroneckerFactors):
            bias = value.bias
            if bias not in BiasMode.values():
                raise CandidateError(f"{where}: unknown bias mode {bias!r}")
            tensors = {
                "A": _copy(f"{where} input_covariance", value.input_covariance),
                "G": _copy(f"{where} gradient_covariance", value.gradient_covariance),
                "bias_covariance": None,
            }
            if bias == BiasMode.SEPARATE and value.bias_covariance is not None:
                tensors["bias_covariance"] = _copy(
                    f"{where} bias_covariance", value.bias_covariance
                )
            out[layer] = PlainResult("factors", tensors, bias=str(bias))
        elif isinstance(value, DenseBlock | MatVecBlock):
            if value.layout not in ("rvec", "cvec"):
                raise CandidateError(
                    f"{where}: unknown layout {value.layout!r}; expected 'rvec' or "
                    "'cvec'"
                )
            bias = BiasMode.JOINT if shape.has_bias else BiasMode.NONE
            if isinstance(value, MatVecBlock) and too_large(shape.size):
                out[layer] = _probe(where, value, shape, dtype, device)
                out[layer].bias = str(bias)
                continue
            if isinstance(value, DenseBlock):
                matrix = _copy(f"{where} block", value.matrix)
            else:
                matrix = _densify(where, value, shape, dtype, device)
            out[layer] = PlainResult(
                "dense", {"matrix": matrix}, bias=str(bias), layout=value.layout
            )
        else:
            raise CandidateError(
                f"{where}: result of type {type(value).__name__}; expected "
                "KroneckerFactors, DenseBlock or MatVecBlock"
            )
    return out


def _probe(
    where: str, block: MatVecBlock, shape: LayerShape, dtype: torch.dtype, device: Any
) -> PlainResult:
    """A large ``MatVecBlock``'s products with the fixed Gaussian probes.

    Probes are drawn in the canonical layout and permuted into the block's layout
    (and the products back), so the result is canonical.
    """
    Z = gaussian_probes(shape.size, dtype=dtype, device=device)
    if block.layout == "cvec":
        perm = cvec_to_rvec_permutation(shape.d_out, shape.d_in, shape.has_bias)
        perm = perm.to(Z.device)
        Zc = torch.empty_like(Z)
        Zc[perm] = Z  # cvec entry perm[i] is rvec entry i
        KZ = _densify(where, block, shape, dtype, device, Zc)[perm]
    else:
        KZ = _densify(where, block, shape, dtype, device, Z)
    return PlainResult("probed", {"probes": Z, "products": KZ})


def validate(
    plain: Mapping[str, PlainResult],
    shapes: Mapping[str, LayerShape],
    dtype: torch.dtype,
    device: Any,
) -> CandidateResult:
    """Check materialized results and convert them to canonical blocks (step 2 of 2).

    Raises:
        CandidateError: Naming the layer and what is wrong: shapes, dtype, device,
            NaN or inf, a non-symmetric or indefinite factor or block.
    """
    blocks: dict[str, Any] = {}
    modes: dict[str, str] = {}
    operations: dict[str, dict[str, Tensor]] = {}
    for layer, shape in shapes.items():
        value = plain[layer]
        where = f"layer {layer!r}"
        if value.kind == "operations":
            operations[layer] = _validate_operations(where, value, dtype, device)
            continue
        if value.kind == "factors":
            factors = _validate_factors(where, value, shape, dtype, device)
            mode = value.bias
            if too_large(shape.size):
                blocks[layer] = KroneckerOperator(factors, shape.d_out, shape.d_in)
                modes[layer] = mode
                continue
            block = canonical_block(factors, _ShapeModule(shape))
        elif value.kind == "probed":
            Z, KZ = value.tensors["probes"], value.tensors["products"]
            assert Z is not None and KZ is not None
            _validate_probed(where, Z, KZ, dtype, device)
            blocks[layer] = ProbedOperator(Z, KZ)
            modes[layer] = value.bias
            continue
        else:
            matrix = value.tensors["matrix"]
            assert matrix is not None
            _validate_square(f"{where} block", matrix, shape.size)
            block = canonical_block(
                DenseBlock(matrix, value.layout), _ShapeModule(shape)
            )
            mode = value.bias
        size = shape.d_out * shape.d_in
        if shape.has_bias and mode != BiasMode.NONE:
            size += shape.d_out
        if block.shape != (size, size):
            raise CandidateError(
                f"{where}: block of shape {tuple(block.shape)}, expected ({size}, "
                f"{size}) for bias={mode!r}"
            )
        validate_matrix(f"{where} block", block, dtype, device)
        blocks[layer], modes[layer] = block, mode
    return CandidateResult(blocks, modes, operations)


def _validate_operations(
    where: str, value: PlainResult, dtype: torch.dtype, device: Any
) -> dict[str, Tensor]:
    """Operation values: finite, on the device, in the problem's dtype.

    A plain number for ``trace`` or ``logdet`` is accepted and converted.
    """
    out = {}
    for name, tensor in value.tensors.items():
        assert tensor is not None
        what = f"{where} {name}"
        if tensor.ndim > 1 and tensor.dtype != dtype:
            raise CandidateError(f"{what} has dtype {tensor.dtype}, expected {dtype}")
        if not tensor.dtype.is_floating_point:
            raise CandidateError(f"{what} has dtype {tensor.dtype}, not floating")
        if tensor.ndim > 1 and tensor.device != torch.device(device):
            raise CandidateError(f"{what} is on {tensor.device}, expected {device}")
        if not torch.isfinite(tensor).all():
            raise CandidateError(f"{what} contains NaN or inf")
        out[name] = tensor.to(dtype=dtype, device=device)
    return out


class _ShapeModule:
    """Stands in for a module where only the weight's shape and the bias matter."""

    def __init__(self, shape: LayerShape):
        self.weight = torch.empty(shape.d_out, shape.d_in, device="meta")
        self.bias = torch.empty(shape.d_out, device="meta") if shape.has_bias else None


def _validate_square(what: str, M: Tensor, size: int | None = None) -> None:
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise CandidateError(f"{what} of shape {tuple(M.shape)} is not a square matrix")
    if size is not None and M.shape[0] != size:
        raise CandidateError(
            f"{what} of shape {tuple(M.shape)}, expected ({size}, {size})"
        )


def _validate_factors(
    where: str, value: PlainResult, shape: LayerShape, dtype: torch.dtype, device: Any
) -> KroneckerFactors:
    A, G = value.tensors["A"], value.tensors["G"]
    assert A is not None and G is not None
    d_out, d_in = shape.d_out, shape.d_in
    d_a = d_in + 1 if value.bias == BiasMode.JOINT else d_in
    if A.shape == (d_out, d_out) and G.shape == (d_a, d_a) and d_a != d_out:
        raise CandidateError(
            f"{where}: factors swapped: input_covariance has the output dimension "
            f"{d_out} and gradient_covariance the input dimension {d_a}"
        )
    if A.shape != (d_a, d_a):
        raise CandidateError(
            f"{where}: input_covariance of shape {tuple(A.shape)}, expected "
            f"({d_a}, {d_a}) for bias={value.bias!r}"
        )
    if G.shape != (d_out, d_out):
        raise CandidateError(
            f"{where}: gradient_covariance of shape {tuple(G.shape)}, expected "
            f"({d_out}, {d_out})"
        )
    validate_matrix(f"{where} input_covariance", A, dtype, device)
    validate_matrix(f"{where} gradient_covariance", G, dtype, device)
    Gb = value.tensors.get("bias_covariance")
    if Gb is not None:
        if Gb.shape != (d_out, d_out):
            raise CandidateError(
                f"{where}: bias_covariance of shape {tuple(Gb.shape)}, expected "
                f"({d_out}, {d_out})"
            )
        validate_matrix(f"{where} bias_covariance", Gb, dtype, device)
    return KroneckerFactors(A, G, value.bias, Gb)


def _validate_probed(
    where: str, Z: Tensor, KZ: Tensor, dtype: torch.dtype, device: Any
) -> None:
    """What the probes can tell: dtype, device, finite, ``zᵀ K z ≥ 0``."""
    what = f"{where} MatVecBlock products"
    if KZ.dtype != dtype:
        raise CandidateError(f"{what} have dtype {KZ.dtype}, expected {dtype}")
    if KZ.device != torch.device(device):
        raise CandidateError(f"{what} are on {KZ.device}, expected {device}")
    if not torch.isfinite(KZ).all():
        raise CandidateError(f"{what} contain NaN or inf")
    quadratic = (Z * KZ).sum(0)
    tol = 1e3 * torch.finfo(dtype).eps * Z.shape[0] * float(KZ.abs().max())
    if float(quadratic.min()) < -tol:
        raise CandidateError(
            f"{where} block is not positive semi-definite (zᵀKz = "
            f"{float(quadratic.min()):.3e} for a probe z)"
        )


#: Matrices from this size on are tested for semi-definiteness by Cholesky first.
CHOLESKY_FROM = 512


def validate_matrix(what: str, M: Tensor, dtype: torch.dtype, device: Any) -> None:
    """Dtype, device, finite, symmetric and positive semi-definite (to rounding).

    Raises:
        CandidateError: Naming ``what`` and the first property that fails.
    """
    if M.dtype != dtype:
        raise CandidateError(f"{what} has dtype {M.dtype}, expected {dtype}")
    if M.device != torch.device(device):
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
    S = (M + M.T) / 2
    if S.shape[0] >= CHOLESKY_FROM:
        # S + tol·I positive definite ⇔ smallest eigenvalue > −tol; a Cholesky
        # factorisation decides it at a sixth of an eigendecomposition's cost.
        shifted = S + tol * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        if int(torch.linalg.cholesky_ex(shifted).info) == 0:
            return
    lowest = torch.linalg.eigvalsh(S)[0].item()
    if lowest < -tol:
        raise CandidateError(
            f"{what} is not positive semi-definite (smallest eigenvalue {lowest:.3e})"
        )


__all__ = [
    "CandidateResult",
    "LayerShape",
    "PlainResult",
    "layer_shapes",
    "materialize",
    "materialize_operations",
    "validate",
    "validate_matrix",
]
