"""Implementations by name: the reference, and adapters registered by entry point.

An adapter is registered through the entry-point group ``kfac_oracle.adapters``; the
entry point names a module that defines ``ADAPTERS = {name: class}`` (and ``LIBRARY``,
see :mod:`kfac_oracle.adapters._common`), or a single class or factory, registered
under the entry point's name. kfac-oracle registers its own adapter modules this way
(``pyproject.toml``), and so can any other package::

    [project.entry-points."kfac_oracle.adapters"]
    my_kfac = "my_package.kfac_adapter"

The harness, the matrix, the benchmarks and the tests all read this one registry.
:func:`resolve` turns a name, ``module:attr`` or an object into a candidate with its
validated capabilities.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from types import ModuleType
from typing import Any

from kfac_oracle.capabilities import Capabilities
from kfac_oracle.errors import CapabilityError, ImplementationError

ENTRY_POINT_GROUP = "kfac_oracle.adapters"


@dataclass(frozen=True)
class Implementation:
    """A registered implementation.

    Attributes:
        name: Its built-in name (``reference``, ``curvlinops-kfac``, ...).
        factory: Builds the candidate (imports no library until ``compute``).
        module: The module defining it.
        library: The library it wraps (``None`` for the reference).
    """

    name: str
    factory: Callable[[], Any]
    module: str
    library: Any = None

    def version(self) -> str | None:
        """The wrapped library's installed version (the oracle's for the reference)."""
        if self.library is None:
            from kfac_oracle import __version__

            return __version__
        return self.library.version()

    def unavailable(self) -> str | None:
        """Why it cannot run here (its library is not installed), or ``None``."""
        if self.library is not None and self.library.version() is None:
            return self.library.install_hint
        return None


def _reference() -> dict[str, Implementation]:
    from kfac_oracle.reference.candidate import ReferenceKFAC

    module = ReferenceKFAC.__module__
    return {
        "reference": Implementation(
            "reference", lambda: ReferenceKFAC(operations=True), module
        ),
        "reference-separate": Implementation(
            "reference-separate",
            lambda: ReferenceKFAC(bias="separate", operations=True),
            module,
        ),
        "reference-float32": Implementation(
            "reference-float32", lambda: ReferenceKFAC(dtype="float32"), module
        ),
    }


def _from_module(module: ModuleType) -> dict[str, Implementation]:
    adapters = getattr(module, "ADAPTERS", None)
    if not isinstance(adapters, dict):
        raise ImplementationError(
            f"adapter module {module.__name__} defines no ADAPTERS dict {{name: class}}"
        )
    library = getattr(module, "LIBRARY", None)
    return {
        name: Implementation(name, cls, module.__name__, library)
        for name, cls in adapters.items()
    }


@lru_cache(maxsize=1)
def adapters() -> dict[str, Implementation]:
    """Every adapter registered under the ``kfac_oracle.adapters`` entry points."""
    out: dict[str, Implementation] = {}
    for ep in sorted(
        metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name
    ):
        obj = ep.load()
        if isinstance(obj, ModuleType):
            found = _from_module(obj)
        else:
            module = getattr(obj, "__module__", ep.value.split(":")[0])
            found = {ep.name: Implementation(ep.name, obj, module)}
        for name, impl in found.items():
            if name in out:
                raise ImplementationError(
                    f"two adapters named {name!r}: {out[name].module} and {impl.module}"
                )
            out[name] = impl
    return out


def implementations() -> dict[str, Implementation]:
    """The reference and every registered adapter, by name."""
    return {**_reference(), **adapters()}


@dataclass
class Resolved:
    """A candidate ready to run.

    Attributes:
        impl: The candidate object.
        capabilities: Its validated capabilities.
        spec: How to name it on a command line (``module:attr`` or a built-in name),
            or ``None`` when it was given as an object that cannot be named so.
        name: Its display name.
        library: The library it wraps and its version, for reports (``None``: none
            declared).
        documented: ``{check pattern: reason}``: differences the library documents
            (a further approximation, a different convention); such failures are
            reported ``documented``, not ``failed``.
    """

    impl: Any
    capabilities: Capabilities
    spec: str | None
    name: str
    library: str | None = None
    documented: dict[str, str] = field(default_factory=dict)


def _import_attr(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ImplementationError(f"{spec!r} is not of the form module:attr")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except SystemExit as error:
        raise ImplementationError(
            f"importing {module_name!r} called sys.exit({error.code!r})"
        ) from None
    except BaseException as error:  # noqa: BLE001 - user code may raise anything
        raise ImplementationError(
            f"cannot import {module_name!r}: {error!r}"
        ) from error
    obj: Any = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImplementationError(
            f"{module_name!r} has no attribute {attr!r}"
        ) from None
    return obj


def _object_spec(obj: Any) -> str | None:
    """``module:Class`` for an instance whose class is importable, else ``None``."""
    cls = obj if isinstance(obj, type) else type(obj)
    module, qualname = (
        getattr(cls, "__module__", None),
        getattr(cls, "__qualname__", ""),
    )
    if not module or "<locals>" in qualname or module == "__main__":
        return None
    return f"{module}:{qualname}"


def resolve(spec: Any) -> Resolved:
    """A candidate from a built-in name, ``module:attr``, a class, factory or instance.

    A class is instantiated without arguments and a factory called; the result must
    have ``compute``; its ``capabilities`` are validated.

    Raises:
        ImplementationError: Naming what is wrong (unknown name, import failure,
            no ``compute``); :class:`~kfac_oracle.errors.CapabilityError` for invalid
            capabilities.
    """
    label = spec if isinstance(spec, str) else None
    if isinstance(spec, str):
        if ":" in spec:
            obj = _import_attr(spec)
        else:
            known = implementations()
            if spec not in known:
                raise ImplementationError(
                    f"unknown implementation {spec!r}: use module:attr or one of "
                    f"{', '.join(sorted(known))}"
                )
            obj = known[spec].factory
    else:
        obj = spec
    what = label or type(obj).__name__
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "compute")):
        try:
            obj = obj()
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001 - user code may raise anything
            raise ImplementationError(
                f"cannot instantiate {what!r}: {error!r}"
            ) from error
    if not callable(getattr(obj, "compute", None)):
        raise ImplementationError(f"{what!r} has no compute(request) method")
    try:
        name = str(getattr(obj, "name", None) or type(obj).__name__)
    except Exception as error:  # noqa: BLE001 - a property may raise
        raise ImplementationError(
            f"{what!r}: reading its name raised {error!r}"
        ) from error
    try:
        raw = getattr(obj, "capabilities", None)
    except Exception as error:  # noqa: BLE001
        raise CapabilityError(
            f"{name}: reading capabilities raised {error!r}"
        ) from error
    capabilities = Capabilities.from_mapping(raw, f"{name}'s capabilities")
    documented = getattr(obj, "documented", None) or {}
    if not isinstance(documented, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in documented.items()
    ):
        raise ImplementationError(
            f"{name}: documented must be a dict {{check pattern: reason}}"
        )
    library = _library_label(obj)
    if library is None and label in adapters():
        impl = adapters()[label]
        if impl.library is not None:
            library = f"{impl.library.distribution} {impl.library.version()}"
    return Resolved(
        impl=obj,
        capabilities=capabilities,
        spec=label if label is not None else _object_spec(obj),
        name=name,
        library=library,
        documented=dict(documented),
    )


def _library_label(obj: Any) -> str | None:
    """``"name version"`` from a candidate's optional ``library``/``version``."""
    library = getattr(obj, "library", None)
    if library is None:
        return None
    version = getattr(obj, "version", None)
    name = getattr(library, "distribution", library)
    if version is None and hasattr(library, "version"):
        version = library.version()
    return f"{name} {version}" if version else str(name)


__all__ = [
    "ENTRY_POINT_GROUP",
    "Implementation",
    "Resolved",
    "adapters",
    "implementations",
    "resolve",
]
