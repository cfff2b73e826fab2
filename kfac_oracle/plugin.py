"""pytest plugin (``pytest11`` entry point): ``pytest --kfac-impl IMPL``.

Imports nothing heavy (no torch) until a conformance run is requested.
"""

from __future__ import annotations


def pytest_addoption(parser):
    """Register ``--kfac-impl`` and related options."""
    group = parser.getgroup("kfac-oracle", "KFAC conformance checks")
    group.addoption(
        "--kfac-impl",
        action="store",
        default=None,
        help="KFAC implementation to check: module:attr or a built-in name",
    )
    group.addoption(
        "--kfac-cases",
        action="store",
        default=None,
        help="fnmatch pattern(s) selecting catalogue cases",
    )
