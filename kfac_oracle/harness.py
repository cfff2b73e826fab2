"""Running the conformance checks against one implementation.

``resolve_implementation`` turns ``module:attr`` or a built-in name into a candidate;
``run`` collects the check items for the selected cases and runs them against one
:class:`~kfac_oracle.checks.base.CheckSession`, applying expected failures (strict:
an expected failure that passes is reported as failed).
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable

from kfac_oracle.catalogue import Case, load_cases
from kfac_oracle.checks import CheckItem, CheckRecord, CheckSession, collect


class ImplementationError(ValueError):
    """The implementation could not be resolved or instantiated."""


def builtin_implementations() -> dict[str, Callable[[], object]]:
    """Built-in names: ``reference`` (joint and separate bias) and every adapter."""
    from kfac_oracle.adapters import builtin_adapters
    from kfac_oracle.reference.candidate import ReferenceKFAC

    impls: dict[str, Callable[[], object]] = {
        "reference": ReferenceKFAC,
        "reference-separate": lambda: ReferenceKFAC(bias="separate"),
    }
    for name, (_, cls) in builtin_adapters().items():
        impls[name] = cls
    return impls


def resolve_implementation(spec) -> object:
    """An implementation from ``module:attr``, a built-in name, or an object.

    ``attr`` may be a class (instantiated without arguments), a factory (called), or
    an instance. The current directory is importable.

    Raises:
        ImplementationError: With a message naming what is wrong.
    """
    if not isinstance(spec, str):
        obj = spec
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise ImplementationError(
                f"cannot import {module_name!r}: {error}"
            ) from error
        try:
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError as error:
            raise ImplementationError(
                f"{module_name!r} has no attribute {attr!r}"
            ) from error
    else:
        builtins = builtin_implementations()
        if spec not in builtins:
            raise ImplementationError(
                f"unknown implementation {spec!r}: use module:attr or one of "
                f"{', '.join(sorted(builtins))}"
            )
        obj = builtins[spec]
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "compute")):
        try:
            obj = obj()
        except Exception as error:
            raise ImplementationError(
                f"cannot instantiate {spec!r}: {error}"
            ) from error
    if not callable(getattr(obj, "compute", None)):
        raise ImplementationError(f"{spec!r} has no compute(request) method")
    if not hasattr(obj, "name"):
        try:
            obj.name = type(obj).__name__
        except AttributeError:
            pass
    return obj


def select_items(items: list[CheckItem], checks: str | None = None) -> list[CheckItem]:
    """Items whose id or check name matches one of the comma-separated patterns."""
    if not checks:
        return items
    pats = [p.strip() for p in checks.split(",") if p.strip()]
    return [
        it
        for it in items
        if any(fnmatch.fnmatch(it.id, p) or fnmatch.fnmatch(it.check, p) for p in pats)
    ]


def apply_expected_failures(
    record: CheckRecord, expected: dict[str, str] | None
) -> CheckRecord:
    """Strict expected failures: failed → xfailed; passed → failed (unexpected pass)."""
    for pattern, reason in (expected or {}).items():
        if fnmatch.fnmatch(record.id, pattern) or fnmatch.fnmatch(
            record.check, pattern
        ):
            if record.status in ("failed", "error"):
                record.message = f"expected failure ({reason}): {record.message}"
                record.status = "xfailed"
            elif record.status == "passed":
                record.status = "failed"
                record.message = (
                    f"unexpectedly passed; it was expected to fail ({reason}). "
                    "Remove the expected failure."
                )
            break
    return record


def warn_unmatched(expected: dict[str, str] | None, ids: Iterable[str]) -> None:
    """Warn for expected-failure patterns that match no check id."""
    ids = list(ids)
    for pattern in expected or {}:
        checks = {i.split("[")[0] for i in ids}
        if not any(fnmatch.fnmatch(i, pattern) for i in ids) and not any(
            fnmatch.fnmatch(c, pattern) for c in checks
        ):
            warnings.warn(
                f"expected-failure pattern {pattern!r} matches no check", stacklevel=3
            )


def run(
    impl,
    cases: list[Case] | str | None = None,
    checks: str | None = None,
    families: list[str] | None = None,
    expected_failures: dict[str, str] | None = None,
    time_limit: float | None = 60.0,
    progress: Callable[[int, int, CheckRecord], None] | None = None,
    session: CheckSession | None = None,
) -> list[CheckRecord]:
    """Run the conformance suite; never raises because of the candidate.

    Args:
        impl: A candidate, a built-in name or ``module:attr``.
        cases: Cases, or an fnmatch pattern on ids/families (default: all).
        checks: Comma-separated fnmatch patterns on check names or ids.
        families: Restrict to these check families.
        expected_failures: ``{pattern: reason}``; strict.
        time_limit: Seconds per candidate call.
        progress: Called after each check with ``(done, total, record)``.
        session: Reuse a session (and its caches).

    Returns:
        One record per check item.
    """
    impl = resolve_implementation(impl)
    if cases is None or isinstance(cases, str):
        cases = load_cases(cases)
    items = select_items(collect(impl, cases, families), checks)
    warn_unmatched(expected_failures, [it.id for it in items])
    session = session or CheckSession(impl, time_limit=time_limit)
    records = []
    for k, item in enumerate(items):
        record = apply_expected_failures(item.run(session), expected_failures)
        record.reproduce = reproduce_command(impl, item)
        records.append(record)
        if progress:
            progress(k + 1, len(items), record)
    return records


def reproduce_command(impl, item: CheckItem) -> str:
    """A command that re-runs one check."""
    name = getattr(impl, "name", "IMPL")
    spec = getattr(impl, "_kfac_oracle_spec", name)
    return f"kfac-oracle check {spec} --cases {item.case.id} --checks '{item.id}'"
