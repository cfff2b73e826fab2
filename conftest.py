"""Shared pytest configuration of the project's own tests.

Each test process uses one intra-op thread: the catalogue's problems are tiny, and on
a 2-core machine (or under pytest-xdist) OpenMP threads only wait for each other.

The reference disk cache (kfac_oracle/runner/diskcache.py) of a test session is a
fresh temporary folder, shared by the session's pytest-xdist workers (they inherit
the environment) and removed at the end: no test reads or writes a user's cache. A
test that patches reference code must pass ``disk=False`` to ``ReferenceCache`` or
disable the cache (``diskcache.set_enabled(False)``).
"""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(1)

if "KFAC_ORACLE_TEST_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="kfac-oracle-test-cache-")
    os.environ["KFAC_ORACLE_TEST_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ["KFAC_ORACLE_CACHE"] = os.environ["KFAC_ORACLE_TEST_CACHE"]


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
        from tests.test_mutation import SCORE, WITNESS
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
            where = f" (first caught on {WITNESS[name]})" if name in WITNESS else ""
            state = "caught" if ok else "SURVIVED"
            terminalreporter.write_line(f"  {state}: {name}{where}")
