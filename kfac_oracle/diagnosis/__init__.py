"""Diagnosis: which known pitfall(s) of docs/theory.md §7 explain a mismatch exactly.

:func:`diagnose` fits the candidate's block to what an implementation with a pitfall
would return, up to a constant, and names the constant by the problem's scales (one,
squared, or a product of two: combined pitfalls). Modules: :mod:`.fit` (the fit and
float32 rounding), :mod:`.scales` (named constants), :mod:`.pitfalls` (KFAC's
structural pitfalls), :mod:`.ekfac` (EKFAC's), :mod:`.core` (the search).
"""

from kfac_oracle.diagnosis.core import NO_PITFALL, diagnose, shared_positions
from kfac_oracle.diagnosis.fit import (
    FIT_RTOL,
    FLOAT32_LEVEL,
    fit_scalar,
    precision_diagnosis,
)
from kfac_oracle.diagnosis.pitfalls import (
    KernelOrderSwapped,
    PerBatchReduction,
    UnfoldWithoutDilation,
    UnfoldWithoutPadding,
    UnfoldWithoutStride,
)
from kfac_oracle.diagnosis.scales import (
    describe_constant,
    name_scalar,
    named_scales,
    scale_atoms,
    scale_explanations,
)

__all__ = [
    "FIT_RTOL",
    "FLOAT32_LEVEL",
    "NO_PITFALL",
    "KernelOrderSwapped",
    "PerBatchReduction",
    "UnfoldWithoutDilation",
    "UnfoldWithoutPadding",
    "UnfoldWithoutStride",
    "describe_constant",
    "diagnose",
    "fit_scalar",
    "name_scalar",
    "named_scales",
    "precision_diagnosis",
    "scale_atoms",
    "scale_explanations",
    "shared_positions",
]
