"""The worked adapter of docs/writing-an-adapter.md passes the conformance checks.

``examples/third_party_adapter`` holds a stand-in third-party KFAC library
(``tinykfac.py``, torch only) and its adapter; here they run through
``parametrize_with_checks`` on a few small cases, as a library's own test suite would.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kfac_oracle.catalogue import get_case
from kfac_oracle.testing import parametrize_with_checks

sys.path.insert(
    0, str(Path(__file__).parent.parent / "examples" / "third_party_adapter")
)

from tinykfac_adapter import TinyKFACAdapter  # noqa: E402

CASES = [
    get_case("one_datum_cro_sum"),  # E1: empirical KFAC is the empirical Fisher
    get_case("mlp_tanh_cro_mean"),  # unequal batches (5, 3)
    get_case("mlp_relu_inplace_mse_sum"),  # an in-place activation after the layer
    get_case("deep_linear_d2_bias_mse_mean"),  # MSE: T = 4 loss terms per datum
    get_case("seq_reduce_meanpool_mse_mean"),  # 3-D layer inputs: NotImplementedError
]


@parametrize_with_checks(
    TinyKFACAdapter(),
    cases=CASES,
    families=["exactness", "agreement", "invariance", "robustness"],
    isolation="none",
)
def test_tinykfac_conforms(check):
    check()


def test_tinykfac_without_the_translation_fails():
    """The adapter's scale and bias translation are what make it pass."""

    class Untranslated(TinyKFACAdapter):
        def compute(self, request):
            out = super().compute(request)
            for f in out.values():
                f.gradient_covariance = f.gradient_covariance / request.num_data
            return out

    from kfac_oracle.runner.run import run

    records = run(
        Untranslated(),
        [get_case("mlp_tanh_cro_mean")],
        checks="agree_empirical_expand",
        isolation="none",
    )
    assert [r.status for r in records] == ["failed", "failed"]
    assert "too small by N" in records[0].diagnosis
