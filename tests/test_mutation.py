"""Mutation meta-tests: every planted pitfall is caught by the conformance checks.

Each mutant (tests/mutants.py) is the reference with one pitfall of docs/theory.md §7.
The default test runs a mutant through every check family case by case and stops at
the first case that catches it (with the expected diagnosis, where one is declared).
The order is chosen by the test itself: greedily, the case that adds the most check
kinds not yet covered per unit of cost comes next, then the rest by cost; so a short
prefix of the catalogue exercises every kind of check. ``-m slow`` runs every mutant on
the whole catalogue. The score is printed in the terminal summary and must be 100%.
"""

import pytest

from kfac_oracle.checks import collect
from kfac_oracle.runner.run import Session, run
from tests.mutants import MUTANTS
from tests.utils import CASES

SCORE: dict[str, bool] = {}
WITNESS: dict[str, str] = {}


def _cost(case) -> int:
    return case.num_params() * case.num_data * len(case.layers)


def _coverage_order(cases) -> list:
    """Greedy: most new check kinds (target names) per cost first, then by cost."""
    kinds = {c.id: {item.check for item in collect([c])} for c in cases}
    left, seen, order = sorted(cases, key=_cost), set(), []
    while left:
        best = max(left, key=lambda c: len(kinds[c.id] - seen) / _cost(c))
        if not kinds[best.id] - seen:
            break
        order.append(best)
        seen |= kinds[best.id]
        left.remove(best)
    return order + left


BY_COST = _coverage_order(CASES)


def _caught(records, mutant) -> tuple[bool, bool]:
    caught = [r for r in records if r.status in ("failed", "error")]
    named = not mutant.expected_diagnosis or any(
        mutant.expected_diagnosis in (r.diagnosis or "") for r in caught
    )
    return bool(caught), bool(caught) and named


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught(mutant):
    session = Session.start(mutant(), isolation="none")
    caught_somewhere = False
    try:
        for case in BY_COST:
            records = run(None, [case], session=session)
            caught, named = _caught(records, mutant)
            caught_somewhere |= caught
            if named:
                SCORE[mutant.name] = True
                WITNESS[mutant.name] = case.id
                return
    finally:
        session.close()
    SCORE[mutant.name] = False
    assert caught_somewhere, (
        f"mutant {mutant.name} ({mutant.pitfall}) passed every check"
    )
    pytest.fail(f"no diagnosis names {mutant.expected_diagnosis!r} for {mutant.name}")


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught_on_the_whole_catalogue(mutant):
    records = run(mutant(), CASES, isolation="none")
    caught, named = _caught(records, mutant)
    assert caught, f"mutant {mutant.name} ({mutant.pitfall}) passed every check"
    assert named, f"no diagnosis names {mutant.expected_diagnosis!r}"


def test_at_least_ten_pitfalls():
    assert len(MUTANTS) >= 10
    assert len({m.pitfall.split(":")[0] for m in MUTANTS}) >= 9
