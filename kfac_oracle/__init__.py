"""kfac_oracle: exact references, a reference KFAC and a conformance harness for KFAC.

Conventions (notes §3): parameters flattened row-major (rvec) in
``named_parameters()`` order, weight before bias; a Kronecker block is ``G ⊗ A``.

The public names are imported lazily, so that importing the package (as the pytest
plugin does in every pytest run) does not import torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "KFACRequest": "kfac_oracle.contract",
    "KroneckerFactors": "kfac_oracle.contract",
    "DenseBlock": "kfac_oracle.contract",
    "MatVecBlock": "kfac_oracle.contract",
    "Problem": "kfac_oracle.problem",
    "ProblemError": "kfac_oracle.problem",
}

__all__ = [*_LAZY, "__version__", "run_checks"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kfac_oracle' has no attribute {name!r}")


def run_checks(impl, cases=None, **kwargs):
    """Run the conformance checks (see :func:`kfac_oracle.harness.run`)."""
    from kfac_oracle.harness import run

    return run(impl, cases, **kwargs)
