"""Process isolation: the candidate runs in a worker process with a hard time limit.

The worker is forked from the harness (so any candidate object works, picklable or
not) and serves calls one at a time: it receives a pickled request, runs
:func:`~kfac_oracle.runner.call.guarded_call` and sends back the materialized result
(plain tensors) and what the call left behind. The harness waits at most the time
limit; then it kills the worker's whole process group. A worker that dies — a
segfault, ``os._exit``, a C-level abort, the kernel's out-of-memory killer — becomes
an ``error`` record naming the exit status or signal, and the next call forks a new
worker. Nothing the candidate does (``sys.exit``, hangs in C code, threads that never
end, global state) can end or block the harness's run.

Isolation needs ``os.fork`` (Linux; on macOS fork and some libraries do not mix, so
it is opt-in there): :func:`available` says whether it is the default. The worker runs
torch with one intra-op thread (OpenMP's thread pool does not survive ``fork``); for
large problems where threads matter, ``isolation="none"`` runs the candidate in the
harness's process.
"""

from __future__ import annotations

import atexit
import gc
import os
import pickle
import signal
import sys
import weakref
from multiprocessing import get_context
from multiprocessing.connection import Connection
from typing import Any

from kfac_oracle.runner.call import CallReport

_LIVE: weakref.WeakSet[Worker] = weakref.WeakSet()


def available() -> bool:
    """Whether process isolation is the default here (``fork`` on Linux)."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def _become_worker() -> None:
    """Set up a freshly forked worker process.

    - its own process group (the harness kills the group, the candidate's children
      included);
    - killed when the harness dies (Linux ``PR_SET_PDEATHSIG``), so no worker outlives
      its run;
    - one intra-op thread: OpenMP's thread pool does not survive ``fork`` (a parallel
      region in the child would wait forever for the parent's threads);
    - the objects inherited from the harness (records, cached references) moved to
      the garbage collector's permanent generation (``gc.freeze``): a candidate that
      calls ``gc.collect()`` often (kronfluence does after every step) would otherwise
      traverse the harness's whole heap each time.
    """
    gc.freeze()
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the harness already died
            os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import torch

    torch.set_num_threads(1)


def _serve(impl: Any, conn: Connection) -> None:
    """The worker's loop: one request in, one :class:`CallReport` out."""
    _become_worker()
    serve_requests(impl, conn)


def serve_requests(impl: Any, conn: Connection) -> None:
    """Answer pickled requests with pickled :class:`CallReport` s until ``conn`` closes.

    Each request is ``(request, shapes, dtype, device)`` for
    :func:`~kfac_oracle.runner.call.guarded_call`; the process ends when the harness
    closes its end.
    """
    from kfac_oracle.runner.call import guarded_call

    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(0)
        request, shapes, dtype, device = pickle.loads(payload)
        report = guarded_call(impl, request, shapes, dtype, device, limit=None)
        try:
            data = pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # noqa: BLE001 - e.g. an unpicklable tensor subclass
            data = pickle.dumps(
                CallReport(error=f"the result could not be sent back: {error!r}")
            )
        conn.send_bytes(data)


class WorkerDied(Exception):
    """The worker process ended during a call."""


class WorkerTimeout(Exception):
    """The call ran past its time limit; the worker was killed."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not end"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    hint = " (os._exit?)" if code == 0 else ""
    return f"exited with status {code}{hint}"


class Worker:
    """A forked process that runs one candidate's calls.

    Args:
        impl: The candidate (inherited by the forked process).
    """

    def __init__(self, impl: Any):
        self.impl = impl
        self._process: Any = None
        self._conn: Connection | None = None
        _LIVE.add(self)

    def _start(self) -> None:
        ctx = get_context("fork")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_serve, args=(self.impl, child), daemon=True)
        process.start()
        child.close()
        try:
            os.setpgid(process.pid, process.pid)  # type: ignore[arg-type]
        except OSError:
            pass
        self._process, self._conn = process, parent

    def call(
        self, request: Any, shapes: Any, dtype: Any, device: Any, limit: float | None
    ) -> CallReport:
        """Run one call in the worker.

        Raises:
            WorkerTimeout: The call ran past ``limit`` (the worker is killed).
            WorkerDied: The worker ended during the call (its exit is described).
        """
        try:
            payload = pickle.dumps(
                (request, shapes, dtype, device), protocol=pickle.HIGHEST_PROTOCOL
            )
        except Exception:  # noqa: BLE001 - an unpicklable model: fork with it in memory
            return _call_in_fresh_fork(self.impl, request, shapes, dtype, device, limit)
        if self._process is None or not self._process.is_alive():
            self._start()
        assert self._conn is not None
        try:
            self._conn.send_bytes(payload)
            if not self._conn.poll(limit):
                self.stop()
                raise WorkerTimeout(
                    f"ran past the time limit of {limit:g} s (the candidate's process "
                    "was killed)"
                )
            data = self._conn.recv_bytes()
        except (EOFError, OSError, BrokenPipeError) as error:
            code = self._reap()
            raise WorkerDied(
                f"the candidate's process {_describe_exit(code)} during compute()"
            ) from error
        return pickle.loads(data)

    def _reap(self) -> int | None:
        process = self._process
        self._process, self._conn = None, None
        if process is None:
            return None
        process.join(timeout=5)
        if process.is_alive():
            _kill_group(process.pid)
            process.join(timeout=5)
        return process.exitcode

    def stop(self) -> None:
        """Kill the worker and everything it started."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            conn.close()
        if process is not None:
            _kill_group(process.pid)
            process.join(timeout=5)


def _call_in_fresh_fork(
    impl: Any, request: Any, shapes: Any, dtype: Any, device: Any, limit: float | None
) -> CallReport:
    """One call in a process forked for it (the request need not be picklable)."""
    ctx = get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def run() -> None:
        from kfac_oracle.runner.call import guarded_call

        _become_worker()
        report = guarded_call(impl, request, shapes, dtype, device, limit=None)
        child.send_bytes(pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL))

    process = ctx.Process(target=run, daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(limit):
            _kill_group(process.pid)
            process.join(timeout=5)
            raise WorkerTimeout(
                f"ran past the time limit of {limit:g} s (the candidate's process was "
                "killed)"
            )
        data = parent.recv_bytes()
    except (EOFError, OSError) as error:
        process.join(timeout=5)
        raise WorkerDied(
            f"the candidate's process {_describe_exit(process.exitcode)} during "
            "compute()"
        ) from error
    process.join(timeout=5)
    return pickle.loads(data)


def _kill_group(pid: int | None) -> None:
    if pid is None:
        return
    for kill in (
        lambda: os.killpg(pid, signal.SIGKILL),
        lambda: os.kill(pid, signal.SIGKILL),
    ):
        try:
            kill()
        except (ProcessLookupError, PermissionError, OSError):
            continue


@atexit.register
def _stop_all() -> None:
    for worker in list(_LIVE):
        worker.stop()


__all__ = ["Worker", "WorkerDied", "WorkerTimeout", "available"]
