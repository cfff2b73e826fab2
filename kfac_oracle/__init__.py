"""kfac_oracle: exact references, a reference KFAC and a conformance harness for KFAC.

Conventions (notes §3): parameters flattened row-major (rvec) in
``named_parameters()`` order, weight before bias; a Kronecker block is ``G ⊗ A``.
"""

from kfac_oracle.contract import (
    DenseBlock,
    KFACRequest,
    KroneckerFactors,
    MatVecBlock,
)
from kfac_oracle.problem import Problem, ProblemError


def run_checks(impl, cases=None, **kwargs):
    """Run the conformance checks (see :func:`kfac_oracle.harness.run`)."""
    from kfac_oracle.harness import run

    return run(impl, cases, **kwargs)


__version__ = "0.1.0"

__all__ = [
    "DenseBlock",
    "KFACRequest",
    "KroneckerFactors",
    "MatVecBlock",
    "Problem",
    "ProblemError",
    "run_checks",
    "__version__",
]
