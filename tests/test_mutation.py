"""Mutation meta-tests: every planted pitfall is caught by the conformance checks.

Each mutant (tests/mutants.py) is the reference with one pitfall of notes §7. It runs
through the same checks as any candidate (exactness, agreement, MC, invariances,
robustness) on the whole catalogue; at least one check must fail or error. The score
is printed in the terminal summary and must be 100%.
"""

import pytest

from kfac_oracle.checks import CheckSession, collect
from tests.mutants import MUTANTS
from tests.utils import CASES

SCORE: dict[str, bool] = {}


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught(mutant):
    impl = mutant()
    session = CheckSession(impl)
    records = [item.run(session) for item in collect(impl, CASES)]
    caught = [r for r in records if r.status in ("failed", "error")]
    SCORE[mutant.name] = bool(caught)
    assert caught, f"mutant {mutant.name} ({mutant.pitfall}) passed every check"
    if mutant.expected_diagnosis:
        diagnoses = [r.diagnosis or "" for r in caught]
        assert any(mutant.expected_diagnosis in d for d in diagnoses), (
            f"no diagnosis names {mutant.expected_diagnosis!r}; got "
            f"{sorted(set(diagnoses))[:5]}"
        )


def test_at_least_ten_pitfalls():
    assert len(MUTANTS) >= 10
    assert len({m.pitfall.split(":")[0] for m in MUTANTS}) >= 9
