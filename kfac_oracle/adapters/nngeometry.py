"""Adapter for nngeometry (PyPI ``nngeometry``): ``PMatKFAC`` and ``PMatEKFAC``.

nngeometry builds Fisher matrices with ``nngeometry.metrics.FIM`` (closed-form
expectation over ``y | x``) and ``FIM_MonteCarlo`` (sampled ``y``), both returning
``representation(generator=TorchHooksJacobianBackend(...), examples=loader)``
(``nngeometry/metrics.py``). Conventions, as documented there and in the source:

- ``FIM`` docstring: variant ``'classif_logits'``: "the NN returns logits to be used
  in a softmax model"; ``'classif_binary_logits'``: "1d logits to be used in a
  sigmoid model"; ``'regression'``: "the NN returns the mean of a normal
  distribution with identity covariance" (Fisher ``Jᵀ J``, i.e. the GGN of
  ``½‖f − y‖²``). ``FIM_MonteCarlo`` only has classification variants.
- The Fisher is an average over the examples: ``get_kfac_blocks``
  (``backend/torch_hooks/torch_hooks.py``) divides by ``n_examples =
  len(loader.sampler)``; the product ``G ⊗ A`` is ``(1/N²) Σ g gᵀ ⊗ Σ ã ãᵀ``
  (the ``√n_output`` moved between the factors is a scalar).
- Factor layout (``object/pspace.py``, ``PMatKFAC.to_torch`` and
  ``backend/torch_hooks/grads.py``, ``kfac_xx``/``kfac_gg``): ``pmat.data[layer_id]
  = (a, g)``, ``a`` over ``[x; 1]`` (bias last, joint), block ``g ⊗ a`` over the
  rows of ``[W | b]`` (rvec). Conv2d: ``a`` sums unfold patches over positions,
  ``g`` divides by the number of positions (KFAC-expand up to a scalar).
- ``PMatEKFAC`` (``object/pspace.py``): eigenvectors ``(evecs_a, evecs_g)`` of the
  KFAC factors and a diagonal that must be refreshed with ``update_diag(examples)``
  (George et al.'s re-fitted eigenvalues; without it the diagonal is the KFAC one).
  ``PMatEKFAC.mv`` applies ``(U_g ⊗ U_a) diag(d) (U_g ⊗ U_a)ᵀ`` to rvec([W | b]).

Conversion to the canonical target ``L = R Σ_n ℓ_n`` (README, Conventions): nngeometry's
matrix is ``(1/N) Σ_n F_n``, so ``G`` is multiplied by ``R · N · k`` with ``k = 2``
for MSE (identity-covariance Gaussian vs. PyTorch's ``‖f − y‖²``) and ``k = 1``
otherwise. Bias is ``"joint"`` (``a`` already holds the 1). EKFAC is returned as a
``DenseBlock`` over ``[rvec(W); b]``.

The backend sets ``requires_grad`` on the input tensors it is given, so the adapter
passes clones, and runs on a deep copy of the model. MC sampling uses the global
torch RNG, which is forked and seeded with ``request.seed``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from kfac_oracle.adapters._common import Expectation, Finding, Library, check_request
from kfac_oracle.contract import DenseBlock, KFACRequest, KroneckerFactors
from kfac_oracle.conventions import joint_to_canonical_permutation, weight_shape_2d

LIBRARY = Library("nngeometry", "nngeometry", extra="nngeometry")


_VARIANTS = {
    "CrossEntropyLoss": "classif_logits",
    "MSELoss": "regression",
    "BCEWithLogitsLoss": "classif_binary_logits",
}


class _NngeometryBase:
    """Shared implementation of the nngeometry adapters.

    Attributes:
        name: Built-in name.
        capabilities: Declared support (see ``kfac_oracle.contract``).
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[dict[str, Any]] = {}
    _ekfac: ClassVar[bool] = False

    def _check(self, request: KFACRequest, modules: dict[str, nn.Module]) -> None:
        """Raise ``NotImplementedError`` for requests outside the capabilities."""
        caps = self.capabilities
        check_request(self.name, caps, request)
        if request.fisher_type == "mc" and request.loss_name != "CrossEntropyLoss":
            raise NotImplementedError(f"{self.name}: MC only for CrossEntropyLoss")
        X = request.data[0][0]
        # Record the input rank of every Linear (on a copy: the model stays as is).
        probe = copy.deepcopy(request.model)
        linear_ndim: dict[str, int] = {}
        handles = [
            mod.register_forward_pre_hook(
                lambda _m, args, name=name: linear_ndim.__setitem__(name, args[0].ndim)
            )
            for name, mod in probe.named_modules()
            if name in modules and isinstance(mod, nn.Linear)
        ]
        with torch.no_grad():
            out = probe(X[:1])
        for handle in handles:
            handle.remove()
        if out.ndim not in caps["output_ndim"]:
            raise NotImplementedError(f"{self.name}: model output must be (N, C)")
        shared = sorted(name for name, ndim in linear_ndim.items() if ndim != 2)
        if shared:
            # nngeometry's LinearLayer (layercollection.py) handles (N, D) inputs only;
            # with weight sharing (N, S, D) its hooks fail in ``t()``.
            raise NotImplementedError(
                f"{self.name}: Linear {shared} with weight sharing (input not (N, D))"
            )
        for name, mod in modules.items():
            if isinstance(mod, nn.Conv2d) and (
                mod.groups != 1 or isinstance(mod.padding, str)
            ):
                # nngeometry's Conv2dLayer has no groups; F.unfold needs int padding.
                raise NotImplementedError(
                    f"{self.name}: Conv2d {name!r} with groups or string padding"
                )

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors | DenseBlock]:
        """Compute nngeometry's KFAC (or EKFAC) blocks.

        Args:
            request: The harness's request.

        Returns:
            Module name → ``KroneckerFactors`` (joint bias) for KFAC, or
            ``DenseBlock`` (rvec, over ``[weight, bias]``) for EKFAC.

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        nng = LIBRARY.load("layercollection", "metrics", "object")
        from torch.utils.data import DataLoader, TensorDataset

        modules = request.modules()
        self._check(request, modules)
        model = copy.deepcopy(request.model)
        copies = dict(model.named_modules())
        layer_collection = nng.layercollection.LayerCollection()
        for name in modules:
            layer_collection.add_layer_from_model(model, copies[name])

        X_all = torch.cat([X for X, _ in request.data]).detach().clone()
        y_all = torch.cat([y for _, y in request.data]).detach().clone()
        batches, start = [], 0
        for X, _ in request.data:
            batches.append(list(range(start, start + len(X))))
            start += len(X)
        loader = DataLoader(TensorDataset(X_all, y_all), batch_sampler=batches)

        representation = nng.object.PMatEKFAC if self._ekfac else nng.object.PMatKFAC
        variant = _VARIANTS[request.loss_name]

        def function(*d: torch.Tensor) -> torch.Tensor:
            return model(d[0])

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(request.seed)
            if request.fisher_type == "mc":
                pmat = nng.metrics.FIM_MonteCarlo(
                    model=model,
                    loader=loader,
                    representation=representation,
                    variant=variant,
                    trials=request.mc_samples,
                    function=function,
                    layer_collection=layer_collection,
                )
            else:
                pmat = nng.metrics.FIM(
                    model=model,
                    loader=loader,
                    representation=representation,
                    variant=variant,
                    function=function,
                    layer_collection=layer_collection,
                )
            if self._ekfac:
                pmat.update_diag(loader)

        N = request.num_data
        factor = (
            request.reduction_factor
            * N
            * (2.0 if request.loss_name == "MSELoss" else 1.0)
        )

        result: dict[str, KroneckerFactors | DenseBlock] = {}
        for name, mod in modules.items():
            has_bias = mod.bias is not None
            if not self._ekfac:
                a, g = pmat.data[name]
                result[name] = KroneckerFactors(
                    input_covariance=a.detach().clone(),
                    gradient_covariance=(factor * g).detach().clone(),
                    bias="joint" if has_bias else "none",
                )
                continue
            evecs, diags = pmat.data
            evecs_a, evecs_g = evecs[name]
            Q = torch.kron(evecs_g, evecs_a)
            M = factor * (Q * diags[name].reshape(-1)) @ Q.T
            if has_bias:
                perm = joint_to_canonical_permutation(*weight_shape_2d(mod))
                M = M[perm][:, perm]
            result[name] = DenseBlock(matrix=M.detach().clone(), layout="rvec")
        return result


_CAPS: dict[str, Any] = {
    "bias": {"joint"},
    "fisher_type": {"type-2", "mc"},
    "kfac_approx": {"expand"},
    "layers": {"Linear", "Conv2d"},
    "losses": {"CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"},
    "reductions": {"mean", "sum"},
    "output_ndim": {2},
}


class NngeometryKFAC(_NngeometryBase):
    """nngeometry ``PMatKFAC`` from ``FIM`` (type-2) or ``FIM_MonteCarlo`` (MC, CE).

    Returns ``KroneckerFactors(a, R·N·k·g, bias="joint")`` per layer.
    """

    name = "nngeometry-kfac"
    capabilities = _CAPS


class NngeometryEKFAC(_NngeometryBase):
    """nngeometry ``PMatEKFAC`` with ``update_diag`` (re-fitted eigenvalues).

    Returns ``DenseBlock(R·N·k · Q diag(d) Qᵀ)`` with ``Q = U_g ⊗ U_a`` over
    rvec([W | b]), permuted to ``[rvec(W); b]``.
    """

    name = "nngeometry-ekfac"
    _ekfac = True
    # EKFAC, not KFAC: the harness compares it with the reference EKFAC (claim E7).
    capabilities = {**_CAPS, "approximation": {"ekfac"}}


ADAPTERS: dict[str, type[_NngeometryBase]] = {
    NngeometryKFAC.name: NngeometryKFAC,
    NngeometryEKFAC.name: NngeometryEKFAC,
}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "nngeometry 1",
        "fixed upstream, unreleased",
        "classif_logits crashes on float64 models unless the default dtype is float64",
        "commit b602bf2",
        adapters=("nngeometry-kfac", "nngeometry-ekfac"),
    ),
    Finding(
        "nngeometry 2",
        "fixed upstream, unreleased",
        "hooks stay on the model after an exception",
        "PR #128, commit 9ff6cd6",
        adapters=("nngeometry-kfac", "nngeometry-ekfac"),
    ),
    Finding(
        "nngeometry 3",
        "new",
        "PMatKFAC.to_torch() returns the default dtype",
        "object/pspace.py, unchanged on main",
    ),
    Finding(
        "nngeometry 4",
        "documented convention",
        "regression is the identity-covariance Gaussian (the adapter converts)",
        "FIM docstring",
    ),
    Finding(
        "nngeometry 5",
        "documented limitation",
        "MC only for classification; no empirical Fisher",
        "FIM_MonteCarlo docstring",
    ),
    Finding(
        "nngeometry 6",
        "fixed upstream, unreleased",
        "Linear layers with (N, S, D) inputs crash",
        "PR #123, commit 4bb1568",
        adapters=("nngeometry-kfac", "nngeometry-ekfac"),
    ),
]


# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation(
        "nngeometry-kfac",
        "deep_linear_d2_bias_mse_mean",
        "exact_*_type-2_*,agree_type-2_*,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "nngeometry-kfac", "one_datum_bce_soft_mean", "exact_*_type-2_*,agree_type-2_*"
    ),
    Expectation(
        "nngeometry-ekfac",
        "mlp_tanh_bce_mean",
        "agree_type-2_*,batch_split",
    ),
    Expectation(
        "nngeometry-kfac",
        "one_datum_cro_mean",
        "exact_E1_*",
        "error",
        text="double != float",
        finding="nngeometry 1",
    ),
]
