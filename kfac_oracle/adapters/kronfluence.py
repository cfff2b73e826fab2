"""Adapter for kronfluence (PyPI ``kronfluence``): KFAC and EKFAC factors and scores.

kronfluence fits influence-function factors with ``Analyzer.fit_all_factors`` for a
user-written ``kronfluence.task.Task`` and writes them to disk (safetensors under
``output_dir/analysis_name/factors_<name>``); ``Analyzer.load_all_factors`` reads
them back. Conventions, from the documentation and source:

- ``Task.compute_train_loss(batch, model, sample)`` (``kronfluence/task.py``): returns
  the loss of the batch; ``sample=True`` "must be implemented to approximate the true
  Fisher" (labels drawn from the model's predictive distribution), ``sample=False``
  uses the true labels, selected with ``FactorArguments.use_empirical_fisher``
  (``kronfluence/arguments.py``). The Task here follows kronfluence's documented
  examples: the PyTorch loss with ``reduction="sum"``; sampled labels from
  ``Categorical(softmax f)`` (CE), ``N(f, ½ I)`` (MSE: ``torch.normal(f,
  std=√0.5)``, as in kronfluence's UCI regression example) or ``Bernoulli(σ(f))``
  (BCE). Each datum gets one sampled label per pass; ``mc_samples = M > 1`` is
  served by passing the data set M times (each datum then has M independent labels),
  which the library averages like any other data.
- Covariances (``module/tracker/factor.py``, ``CovarianceTracker``): ``Σ ã ãᵀ`` over
  flattened rows of the input with a 1 appended when the module has a bias
  (``module/linear.py``, ``get_flattened_activation``: bias last, joint), and
  ``Σ g gᵀ`` over rows of the output gradient; both are divided by their row
  counts before the eigendecomposition (``factor/eigen.py``,
  ``perform_eigendecomposition``). Strategy ``"kfac"`` (``factor/config.py``,
  ``Kfac``) uses ``(U_G Λ_G U_Gᵀ) ⊗ (U_A Λ_A U_Aᵀ)`` on the ``(out, in + 1)``
  gradient matrix (rvec). Strategy ``"ekfac"`` (``Ekfac``) uses
  ``Q diag(Λ / N) Qᵀ`` with ``Q = U_G ⊗ U_A`` and ``Λ`` the sum over examples of the
  squared per-example gradients in that basis (``LambdaTracker``).

Conversion to the canonical target ``L = R Σ_n ℓ_n`` (README, Conventions): the
library's matrix is the per-example average ``(1/N) Σ_n F_n`` of the summed loss, so
``G`` (and the EKFAC matrix) is multiplied by ``R · N``. No factor 2 for MSE: the Task
uses PyTorch's ``MSELoss`` itself. Without weight sharing the row counts are ``N``;
with weight sharing they are ``N·S``, which the adapter reports as computed (finding
kronfluence 1 in ``docs/adapters/kronfluence.md``).

Side effects are isolated: ``Analyzer.prepare_model`` freezes parameters, switches
to ``eval()`` and wraps modules, so it works on a deep copy; factors are written to
a ``tempfile.TemporaryDirectory`` removed afterwards; the global RNG (used for
sampling) is forked and seeded with ``request.seed``. All factor dtypes are set to
the model's dtype (``FactorArguments`` defaults are float32).

``kronfluence-scores`` and ``kronfluence-ekfac-scores`` offer the ``data_scores``
operation: ``Analyzer.compute_pairwise_scores`` with per-module scores, translated to
the contract's ``K`` by the same ``R · N`` (:class:`_KronfluenceScores`).
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import tempfile
from typing import Any, ClassVar

import torch
from torch import nn

from kfac_oracle.adapters._common import Expectation, Finding, Library, check_request
from kfac_oracle.contract import (
    DenseBlock,
    KFACRequest,
    KroneckerFactors,
    LayerOperations,
)
from kfac_oracle.conventions import joint_to_canonical_permutation

LIBRARY = Library("kronfluence", "kronfluence", extra="kronfluence")


def _sum_loss(loss_name: str) -> nn.Module:
    """The PyTorch loss with ``reduction="sum"``."""
    return getattr(nn, loss_name)(reduction="sum")


def _make_task(kronfluence: Any, loss_name: str, tracked: list[str]) -> Any:
    """Build the kronfluence ``Task`` for a PyTorch loss.

    Args:
        kronfluence: The imported kronfluence module.
        loss_name: ``"CrossEntropyLoss"``, ``"MSELoss"`` or ``"BCEWithLogitsLoss"``.
        tracked: Module names to track.

    Returns:
        A ``Task`` instance.
    """
    loss_func = _sum_loss(loss_name)

    class _OracleTask(kronfluence.task.Task):
        def compute_train_loss(
            self, batch: Any, model: nn.Module, sample: bool = False
        ) -> torch.Tensor:
            X, y = batch
            output = model(X)
            if not sample:
                return loss_func(output, y)
            with torch.no_grad():
                f = output.detach()
                if loss_name == "CrossEntropyLoss":
                    # classes in dim 1, one label per datum and position
                    p = torch.softmax(f, dim=1).movedim(1, -1)
                    y = torch.multinomial(p.reshape(-1, p.shape[-1]), 1)
                    y = y.reshape(p.shape[:-1])
                elif loss_name == "MSELoss":
                    y = torch.normal(f, std=math.sqrt(0.5))
                else:
                    y = torch.bernoulli(torch.sigmoid(f))
            return loss_func(output, y)

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self) -> list[str] | None:
            return list(tracked)

    return _OracleTask()


class _KronfluenceBase:
    """Shared implementation of the kronfluence adapters.

    Attributes:
        name: Built-in name.
        capabilities: Declared support (see ``kfac_oracle.contract``).
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[dict[str, Any]] = {}
    _strategy: ClassVar[str] = ""

    def _check(self, request: KFACRequest, modules: dict[str, nn.Module]) -> None:
        """Raise ``NotImplementedError`` for requests outside the capabilities."""
        caps = self.capabilities
        check_request(self.name, caps, request)
        with torch.no_grad():
            out = request.model(request.data[0][0][:1])
        if out.ndim not in caps["output_ndim"]:
            raise NotImplementedError(
                f"{self.name}: output ndim {out.ndim} not supported"
            )
        if not modules:
            raise NotImplementedError(f"{self.name}: no Linear/Conv2d module requested")

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors | DenseBlock]:
        """Fit kronfluence's factors in a temporary directory and convert them.

        Args:
            request: The harness's request.

        Returns:
            Module name → ``KroneckerFactors`` (joint bias) for ``"kfac"``, or
            ``DenseBlock`` (rvec, over ``[weight, bias]``) for ``"ekfac"``.

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        modules = request.modules()
        self._check(request, modules)
        factors, _ = self._analyze(request, modules)
        return self._convert(request, modules, factors)

    def _scores(self, analyzer: Any, request: KFACRequest, dataset: Any) -> Any:
        """Work done with the fitted factors before the directory is removed."""
        return None

    def _analyze(
        self, request: KFACRequest, modules: dict[str, nn.Module]
    ) -> tuple[Any, Any]:
        """Fit the factors; return them and :meth:`_scores` of the fitted analyzer."""
        kf = LIBRARY.load("analyzer", "arguments", "task")
        from torch.utils.data import TensorDataset

        model = copy.deepcopy(request.model)
        dtype = next(model.parameters()).dtype
        task = _make_task(kf, request.loss_name, list(modules))

        X_all = torch.cat([X for X, _ in request.data]).detach().clone()
        y_all = torch.cat([y for _, y in request.data]).detach().clone()
        repeats = request.mc_samples if request.fisher_type == "mc" else 1
        dataset = TensorDataset(
            X_all.repeat(repeats, *([1] * (X_all.ndim - 1))),
            y_all.repeat(repeats, *([1] * (y_all.ndim - 1))),
        )

        factor_args = kf.arguments.FactorArguments(
            strategy=self._strategy,
            use_empirical_fisher=request.fisher_type == "empirical",
            covariance_max_examples=None,
            lambda_max_examples=None,
            activation_covariance_dtype=dtype,
            gradient_covariance_dtype=dtype,
            eigendecomposition_dtype=torch.float64,
            per_sample_gradient_dtype=dtype,
            lambda_dtype=dtype,
        )
        # kronfluence sums over examples, so the batch size does not change the
        # result; for MC the data set is repeated M times and the batches are scaled
        # with it (M times fewer library iterations: the adapter's own overhead).
        batch_size = max(len(X) for X, _ in request.data) * repeats
        kf_logger = logging.getLogger("kronfluence")
        with tempfile.TemporaryDirectory(prefix="kfac_oracle_kronfluence_") as tmp:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(request.seed)
                model = kf.analyzer.prepare_model(model, task)
                analyzer = kf.analyzer.Analyzer(
                    analysis_name="oracle",
                    model=model,
                    task=task,
                    cpu=True,
                    disable_tqdm=True,
                    output_dir=tmp,
                    disable_model_save=True,
                    log_level=kf_logger.getEffectiveLevel(),
                )
                analyzer.fit_all_factors(
                    factors_name="factors",
                    dataset=dataset,
                    per_device_batch_size=batch_size,
                    factor_args=factor_args,
                    overwrite_output_dir=True,
                )
                factors = analyzer.load_all_factors(factors_name="factors")
                scores = self._scores(analyzer, request, TensorDataset(X_all, y_all))
        return factors, scores

    def _convert(
        self, request: KFACRequest, modules: dict[str, nn.Module], factors: Any
    ) -> dict[str, KroneckerFactors | DenseBlock]:
        """The contract's blocks from kronfluence's stored factors."""
        N = request.num_data
        factor = request.reduction_factor * N

        result: dict[str, KroneckerFactors | DenseBlock] = {}
        for name, mod in modules.items():
            has_bias = mod.bias is not None
            U_A = factors["activation_eigenvectors"][name]
            U_G = factors["gradient_eigenvectors"][name]
            if self._strategy == "kfac":
                lam_A = factors["activation_eigenvalues"][name]
                lam_G = factors["gradient_eigenvalues"][name]
                result[name] = KroneckerFactors(
                    input_covariance=(U_A * lam_A) @ U_A.T,
                    gradient_covariance=factor * ((U_G * lam_G) @ U_G.T),
                    bias="joint" if has_bias else "none",
                )
                continue
            lam = factors["lambda_matrix"][name] / factors["num_lambda_processed"][name]
            Q = torch.kron(U_G, U_A)
            M = factor * (Q * lam.reshape(-1)) @ Q.T
            if has_bias:
                perm = joint_to_canonical_permutation(U_G.shape[0], U_A.shape[0] - 1)
                M = M[perm][:, perm]
            result[name] = DenseBlock(matrix=M, layout="rvec")
        return result


_CAPS: dict[str, Any] = {
    "bias": {"joint"},
    "fisher_type": {"mc", "empirical"},
    "kfac_approx": {"expand"},
    "layers": {"Linear", "Conv2d"},
    "losses": {"CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"},
    "reductions": {"mean", "sum"},
    # kronfluence documents sequence models (a loss "summed over batches and tokens").
    "output_ndim": {2, 3},
}


class KronfluenceKFAC(_KronfluenceBase):
    """kronfluence strategy ``"kfac"``: ``KroneckerFactors(A, R·N·G, bias="joint")``.

    ``A`` and ``G`` are rebuilt from the library's eigendecomposition of the
    count-normalised covariances.
    """

    name = "kronfluence-kfac"
    _strategy = "kfac"
    capabilities = _CAPS


class KronfluenceEKFAC(_KronfluenceBase):
    """kronfluence strategy ``"ekfac"``: ``DenseBlock(R·N · Q diag(Λ/N) Qᵀ)``.

    ``Q = U_G ⊗ U_A`` over rvec([W | b]), permuted to ``[rvec(W); b]``.
    """

    name = "kronfluence-ekfac"
    _strategy = "ekfac"
    # EKFAC, not KFAC: the harness compares it with the reference EKFAC (claim E7).
    capabilities = {**_CAPS, "approximation": {"ekfac"}}


class _KronfluenceScores(_KronfluenceBase):
    """kronfluence's pairwise influence scores as the ``data_scores`` operation.

    ``Analyzer.compute_pairwise_scores`` with the data set as both query and train
    set, ``ScoreArguments(compute_per_module_scores=True)``, all dtypes the model's,
    ``Task.compute_measurement`` the summed training loss: per module, kronfluence
    returns ``S_kf = g_iᵀ (K_kf + λ_kf I)⁻¹ g_j`` with ``g_n`` the per-example
    gradients of the summed loss (``∇ ℓ_n``, no reduction factor) and ``K_kf`` its
    count-normalised factors (damping added to the eigenvalues of ``K_kf``,
    ``factor/config.py``: the ``product`` convention). With ``K = R·N·K_kf``
    (module docstring), ``g_iᵀ (K + λ I)⁻¹ g_j = S_kf / (R·N)`` at
    ``λ_kf = λ / (R·N)``. The scores are computed for the request's dampings (one
    ``compute_pairwise_scores`` per layer and damping) while the factors exist;
    a curvature request returns the factors as :class:`KronfluenceKFAC` does.
    """

    def compute(self, request: KFACRequest) -> dict[str, Any]:
        """The data scores of every layer, or the curvature (no operations asked).

        Raises:
            NotImplementedError: If the request is outside the capabilities.
        """
        if request.operations is None:
            return super().compute(request)
        modules = request.modules()
        self._check(request, modules)
        # kronfluence calls gc.collect() several times per score computation
        # (utils/state.py, release_memory); with the heap frozen out of the
        # collector's generations each pass is cheap (same results). An isolated
        # worker has frozen its inherited heap already: unfreezing would thaw that
        # too, so the heap is thawed only if it was not frozen before.
        LIBRARY.load("analyzer", "arguments", "task")
        thaw = gc.get_freeze_count() == 0
        gc.freeze()
        try:
            _, scores = self._analyze(request, modules)
        finally:
            if thaw:
                gc.unfreeze()
        return {
            name: LayerOperations(data_scores=_lookup(name, table))
            for name, table in scores.items()
        }

    def _scores(self, analyzer: Any, request: KFACRequest, dataset: Any) -> Any:
        """``{layer: {λ: S}}`` from one ``compute_pairwise_scores`` per ``λ``."""
        if request.operations is None:
            return None
        kf = LIBRARY.load("arguments")
        dtype = next(request.model.parameters()).dtype
        scale = request.reduction_factor * request.num_data
        batch_size = max(len(X) for X, _ in request.data)
        out: dict[str, dict[float, torch.Tensor]] = {}
        for layer, dampings in request.operations.damping.items():
            out[layer] = {}
            for lam in dampings:
                score_args = kf.arguments.ScoreArguments(
                    damping_factor=self._library_damping(lam, scale),
                    compute_per_module_scores=True,
                    per_sample_gradient_dtype=dtype,
                    precondition_dtype=dtype,
                    score_dtype=dtype,
                )
                analyzer.compute_pairwise_scores(
                    scores_name="scores",
                    factors_name="factors",
                    query_dataset=dataset,
                    train_dataset=dataset,
                    per_device_query_batch_size=batch_size,
                    per_device_train_batch_size=batch_size,
                    score_args=score_args,
                    overwrite_output_dir=True,
                )
                scores = analyzer.load_pairwise_scores(scores_name="scores")
                out[layer][lam] = self._contract_scores(scores[layer].clone(), scale)
        return out

    @staticmethod
    def _library_damping(damping: float, scale: float) -> float:
        """The library's ``damping_factor`` for the contract's ``λ``: ``λ / (R·N)``."""
        return damping / scale

    @staticmethod
    def _contract_scores(scores: torch.Tensor, scale: float) -> torch.Tensor:
        """The contract's ``g_iᵀ (K + λI)⁻¹ g_j`` from kronfluence's: ``S / (R·N)``."""
        return scores / scale


def _lookup(layer: str, table: dict[float, torch.Tensor]) -> Any:
    """``data_scores`` of one layer, for the dampings computed."""

    def data_scores(damping: float) -> torch.Tensor:
        if damping not in table:
            raise ValueError(
                f"layer {layer!r}: data scores were computed for the dampings "
                f"{sorted(table)} of the request, not {damping!r}"
            )
        return table[damping]

    return data_scores


_SCORES_CAPS: dict[str, Any] = {
    **_CAPS,
    "operations": {"data_scores"},
    "damping": {"product"},
}


class KronfluenceScores(_KronfluenceScores):
    """kronfluence strategy ``"kfac"``: pairwise scores ``S_kf / (R·N)``."""

    name = "kronfluence-scores"
    _strategy = "kfac"
    capabilities = _SCORES_CAPS


class KronfluenceEKFACScores(_KronfluenceScores):
    """kronfluence strategy ``"ekfac"``: pairwise scores of the EKFAC block."""

    name = "kronfluence-ekfac-scores"
    _strategy = "ekfac"
    capabilities = {**_SCORES_CAPS, "approximation": {"ekfac"}}


ADAPTERS: dict[str, type[_KronfluenceBase]] = {
    KronfluenceKFAC.name: KronfluenceKFAC,
    KronfluenceEKFAC.name: KronfluenceEKFAC,
    KronfluenceScores.name: KronfluenceScores,
    KronfluenceEKFACScores.name: KronfluenceEKFACScores,
}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "kronfluence 1",
        "new",
        "with weight sharing KFAC is KFAC-expand / S while EKFAC is per example; the "
        "absolute default damping (1e-8) leaves shared layers weighted S times more "
        "in influence scores",
        "module/linear.py, module/conv2d.py (count = N·S), factor/eigen.py",
        adapters=("kronfluence-kfac", "kronfluence-scores"),
    ),
    Finding(
        "kronfluence 2",
        "documented limitation",
        "no type-2 Fisher; MC draws one label per datum",
        "Task.compute_train_loss(..., sample)",
    ),
    Finding(
        "kronfluence 3",
        "documented convention",
        "float32 factor dtypes and covariance_max_examples = 100,000 by default (the "
        "adapter sets float64)",
        "DOCUMENTATION.md, FactorArguments",
    ),
]


# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation(
        "kronfluence-kfac",
        "one_datum_mse_mean",
        "exact_*_empirical_*,agree_empirical_*,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "kronfluence-ekfac", "one_datum_cro_sum", "exact_*_empirical_*,wellformed"
    ),
    Expectation(
        "kronfluence-scores",
        "mlp_tanh_cro_mean,deep_linear_d2_bias_mse_mean,one_datum_bce_binary_sum",
        "op_data_scores",
    ),
    Expectation(
        "kronfluence-ekfac-scores",
        "mlp_tanh_cro_mean,seq_expand_linear_mse_sum",
        # layer 0 of the sequence case: EKFAC not unique (unsupported)
        "op_data_scores[mlp_tanh_cro_mean-*],op_data_scores[seq_expand_linear_mse_sum-1]",
    ),
    Expectation(
        "kronfluence-scores",
        "seq_expand_linear_mse_sum",
        "op_data_scores",
        "failed",
        text="the candidate's own block damped by the declared product",
        finding="kronfluence 1",
    ),
    Expectation(
        "kronfluence-kfac",
        "conv_pool_k3_pad1_mse_mean",
        "agree_empirical_expand",
        "failed",
        text="too small by S",
        finding="kronfluence 1",
    ),
]
