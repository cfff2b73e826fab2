"""Adapters exposing laplace-torch's ``KronLaplace``: its factors and its operations.

laplace-torch (PyPI ``laplace-torch``, tested with 0.3) fits a Laplace approximation
with a Kronecker-factored log-likelihood Hessian. ``KronLaplace.fit(train_loader)``
loops over the loader's batches, asks the backend for each batch's factors
(``backend.kron(X, y, N=len(train_loader.dataset))``) and *sums* them
(``laplace/baselaplace.py: ParametricLaplace.fit``: ``self.H += H_batch``); the
undecomposed sum is kept in ``KronLaplace.H_facs`` (``KronLaplace.fit``). The
backends rescale each batch's input factor by ``B_b/N`` before the sum
(``_rescale_kron_factors`` in ``laplace/curvature/{curvlinops,backpack,asdl}.py``), so
the library itself combines batches; the adapter only feeds it the request's batches
(a ``DataLoader`` whose ``batch_sampler`` reproduces them, sizes included).

Layout (``laplace/utils/matrix.py: Kron``): ``H_facs.kfacs`` has one entry per
parameter in ``model.parameters()`` order; a weight has ``[Q, H]`` with
``Kron._bmm`` computing ``Q @ W @ Hᵀ`` on the ``(out, in)`` weight, i.e. the block is
``Q ⊗ H`` in rvec, so ``Q = G`` and ``H = A``; a bias has ``[G_bias]`` and there are no
weight-bias cross terms. The adapters report ``bias="separate"``.

Scale (documented in ``laplace/curvature/curvature.py: CurvatureInterface``): the
curvature is that of the negative log-likelihood summed over the data, computed from
``MSELoss(reduction="sum")`` ("regression") or ``CrossEntropyLoss(reduction="sum")``
("classification") times ``backend.factor`` -- "conversion factor between torch losses
and base likelihoods. For example, 1/2 to get to N(f, 1) from MSELoss" (``factor`` is
``1/2`` for regression and ``1`` for classification). ``sigma_noise``, ``temperature``
and the prior enter only the posterior precision (``_H_factor``), not ``H_facs``; the
adapter uses their defaults and reads ``H_facs``. The contract's target is
``L = R Σ_n ℓ_n`` (``R = 1`` for sum, ``1/(N·T)`` for mean), so the adapter reports

    block = (R / factor) · H_laplace,

putting the scalar into ``A`` (and the separate bias block). The empirical Fisher is
quadratic in the loss scale: the EF of the documented likelihood ``N(f, 1)``, whose
per-datum gradient is ``(f - y)``, is ``factor² = 1/4`` times the EF of ``MSELoss``, so
for ``fisher_type="empirical"`` the adapter reports ``(R / factor²) · H_laplace``.
That is the only conversion; anything else a backend does differently is a finding
(``docs/adapters/laplace.md``; e.g. laplace-torch scales the regression EF by
``factor`` rather than ``factor²``, finding L1).

Fisher types: ``"type-2"`` is the backend's ``*GGN`` class, ``"mc"`` the same class with
``backend_kwargs={"stochastic": True}``, ``"empirical"`` the ``*EF`` class. Keyword
arguments that reach the backend's ``kron`` go through ``asdl_fisher_kwargs``
(``KronLaplace._curv_closure``): ``mc_samples``, ``seed`` and ``kfac_approx`` for
curvlinops (comment in ``CurvlinopsInterface.kron``), ``n_mc_samples`` and ``seed`` for
ASDL (``asdl.fisher.FisherConfig``). The BackPACK backend takes none (one MC sample,
BackPACK's ``KFAC()`` default, global RNG seeded here).

Operations (``laplace-kron-operations``, :class:`LaplaceKronOperations`): the damped
inverse, log-determinant, trace and scores of the posterior precision
``H_laplace / (σ² · temperature) + δ I``, with ``temperature`` translating laplace's
likelihood into the contract's loss and ``δ = λ`` (the ``product`` convention).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from kfac_oracle.adapters._common import Expectation, Finding, Library, check_request
from kfac_oracle.contract import KFACRequest, KroneckerFactors, LayerOperations

LIBRARY = Library("laplace-torch", "laplace", extra="laplace")


_LIKELIHOOD = {"MSELoss": "regression", "CrossEntropyLoss": "classification"}


class _LaplaceKronBase:
    """Shared implementation; subclasses choose the curvature backend."""

    name = "laplace-kron"
    capabilities: dict[str, Any] = {}
    _backend_names: dict[str, str] = {}

    def _kron_kwargs(self, request: KFACRequest) -> dict[str, Any]:
        """Keyword arguments for the backend's ``kron`` (via ``asdl_fisher_kwargs``)."""
        return {}

    def _check(self, request: KFACRequest) -> None:
        """Raise ``NotImplementedError`` for requests outside the capabilities.

        Args:
            request: The request.

        Raises:
            NotImplementedError: If the request is not supported.
        """
        caps = self.capabilities
        check_request(self.name, caps, request)
        loss = request.loss_func
        if isinstance(loss, nn.CrossEntropyLoss) and (
            loss.weight is not None
            or loss.ignore_index != -100
            or loss.label_smoothing != 0.0
        ):
            raise NotImplementedError(f"{self.name}: non-default CrossEntropyLoss")
        for name, mod in request.model.named_modules():
            own = list(mod.parameters(recurse=False))
            if own and not isinstance(mod, (nn.Linear, nn.Conv2d)):
                raise NotImplementedError(
                    f"{self.name}: module {name} ({type(mod).__name__}) has parameters"
                )

    def fit(self, request: KFACRequest, **laplace_kwargs: Any) -> Any:
        """``KronLaplace`` fitted on the request's batches (on a copy of the model).

        Args:
            request: The request.
            laplace_kwargs: Further keyword arguments of ``KronLaplace`` (e.g.
                ``prior_precision``, ``temperature``).

        Raises:
            NotImplementedError: For unsupported requests.
        """
        self._check(request)
        laplace = LIBRARY.load("curvature")
        import laplace.curvature as curv
        from torch.utils.data import DataLoader, TensorDataset

        backend_name = self._backend_names[request.fisher_type]
        backend = getattr(curv, backend_name, None)
        if backend is None:
            raise ImportError(f"laplace.curvature.{backend_name} unavailable")
        backend_kwargs = {"stochastic": True} if request.fisher_type == "mc" else None

        # KronLaplace calls model.eval(), sets `output_size` on the model, and the
        # BackPACK backend extends it: work on a copy.
        model = copy.deepcopy(request.model)
        lap = laplace.KronLaplace(
            model,
            _LIKELIHOOD[request.loss_name],
            backend=backend,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=self._kron_kwargs(request),
            **laplace_kwargs,
        )

        X = torch.cat([X for X, _ in request.data])
        y = torch.cat([y for _, y in request.data])
        batches, start = [], 0
        for Xb, _ in request.data:
            batches.append(list(range(start, start + len(Xb))))
            start += len(Xb)
        loader = DataLoader(TensorDataset(X, y), batch_sampler=batches)

        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # BackPACK's hooks: torch warns because the data do not require gradients.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.manual_seed(request.seed)
            lap.fit(loader)

        with torch.no_grad():
            out = model(X[:1])
        if out.ndim != 2:
            raise NotImplementedError(f"{self.name}: model output must be 2-D")
        return lap

    @staticmethod
    def hessian_scale(request: KFACRequest, factor: float) -> float:
        """``c`` with the contract's block ``= c · H_laplace`` (module docstring).

        ``R / factor`` for the GGN and Fisher, ``R / factor²`` for the empirical
        Fisher (quadratic in the loss scale).
        """
        power = 2 if request.fisher_type == "empirical" else 1
        return request.reduction_factor / factor**power

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """Fit ``KronLaplace`` on the request's batches and convert its factors.

        Args:
            request: The request.

        Returns:
            ``KroneckerFactors`` (``bias="separate"`` or ``"none"``) per module name.

        Raises:
            NotImplementedError: For unsupported requests.
        """
        lap = self.fit(request)
        model = lap.model
        # GGN/Fisher are linear in the loss scale, the EF quadratic (module docstring).
        scale = self.hessian_scale(request, lap.backend.factor)

        kfacs = lap.H_facs.kfacs
        index = {id(p): i for i, p in enumerate(lap.params)}
        wanted = set(request.layers)
        supported = {
            name
            for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, nn.Conv2d))
            and all(id(p) in index for p in mod.parameters(recurse=False))
        }
        if wanted - supported:
            unknown = sorted(wanted - supported)
            raise NotImplementedError(f"{self.name}: unsupported modules {unknown}")
        result: dict[str, KroneckerFactors] = {}
        for name, mod in model.named_modules():
            if name not in supported or (wanted and name not in wanted):
                continue
            w_facs = kfacs[index[id(mod.weight)]]
            if len(w_facs) != 2:
                raise NotImplementedError(
                    f"{self.name}: {name} has a non-Kronecker weight block"
                )
            G, A = (f.detach().clone() for f in w_facs)
            if mod.bias is not None:
                (G_bias,) = kfacs[index[id(mod.bias)]]
                result[name] = KroneckerFactors(
                    input_covariance=scale * A,
                    gradient_covariance=G,
                    bias="separate",
                    bias_covariance=scale * G_bias.detach().clone(),
                )
            else:
                result[name] = KroneckerFactors(
                    input_covariance=scale * A, gradient_covariance=G, bias="none"
                )
        return result


_COMMON_CAPS: dict[str, Any] = {
    "layers": {"Linear", "Conv2d"},
    "losses": {"MSELoss", "CrossEntropyLoss"},
    "reductions": {"mean", "sum"},
    "output_ndim": {2},
}


class LaplaceKronCurvlinops(_LaplaceKronBase):
    """``KronLaplace`` with the curvlinops backend (laplace-torch's default).

    ``CurvlinopsGGN`` / ``CurvlinopsEF`` build a ``curvlinops.KFACLinearOperator`` per
    batch with the summed loss (``separate_weight_and_bias=True``); ``kfac_approx``,
    ``mc_samples`` and ``seed`` are forwarded to it through ``asdl_fisher_kwargs``.
    """

    name = "laplace-kron-curvlinops"
    capabilities = {
        **_COMMON_CAPS,
        "fisher_type": {"type-2", "mc", "empirical"},
        "kfac_approx": {"expand", "reduce"},
    }
    _backend_names = {
        "type-2": "CurvlinopsGGN",
        "mc": "CurvlinopsGGN",
        "empirical": "CurvlinopsEF",
    }

    def _kron_kwargs(self, request: KFACRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"kfac_approx": request.kfac_approx}
        if request.fisher_type == "mc":
            kwargs.update(mc_samples=request.mc_samples, seed=request.seed)
        return kwargs


class LaplaceKronBackpack(_LaplaceKronBase):
    """``KronLaplace`` with the BackPACK backend (``BackPackGGN``).

    Uses BackPACK's ``KFLR`` (type-2) or ``KFAC()`` with one MC sample; BackPACK has no
    Kronecker EF (``BackPackEF.kron`` raises). Inherits BackPACK's Conv2d factors
    (see ``docs/adapters/backpack.md``).
    """

    name = "laplace-kron-backpack"
    capabilities = {
        **_COMMON_CAPS,
        "fisher_type": {"type-2", "mc"},
        "kfac_approx": {"expand"},
    }
    _backend_names = {"type-2": "BackPackGGN", "mc": "BackPackGGN"}

    def _check(self, request: KFACRequest) -> None:
        super()._check(request)
        if request.fisher_type == "mc" and request.mc_samples != 1:
            raise NotImplementedError(
                f"{self.name}: the BackPACK backend draws exactly one MC sample"
            )
        if any(getattr(m, "inplace", False) for m in request.model.modules()):
            # BackPACK documents in-place operations as incompatible with the full
            # backward hooks of `extend`; laplace's backend calls `extend(model)`
            # without BackPACK's converter, so there is no documented remedy here.
            raise NotImplementedError(
                f"{self.name}: in-place modules (BackPACK's hooks reject them)"
            )


class LaplaceKronAsdl(_LaplaceKronBase):
    """``KronLaplace`` with the ASDL backend (``AsdlGGN`` / ``AsdlEF``).

    ASDL comes from PyPI ``asdfghjkl==0.1a4`` (import name ``asdl``), the version
    laplace-torch 0.3 pins. ``n_mc_samples`` and ``seed`` go to ASDL's
    ``FisherConfig`` through ``asdl_fisher_kwargs``.
    """

    name = "laplace-kron-asdl"
    capabilities = {
        **_COMMON_CAPS,
        "fisher_type": {"type-2", "mc", "empirical"},
        "kfac_approx": {"expand"},
    }
    _backend_names = {"type-2": "AsdlGGN", "mc": "AsdlGGN", "empirical": "AsdlEF"}

    def _check(self, request: KFACRequest) -> None:
        super()._check(request)
        for name, mod in request.model.named_modules():
            if isinstance(mod, nn.Conv2d) and any(d != 1 for d in mod.dilation):
                # asdl.utils.im2col_2d raises "conv2d.dilation has to be (1, 1)" (as
                # for the ASDL adapter, docs/adapters/asdl.md, finding 6).
                raise NotImplementedError(
                    f"{self.name}: Conv2d {name!r} with dilation (ASDL im2col)"
                )

    def _kron_kwargs(self, request: KFACRequest) -> dict[str, Any]:
        if request.fisher_type == "mc":
            return {"n_mc_samples": request.mc_samples, "seed": request.seed}
        return {}


class LaplaceKronOperations(LaplaceKronCurvlinops):
    """``KronLaplace``'s posterior precision: inverse, log-determinant, trace, scores.

    laplace-torch's documented posterior precision (``ParametricLaplace`` docstring;
    ``KronLaplace.posterior_precision``: ``self.H * self._H_factor +
    self.prior_precision``) is

        P = H_laplace / (σ² · temperature) + P_0,

    with ``P_0 = δ I`` for a scalar prior precision ``δ``. ``KronDecomposed`` adds
    ``δ`` to the eigenvalues of each Kronecker product (``utils/matrix.py``:
    ``torch.outer(l1, l2) + delta`` in ``logdet``, ``_bmm``, ``diag``): the
    ``product`` convention ``K + λI``. With ``σ = 1`` (classification requires it)
    and ``temperature = 1 / c``, ``c`` the scale of :meth:`hessian_scale`, the
    tempered negative log-likelihood is the contract's loss ``L`` and ``P = K + δI``;
    the adapter sets ``prior_precision = λ`` and reads, per layer, through
    documented calls:

    - ``K_λ⁻¹ V``: ``posterior_precision.bmm(W, exponent=-1)`` on ``V`` embedded in
      the full parameter vector (zero elsewhere; the precision is block diagonal);
    - ``log det K_λ``: ``KronDecomposed.logdet()`` of the layer's Kronecker group
      (``log_det_posterior_precision`` sums every group);
    - ``Uᵀ K_λ⁻¹ V``: ``functional_covariance(Js)`` (``Js P⁻¹ Jsᵀ``) with the
      columns of ``U`` and ``V`` as the rows of ``Js``;
    - ``tr K``: ``posterior_precision.diag()`` at ``prior_precision = 0``, summed;
      ``diag K`` the same entries; the eigenvalues of ``K`` the outer product of
      the layer's Kronecker eigenvalues (``KronDecomposed.eigenvalues``) at
      ``prior_precision = 0``.

    ``KronLaplace(damping=True)`` documents a multiplicative damping
    (``(l1 + √δ)(l2 + √δ)``, ``per_factor`` on laplace's factors) but has no effect
    on the posterior precision (finding L5), so only ``product`` is declared.

    Laplace's Kron keeps a bias as its own group (``[G_bias] + δI``, no cross terms
    with the weight): the separate-bias block, not the joint one the operations
    are defined on. Layers with a bias are therefore unsupported. Curvature
    requests return the factors, as ``laplace-kron-curvlinops``.
    """

    name = "laplace-kron-operations"
    capabilities = {
        **LaplaceKronCurvlinops.capabilities,
        "operations": {
            "inverse",
            "logdet",
            "trace",
            "scores",
            "diagonal",
            "eigenvalues",
        },
        "damping": {"product"},
    }

    def compute(self, request: KFACRequest) -> dict[str, Any]:
        """Factors, or ``LayerOperations`` of the posterior precision per layer."""
        if request.operations is None:
            return super().compute(request)
        convention = request.operations.convention
        if convention != "product":
            raise NotImplementedError(
                f"{self.name}: laplace's prior precision damps as product (K + λI), "
                f"not {convention}"
            )
        modules = request.modules()
        biased = [name for name, mod in modules.items() if mod.bias is not None]
        if biased:
            raise NotImplementedError(
                f"{self.name}: layers {biased} have a bias, which laplace's Kron "
                "keeps as a separate block (the operations act on the joint-bias "
                "block)"
            )
        from laplace.utils.matrix import KronDecomposed

        lap = self.fit(request)
        lap.temperature = 1.0 / self.hessian_scale(request, lap.backend.factor)
        groups, offsets, offset = {}, {}, 0
        for i, p in enumerate(lap.params):
            groups[id(p)], offsets[id(p)] = i, offset
            offset += p.numel()
        total = offset

        def precision(lam: float):
            lap.prior_precision = float(lam)
            return lap.posterior_precision

        def embed(M: torch.Tensor, start: int) -> torch.Tensor:
            """Columns of ``M`` as rows of ``(k, 1, n_params)``, zero elsewhere."""
            W = M.new_zeros(M.shape[1], 1, total)
            W[:, 0, start : start + M.shape[0]] = M.T
            return W

        copies = dict(lap.model.named_modules())
        out: dict[str, Any] = {}
        for name in modules:
            weight = copies[name].weight
            if id(weight) not in groups:
                raise NotImplementedError(
                    f"{self.name}: {name}.weight is not in laplace's parameters "
                    "(requires_grad=False)"
                )
            group, start, size = groups[id(weight)], offsets[id(weight)], weight.numel()

            def inverse_product(V, lam, start=start, size=size):
                Y = precision(lam).bmm(embed(V, start), exponent=-1)
                return Y[:, 0, start : start + size].T

            def logdet(lam, group=group):
                P = precision(lam)
                return KronDecomposed(
                    [P.eigenvectors[group]],
                    [P.eigenvalues[group]],
                    P.deltas[group : group + 1],
                ).logdet()

            def scores(U, V, lam, start=start):
                precision(lam)
                Js = torch.cat([embed(U, start), embed(V, start)])
                return lap.functional_covariance(Js)[: U.shape[1], U.shape[1] :]

            def trace(start=start, size=size):
                return precision(0.0).diag()[start : start + size].sum()

            def diagonal(start=start, size=size):
                return precision(0.0).diag()[start : start + size]

            def eigenvalues(group=group):
                factors = precision(0.0).eigenvalues[group]
                spectrum = factors[0]
                for values in factors[1:]:
                    spectrum = torch.outer(spectrum, values).reshape(-1)
                return spectrum

            out[name] = LayerOperations(
                inverse_product=inverse_product,
                logdet=logdet,
                trace=trace,
                scores=scores,
                diagonal=diagonal,
                eigenvalues=eigenvalues,
            )
        return out


ADAPTERS = {
    "laplace-kron-curvlinops": LaplaceKronCurvlinops,
    "laplace-kron-backpack": LaplaceKronBackpack,
    "laplace-kron-asdl": LaplaceKronAsdl,
    "laplace-kron-operations": LaplaceKronOperations,
}


# Findings (docs/findings.md): where the library differs, with its upstream status.
FINDINGS = [
    Finding(
        "L1",
        "new",
        "the regression empirical Fisher is twice the EF of laplace's own likelihood "
        "N(f, 1), every backend",
        "curvature/curvature.py (factor = ½), curvlinops.py, asdl.py",
        adapters=(
            "laplace-kron-curvlinops",
            "laplace-kron-asdl",
            "laplace-kron-operations",
        ),
    ),
    Finding(
        "L2",
        "new",
        "ASDL backend (asdfghjkl 0.1a4): the MC Fisher with M samples is M times too "
        "small",
        "same code as ASDL 1",
        adapters=("laplace-kron-asdl",),
    ),
    Finding(
        "L3",
        "known",
        "the BackPACK backend inherits B1",
        "as B1 (PR #290)",
        adapters=("laplace-kron-backpack",),
    ),
    Finding(
        "L4",
        "documented limitation",
        "BackPACK backend: one MC sample, no Kronecker EF; in-place models unsupported",
        "BackPackEF.kron raises; BackPackGGN uses KFAC()",
        adapters=("laplace-kron-backpack",),
    ),
    Finding(
        "L5",
        "new",
        "KronLaplace(damping=True) has no effect: the posterior precision, its "
        "log-determinant and every quantity read from it stay K + δI",
        "utils/matrix.py: KronDecomposed.__mul__ and __add__ drop `damping`",
    ),
    Finding(
        "L6",
        "documented convention",
        "a bias is its own Kronecker group (its block plus δI, no cross terms with "
        "the weight): the posterior precision of a layer with a bias is the "
        "separate-bias block; the operations are defined on the joint-bias block",
        "utils/matrix.py: Kron docstring and init_from_model",
        adapters=("laplace-kron-operations",),
    ),
]


# Where the library is right (every selected check passes) and its findings
# (docs/findings.md), which must stay visible: tests/test_adapters.py runs them.
EXPECTATIONS = [
    Expectation("laplace-kron-operations", "deep_linear_d2_nobias_mse_mean", "op_*"),
    Expectation("laplace-kron-operations", "deep_linear_d3_nobias_mse_sum", "op_*"),
    Expectation(
        "laplace-kron-operations",
        "deep_linear_d1_bias_mse_sum",
        "op_inverse",
        "unsupported",
        text="separate block",
        finding="L6",
    ),
    Expectation(
        "laplace-kron-curvlinops",
        "deep_linear_d2_bias_mse_mean",
        "exact_*_type-2_*,agree_type-2_*,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "laplace-kron-curvlinops",
        "one_datum_cro_sum",
        "exact_*_type-2_*,agree_type-2_*,exact_*_empirical_*,agree_empirical_*",
    ),
    Expectation(
        "laplace-kron-backpack",
        "one_datum_mse_mean",
        "exact_*_type-2_*,agree_type-2_*,mean_vs_sum,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "laplace-kron-asdl",
        "deep_linear_d2_bias_mse_mean",
        "exact_*_type-2_*,agree_type-2_*,batch_split,shuffle,current_parameters,wellformed",
    ),
    Expectation(
        "laplace-kron-asdl",
        "one_datum_cro_sum",
        "exact_*_type-2_*,agree_type-2_*,exact_*_empirical_*,agree_empirical_*",
    ),
    Expectation(
        "laplace-kron-curvlinops",
        "one_datum_mse_mean",
        "exact_E1_empirical_expand",
        "failed",
        text="a constant factor 2",
        finding="L1",
    ),
    Expectation(
        "laplace-kron-asdl",
        "one_datum_mse_sum",
        "exact_E1_empirical_*",
        "failed",
        text="2",
        finding="L1",
    ),
    Expectation(
        "laplace-kron-asdl",
        "mlp_tanh_cro_mean",
        "mc_converges_*",
        "failed",
        text="1/M applied twice",
        finding="L2",
    ),
    Expectation(
        "laplace-kron-backpack",
        "conv_flat_k3_pad1_mse_mean",
        "exact_E5_type-2_expand",
        "failed",
        text="too large by S",
        finding="L3",
    ),
]
