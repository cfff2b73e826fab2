"""Adapters that expose third-party KFAC libraries through the public contract.

Each module defines ``ADAPTERS = {built-in name: class}`` and ``library_version()``;
importing a module never imports its library (that happens in ``compute``).
"""

from __future__ import annotations

import importlib

MODULES = (
    "curvlinops",
    "backpack",
    "asdl",
    "nngeometry",
    "laplace",
    "kronfluence",
    "dattri",
    "singd",
    "modelgeometry",
    "approxngd",
)

# The PyPI distribution behind each adapter module (for versions and install hints).
DISTRIBUTIONS = {
    "curvlinops": "curvlinops-for-pytorch",
    "backpack": "backpack-for-pytorch",
    "asdl": "asdfghjkl",
    "nngeometry": "nngeometry",
    "laplace": "laplace-torch",
    "kronfluence": "kronfluence",
    "dattri": "dattri",
    "singd": "singd",
    "modelgeometry": "modelgeometry",
    "approxngd": "approxngd",
}


def adapter_modules() -> dict[str, object]:
    """The adapter modules by short name."""
    return {
        name: importlib.import_module(f"kfac_oracle.adapters.{name}")
        for name in MODULES
    }


def builtin_adapters() -> dict[str, tuple[str, type]]:
    """``{built-in name: (module short name, class)}`` for every adapter."""
    out = {}
    for module_name, module in adapter_modules().items():
        for name, cls in module.ADAPTERS.items():
            out[name] = (module_name, cls)
    return out


def library_available(module_name: str) -> bool:
    """Whether the adapter module's library is installed (by its version lookup)."""
    module = importlib.import_module(f"kfac_oracle.adapters.{module_name}")
    return module.library_version() is not None
