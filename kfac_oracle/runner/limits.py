"""The per-call time limit for candidates run in the harness's own process.

With process isolation (the default where the platform has ``fork``) the limit is a
hard kill of the candidate's process, and nothing here is needed. In-process
(``isolation="none"``) two mechanisms work together:

- a ``SIGALRM`` timer raises :class:`~kfac_oracle.errors.CheckTimeout`, a
  ``BaseException`` that a candidate's ``except Exception`` cannot swallow. A timer
  that was already running (pytest-timeout's, a user's watchdog) is preserved: the
  earlier deadline wins, the outer handler runs at its own deadline, and the outer
  timer is re-armed with its remaining time afterwards;
- the wall time of the whole call is measured, so a call that outlived its limit
  (its own ``signal.alarm`` replaced ours, C code held the interpreter) is a timeout
  whatever happened to the signal.

Where no timer can be armed (not the main thread, no ``setitimer``) only the measured
wall time applies: a hanging candidate then blocks the run, and :func:`can_arm` says so.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kfac_oracle.errors import CheckTimeout, UsageError


def check_time_limit(seconds: object) -> float | None:
    """A valid time limit: ``None`` (no limit) or a positive finite number of seconds.

    Raises:
        UsageError: For zero, negative, NaN, infinite or non-numeric limits.
    """
    if seconds is None:
        return None
    try:
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(
            f"time limit must be a number of seconds, got {seconds!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(
            f"time limit must be a positive, finite number of seconds, got {seconds!r}"
        )
    return value


def can_arm() -> bool:
    """Whether a ``SIGALRM`` timer can be armed here (Unix, main thread)."""
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CheckTimeout` if the body runs past ``seconds``.

    Also raises after the body if its measured wall time exceeded the limit.
    """
    if seconds is None:
        yield
        return
    start = time.monotonic()
    message = f"ran past the time limit of {seconds:g} s"
    if not can_arm():
        yield
        _check_elapsed(start, seconds, message)
        return
    outer_remaining, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    outer_deadline = start + outer_remaining if outer_remaining > 0 else math.inf
    own_deadline = start + seconds

    def handler(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if now >= own_deadline - 1e-3:
            raise CheckTimeout(message)
        if now >= outer_deadline - 1e-3 and callable(previous):
            previous(signum, frame)
            return
        signal.setitimer(signal.ITIMER_REAL, max(own_deadline - now, 1e-3))

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_remaining or math.inf))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_remaining > 0:
            left = outer_deadline - time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)
    _check_elapsed(start, seconds, message)


def _check_elapsed(start: float, seconds: float, message: str) -> None:
    elapsed = time.monotonic() - start
    if elapsed > seconds:
        raise CheckTimeout(f"{message} (measured {elapsed:.3g} s)")


__all__ = ["can_arm", "check_time_limit", "time_limit"]
