"""Shared pytest configuration: float64 by default in our own tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Fix the global seed and restore the default dtype after every test."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)


def pytest_terminal_summary(terminalreporter):
    """Print the mutation score when the mutation meta-tests ran."""
    try:
        from tests.test_mutation import SCORE
    except ImportError:
        return
    if SCORE:
        caught = sum(SCORE.values())
        terminalreporter.write_sep("-", "mutation score")
        terminalreporter.write_line(
            f"mutation score: {caught}/{len(SCORE)} mutants caught "
            f"({100 * caught / len(SCORE):.0f}%)"
        )
        for name, ok in SCORE.items():
            if not ok:
                terminalreporter.write_line(f"  survived: {name}")
