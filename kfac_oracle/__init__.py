"""kfac_oracle: exact references, a reference KFAC and a conformance harness for KFAC.

Conventions (docs/theory.md §3): parameters flattened row-major (rvec) in
``named_parameters()`` order, weight before bias; a Kronecker block is ``G ⊗ A``.

The public names are imported lazily, so that importing the package (as the pytest
plugin does in every pytest run) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_LAZY = {
    "KFACRequest": "kfac_oracle.contract",
    "KroneckerFactors": "kfac_oracle.contract",
    "DenseBlock": "kfac_oracle.contract",
    "MatVecBlock": "kfac_oracle.contract",
    "Candidate": "kfac_oracle.contract",
    "FULL_CAPABILITIES": "kfac_oracle.contract",
    "Capabilities": "kfac_oracle.capabilities",
    "FisherType": "kfac_oracle.flavours",
    "KFACApprox": "kfac_oracle.flavours",
    "BiasMode": "kfac_oracle.flavours",
    "Flavour": "kfac_oracle.flavours",
    "Problem": "kfac_oracle.problem",
    "Case": "kfac_oracle.catalogue",
    "Claim": "kfac_oracle.catalogue",
    "exact": "kfac_oracle.catalogue",
    "inexact": "kfac_oracle.catalogue",
    "mc_converges": "kfac_oracle.catalogue",
    "hessian_equals_ggn": "kfac_oracle.catalogue",
    "one_datum_claims": "kfac_oracle.catalogue",
    "CheckRecord": "kfac_oracle.runner.records",
    "ReferenceKFAC": "kfac_oracle.reference.candidate",
    "run_checks": "kfac_oracle.runner.run",
    "ProblemError": "kfac_oracle.errors",
    "UsageError": "kfac_oracle.errors",
}
_ALIASES = {"run_checks": "run"}

if TYPE_CHECKING:
    from kfac_oracle.capabilities import Capabilities
    from kfac_oracle.catalogue import (
        Case,
        Claim,
        exact,
        hessian_equals_ggn,
        inexact,
        mc_converges,
        one_datum_claims,
    )
    from kfac_oracle.contract import (
        FULL_CAPABILITIES,
        Candidate,
        DenseBlock,
        KFACRequest,
        KroneckerFactors,
        MatVecBlock,
    )
    from kfac_oracle.errors import ProblemError, UsageError
    from kfac_oracle.flavours import BiasMode, FisherType, Flavour, KFACApprox
    from kfac_oracle.problem import Problem
    from kfac_oracle.reference.candidate import ReferenceKFAC
    from kfac_oracle.runner.records import CheckRecord
    from kfac_oracle.runner.run import run as run_checks

__all__ = [
    "FULL_CAPABILITIES",
    "BiasMode",
    "Candidate",
    "Capabilities",
    "Case",
    "CheckRecord",
    "Claim",
    "DenseBlock",
    "FisherType",
    "Flavour",
    "KFACApprox",
    "KFACRequest",
    "KroneckerFactors",
    "MatVecBlock",
    "Problem",
    "ProblemError",
    "ReferenceKFAC",
    "UsageError",
    "__version__",
    "exact",
    "hessian_equals_ggn",
    "inexact",
    "mc_converges",
    "one_datum_claims",
    "run_checks",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), _ALIASES.get(name, name))
    raise AttributeError(f"module 'kfac_oracle' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
