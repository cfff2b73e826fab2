"""The kfac_oracle adapter of tinykfac (``tinykfac.py``, a stand-in outside library).

Run the conformance suite on it from this folder::

    kfac-oracle check tinykfac_adapter:TinyKFACAdapter --cases 'mlp_*,one_datum_*'

Translation of tinykfac's documented conventions to the contract
(docs/writing-an-adapter.md):

- Scale. tinykfac averages per datum: ``A = (1/N) Σ ã ãᵀ`` (as the contract) and
  ``G_tiny = (1/N) Σ_n g_n g_nᵀ`` with ``g_n`` from the sum-reduced per-datum loss.
  The contract's ``G = R Σ_n g_n g_nᵀ`` for ``L = R Σ_n ℓ_n``, so
  ``G = R·N·G_tiny`` (``R = 1/(N·T)`` for mean, 1 for sum). The MC average over
  ``M`` samples is already in ``G_tiny``.
- Bias. tinykfac puts the homogeneous coordinate first (``ã = [1; a]``); the
  contract's joint layout has it last, so ``A``'s first row and column move to the end.
- Order. tinykfac's ``A ⊗ G`` in cvec is the contract's ``G ⊗ A`` in rvec; returning
  the two factors as ``KroneckerFactors`` needs no further change.
- What tinykfac does not do is not declared (type-2, reduce with weight sharing,
  Conv2d, BCE, separate bias) or raises ``NotImplementedError`` (3-D layer inputs,
  which the capabilities cannot express): those checks are reported unsupported.
"""

from __future__ import annotations

import tinykfac
import torch

from kfac_oracle import KFACRequest, KroneckerFactors


class TinyKFACAdapter:
    """tinykfac's factors through the kfac_oracle contract."""

    name = "tinykfac"
    library = "tinykfac"
    version = tinykfac.__version__
    capabilities = {
        "fisher_type": {"empirical", "mc"},
        "kfac_approx": {"expand"},
        "layers": {"Linear"},
        "losses": {"MSELoss", "CrossEntropyLoss"},
        "reductions": {"mean", "sum"},
        "bias": {"joint"},
        "output_ndim": {2},
    }

    def compute(self, request: KFACRequest) -> dict[str, KroneckerFactors]:
        """Run tinykfac over every batch and translate its factors."""
        kfac = tinykfac.KFAC(
            request.model,
            request.loss_func,
            fisher_type=request.fisher_type,
            mc_samples=request.mc_samples,
            seed=request.seed,
        )
        with kfac:  # the hooks are removed on the way out, also after an error
            for X, y in request.data:
                kfac.update(X, y)
        scale = request.reduction_factor * request.num_data  # G = R·N·G_tiny
        out = {}
        for name, module in request.modules(kinds=(torch.nn.Linear,)).items():
            A, G = kfac.factors()[name]
            if module.bias is not None:  # [1; a] -> [a; 1]
                order = torch.cat([torch.arange(1, A.shape[0]), torch.tensor([0])])
                A = A[order][:, order]
            out[name] = KroneckerFactors(
                input_covariance=A,
                gradient_covariance=scale * G,
                bias="joint" if module.bias is not None else "none",
            )
        return out
