"""Helpers shared by the adapters: library versions and capability checks."""

from __future__ import annotations

from importlib import metadata

from kfac_oracle.contract import KFACRequest


def distribution_version(distribution: str) -> str | None:
    """The installed version of a PyPI distribution, or ``None``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def check_flavour(name: str, capabilities: dict, request: KFACRequest) -> None:
    """Raise ``NotImplementedError`` for a flavour, loss or reduction not declared.

    The harness already reports such requests "unsupported" without calling the
    adapter; the check protects direct callers.
    """
    for key, value in (
        ("fisher_type", request.fisher_type),
        ("kfac_approx", request.kfac_approx),
        ("losses", request.loss_name),
        ("reductions", request.reduction),
    ):
        allowed = capabilities.get(key)
        if allowed is not None and value not in allowed:
            raise NotImplementedError(f"{name}: {key} {value!r} not supported")
