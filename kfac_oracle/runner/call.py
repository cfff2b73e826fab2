"""One guarded call of a candidate: compute, read the result, note what it left behind.

:func:`guarded_call` runs ``compute`` and :func:`~kfac_oracle.runner.validate.
materialize` (lazy results are read inside the limit), catches *everything* the
candidate may raise — ``SystemExit`` from ``sys.exit()``, any ``BaseException`` subclass
— except ``KeyboardInterrupt``, compares the model and torch's global state before and
after (:mod:`kfac_oracle.runner.sideeffects`), and restores the global state. It never
raises because of the candidate; it returns a :class:`CallReport`. It runs in the
harness's process or in the candidate's worker process
(:mod:`kfac_oracle.runner.isolation`).
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kfac_oracle.contract import KFACRequest
from kfac_oracle.errors import CandidateError, CheckTimeout
from kfac_oracle.runner.limits import time_limit
from kfac_oracle.runner.sideeffects import (
    Snapshot,
    leftovers,
    model_changes,
    restore_globals,
)
from kfac_oracle.runner.validate import LayerShape, PlainResult, materialize


@dataclass
class CallReport:
    """What one candidate call gave.

    Attributes:
        plain: The materialized result, or ``None`` if the call failed.
        error: Why the call failed (a message naming the cause).
        unsupported: The candidate's ``NotImplementedError`` message.
        leftovers: Side effects left behind (:func:`~kfac_oracle.runner.sideeffects.
            leftovers`), also when the call failed.
        seconds: Wall time of the call.
        warnings: Warnings the candidate raised, ``"Category: message"`` each.
    """

    plain: dict[str, PlainResult] | None = None
    error: str | None = None
    unsupported: str | None = None
    leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def describe_exception(error: BaseException) -> str:
    """``Type: message``, robust to a ``__str__`` that raises."""
    try:
        return traceback.format_exception_only(type(error), error)[-1].strip()
    except Exception:  # noqa: BLE001 - the candidate's exception may be anything
        return f"{type(error).__name__}: <exception str() failed>"


def guarded_call(
    impl: Any,
    request: KFACRequest,
    shapes: Mapping[str, LayerShape],
    dtype: torch.dtype,
    device: Any,
    limit: float | None = None,
) -> CallReport:
    """Call ``impl.compute(request)`` and read its result; never raises for it.

    Args:
        impl: The candidate.
        request: Its request (the model in it is the candidate's own copy).
        shapes: The expected shape of each requested layer's result.
        dtype: The problem's dtype.
        device: The problem's device.
        limit: In-process time limit in seconds (``None`` when the caller enforces
            one from outside, as the isolation worker's parent does).

    Raises:
        KeyboardInterrupt: The user interrupts; never swallowed.
    """
    import time

    report = CallReport()
    before = Snapshot.capture(request.model)
    start = time.monotonic()
    caught = warnings.catch_warnings(record=True)
    try:
        with time_limit(limit), caught as recorded:
            warnings.simplefilter("always")
            result = impl.compute(request)
            report.plain = materialize(
                result, shapes, dtype, device, request.operations, request.num_data
            )
            report.warnings = [f"{w.category.__name__}: {w.message}" for w in recorded]
    except KeyboardInterrupt:
        raise
    except CheckTimeout as error:
        report.error = f"timeout: {error}"
    except NotImplementedError as error:
        report.unsupported = f"raised NotImplementedError: {describe_exception(error)}"
    except CandidateError as error:
        report.error = str(error)
    except SystemExit as error:
        report.error = f"compute() called sys.exit({error.code!r})"
    except BaseException as error:  # noqa: BLE001 - a candidate may raise anything
        report.error = f"compute() raised {describe_exception(error)}"
    finally:
        report.seconds = time.monotonic() - start
        try:
            report.leftovers = leftovers(before, request.model)
        finally:
            restore_globals(before.globals)
    if report.plain is not None:
        changed = model_changes(before, request.model)
        if changed:
            report.plain, report.error = None, changed
    return report


__all__ = ["CallReport", "describe_exception", "guarded_call"]
