"""Adapter for ASDL (PyPI ``asdfghjkl``, imported as ``asdl``).

ASDL computes Kronecker-factored Fisher matrices through ``asdl.get_fisher_maker``
with ``asdl.FisherConfig(fisher_type=..., fisher_shapes=[asdl.SHAPE_KRON], ...)``
(``asdl/fisher.py``; version 0.1a5 has no ``fisher_for_cross_entropy``). What the
library computes, read from its source (``asdl/fisher.py``, ``asdl/operations/``,
``asdl/symmatrix.py``) and its docstrings (``asdl/precondition/natural_gradient.py``,
``NaturalGradientMaker``: "data_size: The size of data to be used for averaging
curvature information", "scale: The scale of Fisher information matrix", "var: The
variance of the Gaussian distribution used when fisher_type = 'fisher_mc' and
loss_type = 'mse'"):

- Per layer a ``Kron(A, B)`` with ``A = c Σ_n a_n a_nᵀ`` (inputs, *without* the
  bias's 1) and ``B = c Σ_n Σ_v g_{n,v} g_{n,v}ᵀ`` (output gradients), ``c =
  scale / data_size``. Its matrix-vector product (``symmatrix.Kron.mvp``) applies
  ``B ⊗ A`` to rvec(W) and ``B`` to the bias: separate bias, bias block ``B``.
- Conv2d: ``A`` is divided by the number of output positions and ``B`` sums over
  them (KFAC-expand); the weight is viewed as ``(C_out, C_in·kh·kw)``.
- The backpropagated vectors per datum (each loss is reduced with ``sum``):
  ``fisher_exact`` + ``cross_entropy``: ``√p_c ∇_f(−log p_c)`` for every class c
  (so ``Σ_v g gᵀ`` is the GGN of the negative log-likelihood); ``fisher_exact`` +
  ``mse``: the unit vectors ``e_i`` (so ``Σ_v g gᵀ = I``, the Fisher of the
  unit-variance Gaussian ``N(f, I)``, i.e. the GGN of ``½‖f − y‖²``);
  ``fisher_mc``: ``∇_f`` of ``−log p(ỹ | f)/M`` with ``ỹ`` drawn from the
  categorical (CE) or from ``N(f, var·I)`` (MSE, loss ``½‖f − ỹ‖²``);
  ``fisher_emp``: the gradient of the user's loss (reduction forced to ``sum``,
  ``GradientMaker._call_loss_fn``) at the true labels.

Conversion to the canonical target ``L = R Σ_n ℓ_n`` (README, Conventions). ASDL's
Fisher is an *average over* ``data_size`` *data* of the per-datum quantity, so this
adapter runs with ``scale = 1``, ``data_size = N`` (the whole data set; batches are
accumulated with ``accumulate=True``), which gives ``A = (1/N) Σ_n a aᵀ`` exactly as
in the canonical form, and multiplies ``B`` by ``R · N`` (``N`` for sum, ``1/T``
for mean). (A Linear layer on (N, S, D) inputs sums over all N·S rows, so with this
``data_size`` its block is S times KFAC-expand: finding ASDL 4, reported as computed.)
For MSE with ``fisher_exact``/``fisher_mc`` it also multiplies by 2:
ASDL's ``mse`` is the Gaussian likelihood with ``var = 1`` (criterion
``½‖f − y‖²``), while PyTorch's ``MSELoss`` has Hessian ``2 I`` (a documented
convention difference, like BackPACK's). ``var`` is left at its default 1. The
library's ``scale`` argument is *not* used for this: it multiplies both ``A`` and
``B`` (weight block ∝ scale², bias block ∝ scale), see ``docs/adapters/asdl.md``.

The result is ``KroneckerFactors(A, G = R·N·k·B, bias="separate")`` (bias block
``G``), or ``bias="none"`` for bias-free modules. ASDL registers hooks and sets
attributes on modules, so it runs on a deep copy of the model; MC sampling uses
the global torch RNG, which is forked (restored afterwards) and seeded once with
``request.seed`` (``FisherConfig.seed`` would re-seed at every batch).

Findings (measured numbers in ``docs/adapters/asdl.md``; reproductions in
``examples/findings/asdl_*.py``) are reported as computed, never corrected here.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from kfac_oracle.adapters._common import Expectation, Finding, Library, check_request
from kfac_oracle.contract import KFACRequest, KroneckerFactors, LayerOperations

LIBRARY = Library("asdfghjkl", "asdl", extra="asdl")


def _first_output(request: KFACRequest) -> torch.Tensor:
    """Model output on the first datum (shape probe, no gradients)."""
    X = request.data[0][0]
    with torch.no_grad():
        return request.model(X[:1])


class _AsdlKron:
    """Shared implementation of the ASDL Kronecker-factored Fisher adapters.

    Attributes:
        name: Built-in name.
        capabilities: Declared support (see ``kfac_oracle.contract``).
    """

    name: ClassVar[str] = ""
    _asdl_fisher_type: ClassVar[str] = ""
    _losses: ClassVar[set[str]] = {"CrossEntropyLoss", "MSELoss"}
    capabilities: ClassVar[dict[str, set[str] | set[int]]] = {}

    def _check(self, request: KFACRequest) -> None:
        """Raise ``NotImplementedError`` for requests outside the capabilities."""
        caps = self.capabilities
        check_request(self.name, caps, request)
        ndim = _first_output(request).ndim
        if ndim not in caps["output_ndim"]:
            raise NotImplementedError(f"{self.name}: output ndim {ndim} not supported")
        if (
            ndim > 2
            and request.loss_name == "CrossEntropyLoss"
            and self._asdl_fisher_type != "fisher_emp"
        ):
            # ASDL's own cross-entropy (FisherExact/MCCrossEntropy) takes the classes
            # last (``view(-1, C)``); PyTorch's CrossEntropyLoss takes them in dim 1.
            raise NotImplementedError(
                f"{self.name}: ASDL's cross-entropy Fisher expects classes last"
            )
        for name, mod in request.model.named_modules():
            if isinstance(mod, nn.Conv2d) and (
                mod.dilation != (1, 1)
                or mod.groups != 1
                or isinstance(mod.padding, str)
                or mod.padding_mode != "zeros"
            ):
                # asdl.utils.im2col_2d raises for dilation and string padding and
                # does not handle groups or non-zero padding modes.
                raise NotImplementedError(
                    f"{self.name}: Conv2d {name!r} with dilation, groups, string "
                    "padding or a non-zero padding mode"
                )

    def fit(self, request: KFACRequest) -> tuple[dict[str, Any], float]:
        """Run ASDL's ``FisherMaker`` over the request's batches on a model copy.

        Returns:
            The copy's modules by name (each fitted module carries ASDL's
            ``SymMatrix`` as ``module.fisher``, with ``fisher.kron = Kron(A, B)``) and
            ``c = R·N·k`` with ``G = c·B`` (``k = 2`` for MSE with ``fisher_exact``/
            ``fisher_mc``, else 1).

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        asdl = LIBRARY.load()
        self._check(request)
        model = copy.deepcopy(request.model)
        loss_func = copy.deepcopy(request.loss_func)
        N = request.num_data
        loss_type = (
            asdl.LOSS_CROSS_ENTROPY
            if request.loss_name == "CrossEntropyLoss"
            else asdl.LOSS_MSE
        )
        config = asdl.FisherConfig(
            fisher_type=self._asdl_fisher_type,
            fisher_shapes=[asdl.SHAPE_KRON],
            loss_type=loss_type,
            n_mc_samples=request.mc_samples,
            seed=None,
            data_size=N,
            scale=1.0,
        )
        fisher_maker = asdl.get_fisher_maker(model, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(request.seed)
            for i, (X, y) in enumerate(request.data):
                dummy_y = fisher_maker.setup_model_call(model, X)
                fisher_maker.setup_loss_call(loss_func, dummy_y, y)
                fisher_maker.forward_and_backward(accumulate=i > 0)

        factor = request.reduction_factor * N
        if request.loss_name == "MSELoss" and self._asdl_fisher_type != asdl.FISHER_EMP:
            factor *= 2.0  # ASDL's 'mse' is ½‖f − y‖² (Gaussian with var = 1).
        return dict(model.named_modules()), factor

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """Compute ASDL's Kronecker factors for the request's Linear/Conv2d modules.

        Args:
            request: The harness's request.

        Returns:
            Module name → ``KroneckerFactors`` with ``bias="separate"`` (or ``"none"``
            for bias-free modules), block ``G ⊗ A`` in rvec.

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        copies, factor = self.fit(request)
        result: dict[str, KroneckerFactors] = {}
        for name, mod in request.modules().items():
            kron = copies[name].fisher.kron
            has_bias = mod.bias is not None and mod.bias.requires_grad
            result[name] = KroneckerFactors(
                input_covariance=kron.A.detach().clone(),
                gradient_covariance=(factor * kron.B).detach().clone(),
                bias="separate" if has_bias else "none",
            )
        return result


_COMMON_CAPS: dict[str, Any] = {
    "bias": {"separate"},
    "kfac_approx": {"expand"},
    "layers": {"Linear", "Conv2d"},
    "reductions": {"mean", "sum"},
    # Sequence outputs (N, S, C): ASDL's Linear handles (N, S, D) inputs and its loss
    # terms are per output entry (MSE) or per row of ``view(-1, C)`` (CE, classes last).
    "output_ndim": {2, 3},
}


class AsdlFisherExact(_AsdlKron):
    """ASDL ``fisher_exact`` + ``SHAPE_KRON``: type-2 KFAC (CE and MSE only).

    ``G = R·N·k·B`` with ``k = 2`` for MSE (ASDL's unit-variance Gaussian) and
    ``k = 1`` for cross-entropy; ``A`` as computed by ASDL (weight only).
    """

    name = "asdl-fisher-exact"
    _asdl_fisher_type = "fisher_exact"
    capabilities = {
        **_COMMON_CAPS,
        "fisher_type": {"type-2"},
        "losses": {"CrossEntropyLoss", "MSELoss"},
    }


class AsdlFisherMC(_AsdlKron):
    """ASDL ``fisher_mc`` + ``SHAPE_KRON``: Monte-Carlo KFAC (CE and MSE only).

    ``request.mc_samples`` is ASDL's ``n_mc_samples``; MSE samples ``ỹ ~ N(f, I)``
    (``var = 1``) with criterion ``½‖f − ỹ‖²`` and ``G`` is doubled as for the exact
    flavour. ASDL divides each sample's loss by ``M`` before forming ``g gᵀ``, so its
    ``B`` carries ``1/M²`` per sample; that is reported as computed (a finding).
    """

    name = "asdl-fisher-mc"
    _asdl_fisher_type = "fisher_mc"
    capabilities = {
        **_COMMON_CAPS,
        "fisher_type": {"mc"},
        "losses": {"CrossEntropyLoss", "MSELoss"},
    }


class AsdlFisherEmp(_AsdlKron):
    """ASDL ``fisher_emp`` + ``SHAPE_KRON``: empirical-Fisher KFAC.

    Uses the PyTorch loss itself (reduction forced to ``sum`` by ASDL), so MSE
    needs no factor 2 and ``BCEWithLogitsLoss`` works too: ``G = R·N·B``.
    """

    name = "asdl-fisher-emp"
    _asdl_fisher_type = "fisher_emp"
    capabilities = {
        **_COMMON_CAPS,
        "fisher_type": {"empirical"},
        "losses": {"CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"},
    }


class AsdlKFACInverse:
    """ASDL's damped K-FAC inverse, as its K-FAC preconditioner applies it.

    ``KfacGradientMaker`` (``precondition/natural_gradient.py``) inverts each layer's
    ``Kron`` with ``matrix.update_inv(damping)`` (``update_preconditioner``, line
    454; ``FisherMaker.replace_fisher_with_inv``, ``fisher.py:182-191``, on the
    ``calc_inv`` path) and applies it with ``matrix.mvp(..., use_inv=True)``
    (``_precondition_module``, lines 539-543). What these calls compute
    (``asdl/symmatrix.py``, asdfghjkl 0.1a5):

    - ``SymMatrix.update_inv(damping)`` (lines 303-314) calls
      ``Kron.update_inv(damping)`` (lines 499-534), which damps each factor by
      Martens & Grosse's π-heuristic: ``π = sqrt((tr A / dim A) / (tr B / dim B))``,
      ``A + max(√δ·π, eps) I`` and ``B + max(√δ/π, eps) I`` with ``eps = 1e-7``
      (lines 502-510; ``δ`` itself where π is 0 or infinite), each inverted by
      ``utils.cholesky_inv(X, d) = (X + d I)⁻¹`` (``utils.py:91-96``). The operation
      context's ``calc_inv`` path uses the same rule
      (``operations/operation.py:457-466``, ``cov_kron_damping``).
    - ``Kron.mvp(W, use_inv=True)`` (lines 536-548) is ``B⁻¹_δ W A⁻¹_δ`` on the
      weight viewed ``(out, in)``: ``(B_δ ⊗ A_δ)⁻¹`` in rvec.
    - ``Kron.trace()`` (lines 466-469) is ``tr A · tr B``; ``Kron.eigenvalues()``
      (lines 455-459) the products ``α_i β_j`` of the factors' eigenvalues, sorted.

    That is the ``pi`` convention of docs/theory.md §10 on ASDL's ``B ⊗ A``, up to
    the ``eps`` clamp (which acts only where ``√δ·π`` or ``√δ/π`` is below ``1e-7``).
    ``PreconditioningConfig`` documents the damping as "An identity matrix multiplied
    by the damping value will be added to the curvature matrix before taking its
    inverse" (``precondition/prec_grad_maker.py:52-53``), i.e. ``product``; the code
    implements ``pi`` (finding ASDL 8). The adapter declares what the code does.

    Scale: the contract's block is ``K = c·(B ⊗ A)`` with ``c = R·N·k``
    (:meth:`_AsdlKron.fit`, as ``asdl-fisher-exact``/``asdl-fisher-emp``). The
    π-damped matrix is homogeneous, ``pi_λ(c·B ⊗ A) = c · pi_{λ/c}(B ⊗ A)`` (π
    absorbs the scalar), so ``K_λ⁻¹ V = (1/c) · ASDL's inverse at δ = λ/c``,
    ``tr K = c · Kron.trace()`` and the eigenvalues of ``K`` are
    ``c · Kron.eigenvalues()``. Scores are ``Uᵀ (K_λ⁻¹ V)`` from that inverse; ASDL
    offers no log-determinant and no diagonal of a ``Kron``.

    A bias is ASDL's own block (``B`` applied to the bias, no cross terms) and π is
    computed from ``A`` without the bias's 1: the separate-bias block, not the
    joint-bias one the operations are defined on. Layers with a bias are therefore
    unsupported. Curvature requests return the factors of ``asdl-fisher-exact``
    (type-2) or ``asdl-fisher-emp`` (empirical).
    """

    name = "asdl-kfac-inverse"
    _fitters: ClassVar[dict[str, type[_AsdlKron]]] = {
        "type-2": AsdlFisherExact,
        "empirical": AsdlFisherEmp,
    }
    capabilities: ClassVar[dict[str, Any]] = {
        **{k: v for k, v in _COMMON_CAPS.items() if k != "bias"},
        "fisher_type": {"type-2", "empirical"},
        "losses": {"CrossEntropyLoss", "MSELoss"},
        "operations": {"inverse", "trace", "scores", "eigenvalues"},
        "damping": {"pi"},
    }

    @staticmethod
    def fisher_scale(factor: float) -> float:
        """``c`` with ``K = c·(B ⊗ A)``: ``R·N·k`` from :meth:`_AsdlKron.fit`."""
        return factor

    def compute(self, request: KFACRequest) -> dict[str, Any]:
        """Factors, or ``LayerOperations`` from ASDL's ``Kron`` inverse per layer.

        Raises:
            NotImplementedError: If the request is outside the capabilities, asks
                for another damping convention, or has a layer with a bias.
        """
        fitter = self._fitters.get(request.fisher_type)
        if fitter is None:
            raise NotImplementedError(
                f"{self.name}: fisher_type {request.fisher_type!r} not supported"
            )
        if request.operations is None:
            return fitter().compute(request)
        convention = request.operations.convention
        if convention != "pi":
            raise NotImplementedError(
                f"{self.name}: ASDL's Kron.update_inv damps by the π-heuristic (pi), "
                f"not {convention}"
            )
        modules = request.modules()
        biased = [name for name, mod in modules.items() if mod.bias is not None]
        if biased:
            raise NotImplementedError(
                f"{self.name}: layers {biased} have a bias, which ASDL's Kron keeps as "
                "a separate block (the operations act on the joint-bias block)"
            )
        copies, factor = fitter().fit(request)
        c = self.fisher_scale(factor)
        out: dict[str, Any] = {}
        for name in modules:
            fisher = getattr(copies[name], "fisher", None)
            if fisher is None or fisher.kron is None:
                raise NotImplementedError(
                    f"{self.name}: ASDL computed no Kron for {name!r}"
                )
            shape = copies[name].weight.shape

            def inverse_product(V, lam, fisher=fisher, shape=shape):
                fisher.update_inv(damping=lam / c)
                columns = [
                    fisher.kron.mvp(v.reshape(shape), use_inv=True).reshape(-1)
                    for v in V.T
                ]
                return torch.stack(columns, dim=1) / c

            def scores(U, V, lam, inverse_product=inverse_product):
                return U.T @ inverse_product(V, lam)

            out[name] = LayerOperations(
                inverse_product=inverse_product,
                trace=c * fisher.kron.trace(),
                scores=scores,
                eigenvalues=c * fisher.kron.eigenvalues(),
            )
        return out


ADAPTERS: dict[str, type] = {
    AsdlFisherExact.name: AsdlFisherExact,
    AsdlFisherMC.name: AsdlFisherMC,
    AsdlFisherEmp.name: AsdlFisherEmp,
    AsdlKFACInverse.name: AsdlKFACInverse,
}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "ASDL 1",
        "new",
        "n_mc_samples = M scales the MC Fisher by 1/M",
        "fisher.py FisherMC*._fisher_loop; master = 0.1a5",
        adapters=("asdl-fisher-mc",),
    ),
    Finding(
        "ASDL 2",
        "new",
        "scale enters the weight block squared",
        "set_cov_scale scales both factors",
    ),
    Finding(
        "ASDL 3",
        "new",
        "MSE var: the exact Fisher ignores it, MC multiplies by it",
        "FisherExactMSE, FisherMCMSE",
    ),
    Finding(
        "ASDL 4",
        "new",
        "Linear on (N, S, D) normalises per token, Conv2d per example: no single "
        "data_size fits a network mixing them",
        "operations/linear.py vs operations/conv.py cov_kron_A",
        adapters=(
            "asdl-fisher-exact",
            "asdl-fisher-mc",
            "asdl-fisher-emp",
            "laplace-kron-asdl",
        ),
    ),
    Finding(
        "ASDL 5",
        "documented convention",
        "mse is the unit-variance Gaussian ½‖f − y‖² (the adapter converts)",
        "NaturalGradientMaker docstring (var)",
    ),
    Finding(
        "ASDL 6",
        "documented limitation",
        "Conv2d with dilation is rejected",
        'utils.im2col_2d: "conv2d.dilation has to be (1, 1)"',
        adapters=("asdl-fisher-exact", "asdl-fisher-mc", "asdl-fisher-emp"),
    ),
    Finding(
        "ASDL 7",
        "new",
        "the exact MSE Fisher of (N, S, C) outputs indexes positions, not classes",
        "fisher.py FisherExactMSE._fisher_loop, logits[:, i]",
        adapters=("asdl-fisher-exact",),
    ),
    Finding(
        "ASDL 8",
        "new",
        "the damping documented as 'an identity matrix multiplied by the damping value "
        "added to the curvature matrix' (K + δI) damps each Kronecker factor by the "
        "π-heuristic instead",
        "prec_grad_maker.py PreconditioningConfig docstring vs symmatrix.py "
        "Kron.update_inv; master = 0.1a5",
    ),
]


# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation(
        "asdl-fisher-exact",
        "deep_linear_d2_bias_mse_mean",
        "exact_*_type-2_*,agree_type-2_*,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "asdl-fisher-exact", "one_datum_cro_sum", "exact_*_type-2_*,agree_type-2_*"
    ),
    Expectation("asdl-fisher-mc", "mlp_tanh_cro_mean", "mc_reproducible,wellformed"),
    Expectation(
        "asdl-fisher-emp",
        "one_datum_bce_binary_sum",
        "exact_*_empirical_*,agree_empirical_*,batch_split",
    ),
    Expectation(
        "asdl-kfac-inverse",
        "deep_linear_d2_nobias_mse_mean",
        "op_inverse,op_scores,op_trace,op_spd",
    ),
    Expectation(
        "asdl-kfac-inverse",
        "deep_linear_d1_nobias_mse_sum",
        "op_inverse,op_scores,op_trace,op_spd",
    ),
    Expectation(
        "asdl-fisher-mc",
        "mlp_tanh_cro_mean",
        "mc_converges_*",
        "failed",
        text="1/M applied twice",
        finding="ASDL 1",
    ),
]
