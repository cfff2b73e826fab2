"""Adapters exposing BackPACK's Kronecker-factored curvatures (KFLR, KFAC, KFRA).

BackPACK (PyPI ``backpack-for-pytorch``, tested with 1.7.1) computes Kronecker factors
during ``loss.backward()`` inside ``with backpack(ext):`` after ``extend(model)`` and
``extend(loss_func)``. The factors are stored per parameter as a list:

- ``weight.kflr / .kfac / .kfra == [G, A]`` whose Kronecker product ``G ⊗ A`` is the
  weight block in PyTorch's row-major (rvec) flattening. Documented in the class
  docstrings of ``backpack.extensions.secondorder.hbp.KFLR/KFAC/KFRA`` ("arranged in
  the order such that their Kronecker product represents the GGN", with the note
  that torch is row-major); the order is visible in
  ``backpack/extensions/secondorder/hbp/linear.py: HBPLinear._weight_for_sqrt``
  (``[Σ_{v,n} s sᵀ] + [mean_n a aᵀ]``) and ``convnd.py: HBPConvNd.weight``.
- ``bias.kflr / .kfac / .kfra == [G]``: a separate bias block, no weight-bias cross
  terms (``HBPLinear.bias``). The adapters therefore report ``bias="separate"`` with
  ``bias_covariance`` = BackPACK's bias factor.

Per batch ``b`` of size ``B_b`` (all in ``backpack/core/derivatives``):

- ``A_b = (1/B_b) Σ_{n∈b} a_n a_nᵀ`` (``HBPLinear.__mean_input_outer``); for Conv2d
  ``A_b = (1/B_b) Σ_{n∈b} Σ_s a_{n,s} a_{n,s}ᵀ`` over unfolded patches
  (``HBPConvNd._factors_from_input``).
- ``G_b = Σ_{n∈b} Σ_v g_{n,v} g_{n,v}ᵀ`` where the backpropagated vectors are columns
  of a square root of ``R_b · H_n``: BackPACK targets the loss *exactly as the batch's
  loss module computes it*, ``L_b = R_b Σ_{n∈b} ℓ_n`` with ``R_b = 1`` (sum) or
  ``1/(B_b·T)`` (mean). MSELoss: ``sqrt(2)·I / sqrt(numel)`` in mean mode
  (``mseloss.py: MSELossDerivatives._sqrt_hessian``: Hessian ``2·I``, mean over all
  ``B_b·D`` entries); CrossEntropyLoss: mean over ``numel/C`` terms
  (``crossentropyloss.py: _get_mean_normalization``); BCEWithLogitsLoss: mean over
  ``B_b`` (single output only). MC (KFAC): gradients at labels sampled from the
  likelihood, ``N(f, 1/2)`` for MSE (``MSELossDerivatives._make_distribution``),
  divided by ``sqrt(M)`` (``nll_base.py: _sqrt_hessian_sampled``).

BackPACK works on one batch and does not accumulate across ``backward`` calls (each call
overwrites the fields). The whole-data loss is ``L = R Σ_n ℓ_n = Σ_b (R/R_b) L_b``, so
the adapter combines per-batch factors as KFAC over the whole data set requires:

    A = Σ_b (B_b / N) · A_b,      G = Σ_b (R / R_b) · G_b,

with ``R/R_b = B_b/N`` for ``reduction="mean"`` and ``1`` for ``"sum"`` (the same
weights apply to the bias factor). For a single batch this is BackPACK's output
unchanged. This combination is the adapter's, not the library's.

Limitations declared through ``capabilities``: model outputs must be 2-D (BackPACK's
MSELoss, BCEWithLogitsLoss and Linear second-order extensions only accept 2-D inputs),
BCEWithLogitsLoss only with a single output column, no grouped convolutions.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from kfac_oracle.adapters._common import (
    Expectation,
    Finding,
    Library,
    check_request,
    documented_differences,
)
from kfac_oracle.contract import KFACRequest, KroneckerFactors

LIBRARY = Library("backpack-for-pytorch", "backpack", extra="backpack")


class _BackpackBase:
    """Shared implementation of the BackPACK adapters.

    Subclasses set ``name``, ``capabilities``, ``_savefield`` and implement
    :meth:`_extension`.
    """

    # Failures the library documents (findings with ``checks``): "documented".
    documented: dict[str, str] = {}

    name = "backpack"
    _savefield = ""
    capabilities: dict[str, Any] = {}

    def _extension(self, request: KFACRequest) -> Any:
        raise NotImplementedError

    def _check(self, request: KFACRequest) -> None:
        """Raise ``NotImplementedError`` for requests outside the capabilities.

        Args:
            request: The request to check.

        Raises:
            NotImplementedError: If the request is not supported.
        """
        caps = self.capabilities
        check_request(self.name, caps, request)
        loss = request.loss_func
        if isinstance(loss, nn.BCEWithLogitsLoss) and (
            loss.weight is not None or loss.pos_weight is not None
        ):
            raise NotImplementedError(f"{self.name}: BCE weights are unsupported")
        if isinstance(loss, nn.CrossEntropyLoss) and (
            loss.weight is not None
            or loss.ignore_index != -100
            or loss.label_smoothing != 0.0
        ):
            raise NotImplementedError(f"{self.name}: non-default CrossEntropyLoss")

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """Compute BackPACK's factors for every requested module.

        Each batch is processed by one ``backward`` in BackPACK's context; the per-batch
        factors are combined with ``A = Σ_b (B_b/N) A_b`` and ``G = Σ_b (R/R_b) G_b``
        (see the module docstring).

        Args:
            request: The request.

        Returns:
            ``KroneckerFactors`` (``bias="separate"`` or ``"none"``) per module name.
        """
        self._check(request)
        backpack = LIBRARY.load("extensions")

        # BackPACK's `extend` installs hooks and stores inputs on the modules: work on
        # copies so the caller's model and loss stay untouched. In-place activations
        # are incompatible with the full backward hooks; BackPACK's documented remedy
        # is its converter, `extend(model, use_converter=True)` (its "inplace ->
        # normal" transformation), used here only for models that need it.
        model = backpack.extend(
            copy.deepcopy(request.model),
            use_converter=_has_inplace_module(request.model),
        )
        loss_func = backpack.extend(copy.deepcopy(request.loss_func))
        wanted = request.modules(model)
        missing = sorted(set(request.layers) - set(wanted))
        if missing:
            raise NotImplementedError(f"{self.name}: unsupported modules {missing}")
        num_data = request.num_data
        mean = request.reduction == "mean"

        sums: dict[str, dict[str, Tensor]] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(request.seed)
            for X, y in request.data:
                batch_size = X.shape[0]
                out = model(X)
                if out.ndim != 2:
                    raise NotImplementedError(
                        f"{self.name}: model output must be 2-D, got {out.ndim}-D"
                    )
                model.zero_grad()
                loss = loss_func(out, y)
                with (
                    backpack.backpack(self._extension(request)),
                    warnings.catch_warnings(),
                ):
                    # Emitted by torch because the data do not require gradients.
                    warnings.filterwarnings(
                        "ignore", message="Full backward hook is firing"
                    )
                    loss.backward()
                w_input = batch_size / num_data
                w_grad = batch_size / num_data if mean else 1.0
                for name, module in wanted.items():
                    factors = getattr(module.weight, self._savefield)
                    G_b, A_b = factors[0].detach(), factors[1].detach()
                    entry = sums.setdefault(name, {})
                    _accumulate(entry, "G", w_grad * G_b)
                    _accumulate(entry, "A", w_input * A_b)
                    if module.bias is not None:
                        (Gb_b,) = getattr(module.bias, self._savefield)
                        _accumulate(entry, "Gbias", w_grad * Gb_b.detach())
                model.zero_grad()

        result: dict[str, KroneckerFactors] = {}
        for name, entry in sums.items():
            if "Gbias" in entry:
                result[name] = KroneckerFactors(
                    input_covariance=entry["A"],
                    gradient_covariance=entry["G"],
                    bias="separate",
                    bias_covariance=entry["Gbias"],
                )
            else:
                result[name] = KroneckerFactors(
                    input_covariance=entry["A"],
                    gradient_covariance=entry["G"],
                    bias="none",
                )
        return result


def _has_inplace_module(model: nn.Module) -> bool:
    """Whether a module of ``model`` computes in place (e.g. ``ReLU(inplace=True)``)."""
    return any(getattr(module, "inplace", False) for module in model.modules())


def _accumulate(entry: dict[str, Tensor], key: str, value: Tensor) -> None:
    """Add ``value`` to ``entry[key]`` (creating it on first use)."""
    entry[key] = value.contiguous().clone() if key not in entry else entry[key] + value


_COMMON_CAPS: dict[str, Any] = {
    # BackPACK's Conv2d factors are neither expand nor reduce (see docs/adapters/
    # backpack.md, finding B1): declared as "expand" because A is the expand-style
    # patch covariance and BackPACK cites KFC; the harness reports the mismatch.
    "kfac_approx": {"expand"},
    "layers": {"Linear", "Conv2d"},
    "losses": {"MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss"},
    "reductions": {"mean", "sum"},
    "output_ndim": {2},
}


class BackpackKFLR(_BackpackBase):
    """BackPACK's ``KFLR``: type-2 KFAC (exact loss-Hessian square root).

    ``G = Σ_n Σ_c s_{n,c} s_{n,c}ᵀ`` with ``s`` the backpropagated columns of a
    symmetric square root of ``R·H_n`` (``LossHessianStrategy.EXACT``, ``SQRT``
    backpropagation), ``A = (1/N) Σ_n a aᵀ``. Exact wherever type-2 KFAC is exact
    (catalogue claims E1, E2) for Linear layers.
    """

    name = "backpack-kflr"
    _savefield = "kflr"
    capabilities = {**_COMMON_CAPS, "fisher_type": {"type-2"}}

    def _extension(self, request: KFACRequest) -> Any:
        from backpack.extensions import KFLR

        return KFLR()


class BackpackKFAC(_BackpackBase):
    """BackPACK's ``KFAC``: Monte-Carlo KFAC.

    As :class:`BackpackKFLR` but the vectors are ``∇_f ℓ(f_n, ỹ_{n,m}) / sqrt(M)`` for
    ``M = request.mc_samples`` labels sampled from the model's predictive distribution
    (``LossHessianStrategy.SAMPLING``). Sampling uses torch's global generator, seeded
    with ``request.seed`` inside ``torch.random.fork_rng`` (the caller's RNG state is
    restored).
    """

    name = "backpack-kfac"
    _savefield = "kfac"
    capabilities = {**_COMMON_CAPS, "fisher_type": {"mc"}}

    def _extension(self, request: KFACRequest) -> Any:
        from backpack.extensions import KFAC

        return KFAC(mc_samples=request.mc_samples)


class BackpackKFRA(_BackpackBase):
    """BackPACK's ``KFRA`` (Botev et al. 2017): a further approximation of type-2 KFAC.

    Instead of backpropagating a square root of each ``H_n``, KFRA backpropagates the
    batch-summed loss Hessian ``Σ_n R·H_n`` and averages over the batch after every
    step, ``Ĝ_in = (1/B) Σ_n J_nᵀ Ĝ_out J_n`` (``ea_jac_t_mat_jac_prod``; the
    second-order residual of nonlinearities is dropped for the GGN), i.e. it replaces
    ``E_n[J_nᵀ H_n J_n]`` by the recursion ``E[Jᵀ E[H] J]``. The weight factor is
    ``G = Ĝ`` at the layer output, ``A = (1/B) Σ a aᵀ``.

    It coincides with KFLR (so with type-2 KFAC) where the Jacobians between the layer
    output and the loss input do not depend on the datum and the loss Hessian does not
    depend on the datum: every layer of a deep linear network with MSELoss, the last
    layer with MSELoss, and ``N = 1``. With several batches the per-batch KFRA factors
    are combined as in the module docstring, which is not the full-batch KFRA (the
    recursion is nonlinear in the data). Declared ``fisher_type="type-2"`` as the
    quantity it approximates; the oracle treats it as approximate elsewhere.
    """

    name = "backpack-kfra"
    _savefield = "kfra"
    # BCEWithLogitsLoss has no `_sum_hessian` in BackPACK 1.7.1 (NotImplementedError).
    capabilities = {
        **_COMMON_CAPS,
        "fisher_type": {"type-2"},
        "losses": {"MSELoss", "CrossEntropyLoss"},
    }

    def _extension(self, request: KFACRequest) -> Any:
        from backpack.extensions import KFRA

        return KFRA()


ADAPTERS = {
    "backpack-kflr": BackpackKFLR,
    "backpack-kfac": BackpackKFAC,
    "backpack-kfra": BackpackKFRA,
}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "B1",
        "known",
        "the Conv2d weight block of KFLR/KFAC is G_reduce ⊗ S·A_expand (S times KFAC-"
        "expand for per-pixel outputs)",
        "HBPConvNd docstrings, PR #290 (commit 5e0fb35)",
        adapters=("backpack-kflr", "backpack-kfac", "laplace-kron-backpack"),
    ),
    Finding(
        "B2",
        "documented convention",
        "factors are per backward call, never accumulated (the adapter averages "
        "batches)",
        "docs good-to-know.rst",
    ),
    Finding(
        "B3",
        "documented limitation",
        "2-D outputs for MSE/BCE, 2-D inputs for Linear, no grouped convolutions",
        "explicit errors in mseloss.py, hbp/linear.py, hbp/convnd.py",
        adapters=("backpack-kflr", "backpack-kfac", "backpack-kfra"),
    ),
    Finding(
        "B4",
        "documented convention",
        "KFRA is a further approximation: it differs from KFLR away from its exact "
        "cases",
        "KFRA class docstring (Botev et al. 2017)",
        adapters=("backpack-kfra",),
        checks=("agree_type-2_*", "current_parameters", "batch_split", "shuffle"),
    ),
    Finding(
        "B5",
        "new",
        "KFRA with MSE on float64 models crashes or returns float32 factors",
        "core/derivatives/mseloss.py _sum_hessian: 2 * eye(D) without dtype; "
        "unchanged on master",
        adapters=("backpack-kfra",),
    ),
    Finding(
        "B6",
        "documented limitation",
        "in-place activations break extend(); the documented converter "
        "(use_converter=True) is used",
        "ResNet example note; extend(model, use_converter=True)",
        adapters=("backpack-kflr", "backpack-kfac", "backpack-kfra"),
    ),
]


# KFRA's documented further approximation (B4) is reported "documented", not failed.
BackpackKFRA.documented = documented_differences(FINDINGS, BackpackKFRA.name)

# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation(
        "backpack-kflr",
        "deep_linear_d2_bias_mse_mean",
        "exact_*_type-2_*,agree_type-2_*,mean_vs_sum,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "backpack-kflr",
        "one_datum_cro_sum",
        "exact_*_type-2_*,agree_type-2_*,batch_split",
    ),
    Expectation("backpack-kfac", "mlp_tanh_cro_mean", "mc_reproducible,wellformed"),
    Expectation(
        "backpack-kfra",
        "one_datum_cro_sum",
        "exact_*_type-2_*,agree_type-2_*,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "backpack-kflr",
        "conv_flat_k3_pad1_mse_mean",
        "exact_E5_type-2_expand",
        "failed",
        text="too large by S",
        finding="B1",
    ),
    Expectation(
        "backpack-kfra",
        "deep_linear_d2_bias_mse_mean",
        "wellformed",
        "error",
        text="Float",
        finding="B5",
    ),
]
