"""KFAC-reduce blocks that vanish in exact arithmetic (keys of softmax attention).

Softmax attention is invariant under one shift of every key, so the key projection's
output gradients sum to zero over the positions and its KFAC-reduce block is rounding
noise. A right candidate must pass there (its noise differs from the reference's),
and a candidate returning a non-vanishing block must still fail.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from kfac_oracle.contract import KFACRequest
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.runner.run import run
from tests.factory_cases import CASES

CASE = next(c for c in CASES if c.id == "factory_pooled_transformer_ce")
KEY = "blocks.0.attn.k"


class ExpandForReduce(ReferenceKFAC):
    """Answers a KFAC-reduce request with KFAC-expand."""

    name = "expand-for-reduce"

    def compute(self, request: KFACRequest):
        return super().compute(dataclasses.replace(request, kfac_approx="expand"))


class OtherRounding(ReferenceKFAC):
    """KFAC-reduce with rounding noise of its own: ``G + 1e-30 · G_expand``.

    Where ``G`` vanishes identically its computed value is noise of order
    ``eps² ‖G_expand‖``; a right implementation summing in another order has other
    noise of that order. Elsewhere the change is 1e-30 relative.
    """

    name = "other-rounding"

    def compute(self, request: KFACRequest):
        factors = super().compute(request)
        if request.kfac_approx != "reduce":
            return factors
        expand = super().compute(dataclasses.replace(request, kfac_approx="expand"))
        return {
            name: dataclasses.replace(
                f,
                gradient_covariance=f.gradient_covariance
                + 1e-30 * expand[name].gradient_covariance,
            )
            for name, f in factors.items()
        }


def _key_reduce(records):
    return [r for r in records if r.layer == KEY and r.check.endswith("_reduce")]


def _run(impl):
    return run(impl, [CASE], families=["agreement"], isolation="none")


def test_the_reference_key_block_vanishes_and_is_compared_against_expand():
    records = _key_reduce(_run(OtherRounding()))
    type2 = [r for r in records if r.check == "agree_type-2_reduce"]
    assert type2 and all(r.status == "passed" for r in type2)
    assert all("vanishes in exact arithmetic" in r.message for r in type2)


def test_a_non_vanishing_key_block_fails():
    records = _key_reduce(_run(ExpandForReduce()))
    assert any(r.status == "failed" for r in records)


def test_other_layers_keep_the_ordinary_comparison():
    records = [r for r in _run(OtherRounding()) if r.layer != KEY]
    assert records and all(r.status == "passed" for r in records)
    assert not any("vanishes" in r.message for r in records)


@pytest.mark.skipif(
    importlib.util.find_spec("curvlinops") is None, reason="curvlinops not installed"
)
def test_curvlinops_passes_the_vanishing_key_block():
    records = _key_reduce(_run("curvlinops-kfac"))
    assert records and all(r.status == "passed" for r in records), [
        r.message for r in records if r.status != "passed"
    ]
