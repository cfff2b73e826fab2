"""The public contract between the harness and a KFAC implementation under test.

A candidate is any object with a ``name``, a ``capabilities`` mapping and a
``compute(request) -> dict[str, result]`` method (:class:`Candidate`); it may also
name the ``library`` and ``version`` it wraps. ``capabilities`` is validated when the
implementation is resolved (:mod:`kfac_oracle.capabilities`). ``result`` is one of
three forms:

- :class:`KroneckerFactors`: the factors ``A`` (input covariance) and ``G``
  (gradient covariance) whose product ``G ⊗ A`` is the module's curvature block in
  rvec layout (row-major flattening of the weight, PyTorch's ``flatten``).
- :class:`DenseBlock`: the module's block as a dense matrix over ``[weight, bias]``.
- :class:`MatVecBlock`: a matrix-vector product over ``[weight, bias]``.

When the request asks for operations (``request.operations`` is an
:class:`OperationsRequest`), the result per layer is instead a
:class:`LayerOperations`: what users of the library consume (damped inverse-vector
products, log-determinants, the trace, pairwise scores of probe vectors and of the
data's own gradients) under the requested damping convention
(:mod:`kfac_oracle.damping`, docs/theory.md §10).

Conventions (docs/theory.md §3):

- Linear ``z = W a + b`` with ``W ∈ R^{out×in}``: rvec(g aᵀ) = g ⊗ a, so the block is
  ``G ⊗ A`` in rvec and ``A ⊗ G`` in cvec (column stacking).
- Conv2d weights ``(C_out, C_in, kh, kw)`` are viewed as ``(C_out, C_in·kh·kw)``.
- ``bias="joint"``: ``A`` acts on ``ã = [a; 1]`` (bias as the last column of
  ``[W | b]``).
  ``bias="separate"``: the bias block is ``bias_covariance`` (default ``G``) and the
  weight-bias cross terms are zero. ``bias="none"``: the module has no bias, or the
  candidate does not cover it.
- Only the product ``G ⊗ A`` is canonical: a positive scalar may move between the
  factors. With ``bias="separate"`` the bias block fixes that scalar.

A candidate that cannot handle a request its ``capabilities`` do not exclude (e.g. BCE
with several outputs) raises ``NotImplementedError``: the harness reports the check
"unsupported" with that message. Any other exception is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from kfac_oracle.capabilities import (
    DAMPING,
    DISTRIBUTED,
    LAYERS,
    LOSSES,
    OPERATIONS,
    REDUCTIONS,
)
from kfac_oracle.flavours import BiasMode, FisherType, KFACApprox
from kfac_oracle.problem import loss_terms_per_datum, reduction_factor

# Everything the contract can express for KFAC (the reference implements all of it).
FULL_CAPABILITIES: dict[str, set[str]] = {
    "fisher_type": set(FisherType.values()),
    "kfac_approx": set(KFACApprox.values()),
    "layers": set(LAYERS),
    "losses": set(LOSSES),
    "reductions": set(REDUCTIONS),
    "bias": {BiasMode.JOINT.value, BiasMode.SEPARATE.value},
    "distributed": set(DISTRIBUTED),
}
# Every operation and damping convention (the built-in reference offers them too).
OPERATION_CAPABILITIES: dict[str, set[str]] = {
    "operations": set(OPERATIONS),
    "damping": set(DAMPING),
}


@dataclass
class OperationsRequest:
    """The operations a request asks for, with their damping and probe vectors.

    Operations act on the layer's block over ``[rvec(W), b]`` with the bias treatment
    ``bias``: ``"joint"`` (``A`` on ``[a; 1]``; asked of every candidate that offers
    it) or ``"separate"`` (``blockdiag(G ⊗ A, G_b)``, asked of a candidate whose
    ``capabilities["bias"]`` is ``{"separate"}``), or on the weight alone for a layer
    without bias; vectors are in that canonical layout. Factor damping conventions
    (``per_factor``, ``pi``) are defined on the joint block only.

    Attributes:
        convention: The damping convention (``product``, ``per_factor``, ``pi``,
            ``mean_eigenvalue``; docs/theory.md §10).
        damping: ``{layer: (λ, ...)}``: the dampings each operation is evaluated at.
        vectors: ``{layer: V}``, ``V`` of shape ``(P, k)``: the probe vectors
            (columns) for inverse-vector products and scores.
        operations: Which of the operations (``inverse``, ``logdet``, ``scores``,
            ``trace``, ``diagonal``, ``eigenvalues``, ``data_scores``) are read.
        bias: ``"joint"`` or ``"separate"``: the block the operations act on.
    """

    convention: str
    damping: Mapping[str, tuple[float, ...]]
    vectors: Mapping[str, Tensor]
    operations: tuple[str, ...] = OPERATIONS
    bias: str = "joint"


@dataclass
class KFACRequest:
    """What the harness asks a candidate to compute.

    Attributes:
        model: The network. Candidates must not modify its parameters.
        loss_func: A ``torch.nn`` loss module (``MSELoss``, ``CrossEntropyLoss`` or
            ``BCEWithLogitsLoss``) with reduction ``"mean"`` or ``"sum"``. The loss
            is ``L = R Σ_n ℓ_n`` over the *whole* data set (docs/theory.md §1).
        data: The data set as a list of ``(X, y)`` batches, possibly of unequal sizes.
        fisher_type: ``"type-2"``, ``"mc"``, ``"empirical"`` or ``"forward-only"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` (matters only with weight sharing).
        mc_samples: Number of Monte-Carlo label samples per datum
            (``fisher_type="mc"``).
        seed: Seed for any randomness (MC sampling).
        layers: Names (from ``model.named_modules()``) of the modules whose factors are
            wanted.
        bias: Preferred bias treatment, ``"joint"`` or ``"separate"``, for candidates
            that offer both (``capabilities["bias"]``); ``None`` leaves the choice to
            the candidate. Results always declare what they did.
        info: Free-form extras (e.g. the case id), for logging only.
        operations: ``None`` for curvature (factors or blocks); else the operations
            wanted, and each layer's result is a :class:`LayerOperations`.
        rank: This process's rank in a data-parallel run (``kfac-oracle check
            --world-size W``), 0 otherwise.
        world_size: The number of processes ``W`` of a data-parallel run, 1
            otherwise. With ``W > 1`` the default ``torch.distributed`` process group
            (gloo) is initialised before ``compute`` is called, ``data`` is this
            rank's shard (shards differ in size), and ``num_data`` and
            ``reduction_factor`` are those of the shard: ``N`` and ``R`` of the whole
            data set need a collective. Every rank must return the factors over the
            whole data set.
    """

    model: nn.Module
    loss_func: nn.Module
    data: list[tuple[Tensor, Tensor]]
    fisher_type: str = "type-2"
    kfac_approx: str = "expand"
    mc_samples: int = 1
    seed: int = 0
    layers: tuple[str, ...] = ()
    bias: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    operations: OperationsRequest | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def num_data(self) -> int:
        """The number of data points over all batches (of this rank's shard)."""
        return sum(len(X) for X, _ in self.data)

    @property
    def loss_name(self) -> str:
        """Class name of the loss module, e.g. ``"CrossEntropyLoss"``."""
        return type(self.loss_func).__name__

    @property
    def reduction(self) -> str:
        """The loss's reduction, ``"mean"`` or ``"sum"``."""
        return str(self.loss_func.reduction)

    @property
    def loss_terms_per_datum(self) -> int:
        """``T``, the loss terms per datum (docs/theory.md §1)."""
        return loss_terms_per_datum(self.data)

    @property
    def reduction_factor(self) -> float:
        """``R`` with ``L = R Σ_n ℓ_n``: 1 for sum, ``1/(N·T)`` for mean."""
        return reduction_factor(
            self.reduction, self.num_data, self.loss_terms_per_datum
        )

    def modules(
        self,
        model: nn.Module | None = None,
        kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
    ) -> dict[str, nn.Module]:
        """The requested modules of the given types by name, in request order.

        Args:
            model: Where to look them up (default: ``self.model``; pass an adapter's
                copy of it).
            kinds: Module types to keep (with no ``layers`` requested: every module
                of these types).
        """
        model = self.model if model is None else model
        named = dict(model.named_modules())
        names = self.layers or tuple(named)
        return {n: named[n] for n in names if isinstance(named.get(n), kinds)}


@dataclass
class KroneckerFactors:
    """Kronecker factors of one module's block, ``G ⊗ A`` in rvec layout.

    Attributes:
        input_covariance: ``A``, shape ``(D_in, D_in)``, or ``(D_in + 1, D_in + 1)``
            with ``bias="joint"``.
        gradient_covariance: ``G``, shape ``(D_out, D_out)``.
        bias: ``"joint"``, ``"separate"`` or ``"none"``.
        bias_covariance: With ``bias="separate"``, the bias block; ``None`` means ``G``.
    """

    input_covariance: Tensor
    gradient_covariance: Tensor
    bias: str = "joint"
    bias_covariance: Tensor | None = None


@dataclass
class DenseBlock:
    """A module's curvature block as a dense matrix over ``[weight, bias]``.

    Attributes:
        matrix: Square matrix of size ``numel(weight) + numel(bias)``.
        layout: ``"rvec"`` (row-major weight flattening) or ``"cvec"``
            (column-major flattening of the 2-D weight view).
    """

    matrix: Tensor
    layout: str = "rvec"


@dataclass
class MatVecBlock:
    """A module's curvature block as a matrix-vector product over ``[weight, bias]``.

    Attributes:
        matvec: Callable mapping a vector (torch tensor or numpy array) of size ``P`` to
            a vector of size ``P``, or a ``scipy.sparse.linalg.LinearOperator``.
        size: ``P``, the number of entries of ``[weight, bias]``.
        layout: ``"rvec"`` or ``"cvec"``, as for :class:`DenseBlock`.
    """

    matvec: Callable[[Any], Any] | Any
    size: int
    layout: str = "rvec"


@dataclass
class LayerOperations:
    """What users consume of one layer's block ``K``, under the request's convention.

    Each field is a callable (``None``: not offered); the harness calls it once per
    damping ``λ`` of the request, with the request's vectors ``V`` of shape ``(P, k)``
    in the canonical layout. ``K_λ`` is the damped matrix of the request's convention
    (docs/theory.md §10).

    Attributes:
        inverse_product: ``(V, λ) -> K_λ⁻¹ V``, shape ``(P, k)``.
        logdet: ``λ -> log det K_λ`` (a float or a 0-d tensor).
        trace: ``() -> tr K`` (undamped), or the number itself.
        scores: ``(U, V, λ) -> Uᵀ K_λ⁻¹ V``, shape ``(k_U, k_V)`` (influence scores).
        diagonal: ``() -> diag K`` (undamped), shape ``(P,)`` in the canonical
            layout, or the tensor itself.
        eigenvalues: ``() -> the P eigenvalues of K`` (undamped, any order), or the
            tensor itself.
        data_scores: ``λ -> S``, shape ``(N, N)``: the pairwise influence scores of
            the request's data, ``S_ij = g_iᵀ K_λ⁻¹ g_j``, where ``g_n`` is the
            gradient of datum ``n``'s loss term ``ℓ_n`` with respect to the layer's
            parameters, in the canonical layout ``[rvec(W), b]``. ``ℓ_n`` is the term
            of ``L = R Σ_n ℓ_n`` *without* the reduction factor ``R`` (summed over
            positions for sequence outputs; docs/theory.md §1), with the true labels
            ``y``. Data points ``n`` are numbered as in ``request.data``, batches
            concatenated in order. No sign: ``S`` is symmetric positive semi-definite.
    """

    inverse_product: Callable[[Tensor, float], Any] | None = None
    logdet: Callable[[float], Any] | None = None
    trace: Callable[[], Any] | float | Tensor | None = None
    scores: Callable[[Tensor, Tensor, float], Any] | None = None
    diagonal: Callable[[], Any] | Tensor | None = None
    eigenvalues: Callable[[], Any] | Tensor | None = None
    data_scores: Callable[[float], Any] | None = None


Result = KroneckerFactors | DenseBlock | MatVecBlock | LayerOperations


@runtime_checkable
class Candidate(Protocol):
    """What the harness needs of an implementation under test.

    Attributes:
        name: A short name for reports.
        capabilities: ``{key: set of values}`` (:mod:`kfac_oracle.capabilities`).

    Optional attributes ``library`` and ``version`` name the library a candidate
    wraps; reports and the matrix show them.
    """

    name: str
    capabilities: Mapping[str, Any] | Any

    def compute(self, request: KFACRequest) -> Mapping[str, Result]:
        """The curvature of every requested layer, keyed by module name."""
        ...
