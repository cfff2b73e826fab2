"""Adapter for dattri (PyPI ``dattri``): the EK-FAC of its influence functions.

dattri's ``IFAttributorEKFAC`` (``dattri/algorithm/influence_function.py``) fits an
EK-FAC approximation of the Fisher in ``cache(dataloader)`` and applies its damped
inverse, the inverse-Fisher-vector product (IFVP), in ``transform_test_rep``.
Conventions, from its docstrings and source:

- The task (``dattri.task.AttributionTask``): ``loss_func(params, data)`` with a
  ``torch.func.functional_call`` forward; ``IFAttributorEKFAC.__init__``: the loss
  "Should be the mean loss by the batch size" and "The FIM will be estimated on
  this function". ``estimate_covariance``/``estimate_lambda``
  (``dattri/func/fisher.py``) multiply it by the batch size "to get the original
  gradient", so the per-example loss is ``B · loss``. The adapter's loss is
  ``sum_loss(f(X), y) / B`` with the PyTorch loss of the request, so the per-example
  loss is ``ℓ_n`` itself. The labels are the data set's: an empirical Fisher.
- ``module_name``: "If None, all linear modules are used": ``nn.Linear`` only
  (the hook appends a 1 to the last input dimension: joint bias, bias last).
  The loss docstring allows sequence inputs ("t is the number of steps, or sequence
  length of the input data"); ``output_ndim`` declares both.
- Covariances (``_update_covariance``): ``A = (1/N) Σ ã ãᵀ`` and ``S = (1/N) Σ g gᵀ``
  (``g`` the output gradient of the per-example loss), running averages weighted
  by batch sizes, so batches of any size combine into the data-set average.
- Eigenvectors (``estimate_eigenvector``): ``q_a, q_s = torch.linalg.eigh(·)[1]``;
  eigenvalues (``_update_lambda``): ``λ = mean_n (q_s ∇W_n q_aᵀ)²`` over the
  per-example gradient matrices ``∇W_n`` of ``[W | b]`` (shape ``(out, in + 1)``).
- The IFVP (``transform_test_rep``): ``q_sᵀ ((q_s V q_aᵀ) / (λ + damping)) q_a`` on
  the ``(out, in + 1)`` matrix ``V``. In rvec this is ``Pᵀ diag(1/(λ + δ)) P`` with
  ``P = q_s ⊗ q_a``.

What the adapter reconstructs: the matrix whose damped inverse dattri applies,
``F = Pᵀ diag(λ) P`` over ``rvec([W | b])`` (``damping = 0``), from the attributor's
``cached_q`` and ``cached_lambdas``, permuted to ``[rvec(W); b]``
(``dattri-ekfac``). That is faithful: ``transform_test_rep`` with ``damping = δ`` is
exactly ``(F + δ I)⁻¹`` on the ``(out, in + 1)`` matrix it builds. How it builds
that matrix from a flat parameter vector is covered by ``dattri-ekfac-ifvp``, which
densifies ``transform_test_rep`` itself on the identity (damping ``δ = 1``) and
returns ``inv(M) − δ I``, per layer.

Conversion to the canonical target ``L = R Σ_n ℓ_n``: dattri's matrix is
``(1/N) Σ_n F_n``, so the block is multiplied by ``R · N``. No factor 2 for MSE
(the loss is PyTorch's).

Side effects are isolated: the attributor loads the checkpoint into the task's model
and calls ``model.eval()``, and registers (then removes) forward hooks, so it works on
a deep copy.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from kfac_oracle.adapters._common import Expectation, Finding, Library, check_request
from kfac_oracle.contract import DenseBlock, KFACRequest, LayerOperations
from kfac_oracle.conventions import joint_to_canonical_permutation

LIBRARY = Library("dattri", "dattri", extra="dattri")


class _DattriBase:
    """Shared implementation of the dattri adapters.

    Attributes:
        name: Built-in name.
        capabilities: Declared support (see ``kfac_oracle.contract``).
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[dict[str, Any]] = {}

    def _fit(self, request: KFACRequest, damping: float) -> tuple[Any, dict]:
        """Run ``IFAttributorEKFAC.cache`` on a deep copy of the model.

        Returns:
            The attributor and the requested modules of the copy by name.
        """
        dattri = LIBRARY.load("algorithm.influence_function", "task")
        from torch.utils.data import DataLoader, TensorDataset

        check_request(self.name, self.capabilities, request)
        model = copy.deepcopy(request.model)
        modules = request.modules(model, kinds=(nn.Linear,))
        if not modules:
            raise NotImplementedError(f"{self.name}: no Linear module requested")
        sum_loss = getattr(nn, request.loss_name)(reduction="sum")

        def loss_func(params: dict, data: tuple) -> torch.Tensor:
            X, y = data
            output = torch.func.functional_call(model, params, (X,))
            return sum_loss(output, y) / len(X)  # "the mean loss by the batch size"

        task = dattri.task.AttributionTask(
            loss_func=loss_func,
            model=model,
            checkpoints=copy.deepcopy(model.state_dict()),
        )
        attributor = dattri.algorithm.influence_function.IFAttributorEKFAC(
            task=task, module_name=list(modules), device="cpu", damping=damping
        )
        X_all = torch.cat([X for X, _ in request.data]).detach().clone()
        y_all = torch.cat([y for _, y in request.data]).detach().clone()
        batches, start = [], 0
        for X, _ in request.data:
            batches.append(list(range(start, start + len(X))))
            start += len(X)
        loader = DataLoader(TensorDataset(X_all, y_all), batch_sampler=batches)
        attributor.cache(loader)
        return attributor, modules

    def compute(self, request: KFACRequest) -> dict[str, DenseBlock]:
        """Fit dattri's EK-FAC and return each module's block (see subclasses)."""
        raise NotImplementedError


class DattriEKFAC(_DattriBase):
    """dattri ``IFAttributorEKFAC``: ``DenseBlock(R·N · Pᵀ diag(λ) P)``.

    ``P = q_s ⊗ q_a`` from ``cached_q`` and ``λ`` from ``cached_lambdas``, exactly as
    ``transform_test_rep`` uses them, over rvec([W | b]) permuted to
    ``[rvec(W); b]``.
    """

    name = "dattri-ekfac"
    capabilities = {
        "bias": {"joint"},
        "fisher_type": {"empirical"},
        "kfac_approx": {"expand"},
        "layers": {"Linear"},
        "losses": {"CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"},
        "reductions": {"mean", "sum"},
        "output_ndim": {2, 3},
        # EK-FAC: the harness compares it with the reference EKFAC (docs/theory.md E7).
        "approximation": {"ekfac"},
    }

    def compute(self, request: KFACRequest) -> dict[str, DenseBlock]:
        """Fit and rebuild ``F = Pᵀ diag(λ) P`` per module.

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        attributor, modules = self._fit(request, damping=0.0)
        factor = request.reduction_factor * request.num_data
        result = {}
        for name, mod in modules.items():
            q_a, q_s = attributor.cached_q[name]
            lam = attributor.cached_lambdas[name]
            P = torch.kron(q_s, q_a)
            M = factor * (P.T * lam.reshape(-1)) @ P
            if mod.bias is not None:
                perm = joint_to_canonical_permutation(mod.out_features, mod.in_features)
                M = M[perm][:, perm]
            result[name] = DenseBlock(matrix=M.detach().clone(), layout="rvec")
        return result


class DattriEKFACIFVP(_DattriBase):
    """dattri's IFVP as users consume it: ``transform_test_rep`` densified.

    With damping ``δ = 1``, ``M = transform_test_rep(0, I)`` (rows and columns over
    the tracked parameters in ``named_parameters`` order: weight, then bias, per
    module) is the IFVP matrix; the block returned is ``R·N · (inv(M_l) − δ I)`` for
    each module's diagonal block ``M_l`` (the IFVP is block-diagonal over modules).
    """

    name = "dattri-ekfac-ifvp"
    capabilities = DattriEKFAC.capabilities
    _DAMPING = 1.0

    def compute(self, request: KFACRequest) -> dict[str, DenseBlock]:
        """Densify the IFVP and invert it per module.

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        attributor, modules = self._fit(request, damping=self._DAMPING)
        ref = next(request.model.parameters())
        sizes = [
            sum(p.numel() for p in mod.parameters(recurse=False))
            for mod in modules.values()
        ]
        eye = torch.eye(sum(sizes), dtype=ref.dtype)
        M = attributor.transform_test_rep(0, eye)
        factor = request.reduction_factor * request.num_data
        result, offset = {}, 0
        for name, size in zip(modules, sizes):
            block = M[offset : offset + size, offset : offset + size]
            curvature = torch.linalg.inv(block) - self._DAMPING * torch.eye(
                size, dtype=block.dtype
            )
            result[name] = DenseBlock(matrix=factor * curvature, layout="rvec")
            offset += size
        return result


class DattriEKFACInverse(_DattriBase):
    """dattri's damped EK-FAC inverse-Fisher-vector product, on arbitrary vectors.

    ``IFAttributorEKFAC.transform_test_rep(0, test_rep)`` (documented: "Test
    representations to be transformed ... (batch_size, num_parameters)",
    ``dattri/algorithm/influence_function.py:956-974``) applies, per tracked module,
    ``q_sᵀ ((q_s V q_aᵀ) / (λ_EK + damping)) q_a`` (lines 1014-1020) and concatenates
    the flattened results in ``module_name`` order (lines 1023-1026). The attributor's
    ``damping`` ("Damping factor used for non-convexity in EK-FAC IFVP calculation",
    ``__init__``, lines 819-820) is added to every eigenvalue: ``(F + δI)⁻¹``, the
    ``product`` convention on dattri's EK-FAC ``F`` (:class:`DattriEKFAC`).

    Scale: ``F = (1/N) Σ_n F_n`` and the contract's block is ``K = c·F`` with
    ``c = R·N`` (:class:`DattriEKFAC`), so ``(K + λI)⁻¹ = (1/c)·(F + (λ/c) I)⁻¹``: the
    adapter fits an attributor with ``damping = λ/c`` for each ``λ`` and divides its
    result by ``c``. A layer's product is read from a vector that is zero outside the
    layer (the IFVP is block diagonal over modules); input and output are taken in
    dattri's parameter order (weight, then bias: ``named_parameters``), as its
    attribution's inner product with the training gradients reads them.
    ``Uᵀ K_λ⁻¹ V`` is ``Uᵀ`` times that product. dattri offers no log-determinant or
    trace. Curvature requests return :class:`DattriEKFAC`'s blocks.
    """

    name = "dattri-ekfac-inverse"
    capabilities = {
        **DattriEKFAC.capabilities,
        "operations": {"inverse", "scores"},
        "damping": {"product"},
    }

    @staticmethod
    def curvature_scale(request: KFACRequest) -> float:
        """``c = R·N`` with ``K = c·F`` (:class:`DattriEKFAC`)."""
        return request.reduction_factor * request.num_data

    def compute(self, request: KFACRequest) -> dict[str, Any]:
        """Blocks, or ``LayerOperations`` from ``transform_test_rep`` per layer.

        Raises:
            NotImplementedError: If the request is outside the capabilities or asks
                for another damping convention.
        """
        if request.operations is None:
            return DattriEKFAC().compute(request)
        convention = request.operations.convention
        if convention != "product":
            raise NotImplementedError(
                f"{self.name}: dattri adds its damping to the EK-FAC eigenvalues "
                f"(product, K + λI), not {convention}"
            )
        check_request(self.name, self.capabilities, request)
        modules = request.modules(kinds=(nn.Linear,))
        c = self.curvature_scale(request)
        fitted: dict[float, Any] = {}

        def attributor(lam: float) -> Any:
            if lam not in fitted:
                fitted[lam] = self._fit(request, damping=lam / c)[0]
            return fitted[lam]

        sizes = {
            name: sum(p.numel() for p in mod.parameters(recurse=False))
            for name, mod in modules.items()
        }
        total = sum(sizes.values())
        out: dict[str, Any] = {}
        start = 0
        for name, size in sizes.items():

            def inverse_product(V, lam, start=start, size=size):
                W = V.new_zeros(V.shape[1], total)
                W[:, start : start + size] = V.T
                Y = attributor(lam).transform_test_rep(0, W)
                return Y[:, start : start + size].T / c

            def scores(U, V, lam, inverse_product=inverse_product):
                return U.T @ inverse_product(V, lam)

            out[name] = LayerOperations(inverse_product=inverse_product, scores=scores)
            start += size
        return out


ADAPTERS: dict[str, type[_DattriBase]] = {
    DattriEKFAC.name: DattriEKFAC,
    DattriEKFACIFVP.name: DattriEKFACIFVP,
    DattriEKFACInverse.name: DattriEKFACInverse,
}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "D1",
        "new",
        "EK-FAC is fitted in the basis of the rows of the eigenvector matrices",
        "q_s @ ∇W @ q_a.T with eigh eigenvectors as columns; unchanged on main",
        adapters=("dattri-ekfac", "dattri-ekfac-ifvp", "dattri-ekfac-inverse"),
    ),
    Finding(
        "D2",
        "new",
        "the IFVP reshapes [vec(W), b] as if it were [W | b], mixing weight and bias "
        "entries",
        "transform_test_rep; unchanged on main",
        adapters=("dattri-ekfac-ifvp", "dattri-ekfac-inverse"),
    ),
    Finding(
        "D3",
        "new",
        "sequence inputs, which the loss docstring describes, crash "
        "(UnboundLocalError a_prev)",
        "unchanged on main",
        adapters=("dattri-ekfac", "dattri-ekfac-ifvp", "dattri-ekfac-inverse"),
    ),
    Finding(
        "D4",
        "new",
        "an in-place ReLU after a Linear layer gives a silently wrong result",
        "unchanged on main",
        adapters=("dattri-ekfac", "dattri-ekfac-ifvp"),
    ),
]


# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation(
        "dattri-ekfac",
        "deep_linear_d2_bias_mse_mean",
        "batch_split,shuffle,mean_vs_sum",
    ),
    Expectation("dattri-ekfac", "mlp_tanh_bce_sum", "batch_split,shuffle,wellformed"),
    Expectation(
        "dattri-ekfac-ifvp", "mlp_tanh_cro_mean", "batch_split,shuffle,mean_vs_sum"
    ),
    Expectation(
        "dattri-ekfac-inverse",
        "deep_linear_d2_nobias_mse_mean,mlp_tanh_cro_mean",
        "op_spd",
    ),
    Expectation(
        "dattri-ekfac-inverse",
        "deep_linear_d2_nobias_mse_sum",
        "op_inverse",
        "failed",
        text="the candidate's own block damped by the declared product",
        finding="D1",
    ),
    Expectation(
        "dattri-ekfac",
        "one_datum_cro_sum",
        "exact_E1_empirical_expand",
        "failed",
        finding="D1",
    ),
    Expectation(
        "dattri-ekfac",
        "seq_expand_linear_mse_mean",
        "wellformed",
        "error",
        text="a_prev",
        finding="D3",
    ),
]
