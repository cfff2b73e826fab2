"""Helpers for our own tests."""

import torch

from kfac_oracle.catalogue import load_cases
from kfac_oracle.checks.compare import EXACT_RTOL, rel_error

NEGATIVE_GAP = 1e-3

CASES = load_cases()
CASE_IDS = [c.id for c in CASES]
__all__ = [
    "CASES",
    "CASE_IDS",
    "EXACT_RTOL",
    "NEGATIVE_GAP",
    "assert_close",
    "rel_error",
]


def assert_close(a, b, rtol=EXACT_RTOL, what=""):
    err = rel_error(a, b)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def two_dim_output(case) -> bool:
    """Whether the case's model output is (N, C) (curvlinops' MC/EF convention)."""
    pb = case.build()
    X, _ = pb.data[0]
    with torch.no_grad():
        return pb.model(X).ndim == 2
