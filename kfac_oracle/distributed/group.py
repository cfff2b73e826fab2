"""The process group of a data-parallel run: W rank processes, started once per run.

Each rank is a process forked from the harness (any candidate object works), in its
own process group and killed when the harness dies (as the isolation worker,
:mod:`kfac_oracle.runner.isolation`). Rendezvous: rank 0 opens a
``torch.distributed.TCPStore`` on a free loopback port (port 0: the kernel chooses, so
no other process can take it in between) and tells the harness the port, which passes
it to the other ranks; every rank then calls
``init_process_group("gloo", store=…, rank=r, world_size=W)`` and reports ready
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` are set as
``torchrun`` sets them). The group then serves calls for the whole run: the harness
sends each rank its request, the rank runs
:func:`~kfac_oracle.runner.call.guarded_call` and sends back its
:class:`~kfac_oracle.runner.call.CallReport`.

One hard deadline applies to the whole group per call (the time limit): a rank that
hangs, dies (``os._exit``, a segfault) or fails while the others wait in a collective
ends the call for every rank; the whole group is then killed (each rank's process
group, so nothing the candidate started survives, and rank 0's port is closed with it)
and started afresh at the next call. Nothing a candidate does can end or block the run.
"""

from __future__ import annotations

import atexit
import os
import pickle
import sys
import time
import weakref
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from kfac_oracle.runner.call import CallReport
from kfac_oracle.runner.isolation import (
    _become_worker,
    _describe_exit,
    _kill_group,
    serve_requests,
)

#: Seconds the rendezvous of a fresh group may take.
START_TIMEOUT = 60.0
#: Seconds the other ranks get to finish once one rank has failed.
GRACE = 2.0
#: Loopback address of the rendezvous.
HOST = "127.0.0.1"

_LIVE: weakref.WeakSet[RankGroup] = weakref.WeakSet()


class GroupError(Exception):
    """The process group could not be started."""


def _rank_main(impl: Any, rank: int, world_size: int, conn: Connection) -> None:
    """A rank's life: rendezvous, then one :class:`CallReport` per request."""
    _become_worker()
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # what torchrun sets, for libraries that read the environment
    for name, value in (
        ("RANK", rank),
        ("LOCAL_RANK", rank),
        ("WORLD_SIZE", world_size),
        ("LOCAL_WORLD_SIZE", world_size),
    ):
        os.environ[name] = str(value)
    import torch.distributed as dist

    try:
        timeout = timedelta(seconds=START_TIMEOUT)
        if rank == 0:
            store = dist.TCPStore(
                HOST, 0, world_size, True, timeout=timeout, wait_for_workers=False
            )
            conn.send(("port", store.port))
        else:
            port = conn.recv()
            store = dist.TCPStore(HOST, port, world_size, False, timeout=timeout)
        limit = conn.recv()
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=limit),
        )
        conn.send(("ready", None))
    except BaseException as error:  # noqa: BLE001 - report, then end the process
        try:
            conn.send(("failed", f"rank {rank}: {error!r}"))
        finally:
            os._exit(1)
    serve_requests(impl, conn)


class RankGroup:
    """``W`` rank processes running one candidate under ``torch.distributed``.

    Args:
        impl: The candidate (inherited by the forked ranks).
        world_size: ``W >= 2``.
        time_limit: Seconds per call for the whole group (``None``: none); also the
            timeout of the ranks' collectives.
    """

    def __init__(self, impl: Any, world_size: int, time_limit: float | None = 60.0):
        self.impl = impl
        self.world_size = world_size
        self.time_limit = time_limit
        self.starts = 0
        #: Every rank process id and rendezvous port this group has had.
        self.history_pids: list[int] = []
        self.history_ports: list[int] = []
        #: Why the group could not start (then it is not tried again).
        self.start_error: str | None = None
        self._processes: list[Any] = []
        self._conns: list[Connection] = []
        _LIVE.add(self)

    @property
    def running(self) -> bool:
        """Whether the group is up."""
        return bool(self._processes)

    def pids(self) -> list[int]:
        """The rank processes' ids (empty when the group is down)."""
        return [p.pid for p in self._processes]

    def start(self) -> None:
        """Fork the ranks and rendezvous.

        Raises:
            GroupError: If a rank fails or the rendezvous takes too long (the group
                is killed). The start involves no candidate code, so such a failure
                is the environment's: later starts fail at once with the same
                message.
        """
        if self.start_error is not None:
            raise GroupError(self.start_error)
        ctx = get_context("fork")
        for rank in range(self.world_size):
            parent, child = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=_rank_main,
                args=(self.impl, rank, self.world_size, child),
                daemon=True,
            )
            process.start()
            child.close()
            try:
                os.setpgid(process.pid, process.pid)  # type: ignore[arg-type]
            except OSError:
                pass
            self._processes.append(process)
            self._conns.append(parent)
            self.history_pids.append(process.pid)  # type: ignore[arg-type]
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        try:
            port = self._expect(0, "port", deadline)
            self.history_ports.append(port)
            for conn in self._conns[1:]:
                conn.send(port)
            limit = START_TIMEOUT if self.time_limit is None else self.time_limit
            for conn in self._conns:
                conn.send(max(limit, 1.0))
            for rank in range(self.world_size):
                self._expect(rank, "ready", deadline)
        except GroupError as error:
            self.start_error = str(error)
            self.stop()
            raise

    def _expect(self, rank: int, what: str, deadline: float) -> Any:
        conn = self._conns[rank]
        try:
            if not conn.poll(max(deadline - time.monotonic(), 0.0)):
                raise GroupError(
                    f"rank {rank} did not rendezvous within {START_TIMEOUT:g} s"
                )
            kind, value = conn.recv()
        except (EOFError, OSError) as error:
            code = self._processes[rank].exitcode
            raise GroupError(
                f"rank {rank} {_describe_exit(code)} during the rendezvous"
            ) from error
        if kind != what:
            raise GroupError(f"the process group did not start: {value}")
        return value

    def call(self, requests: list[tuple[Any, Any, Any, Any]]) -> list[CallReport]:
        """Run one request per rank; a report per rank; never raises for the candidate.

        Args:
            requests: ``(request, shapes, dtype, device)`` for every rank.

        Raises:
            GroupError: If the group cannot be (re)started.
        """
        try:
            payloads = [
                pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in requests
            ]
        except Exception as error:  # noqa: BLE001 - an unpicklable model
            message = f"the request could not be sent to the ranks: {error!r}"
            return [CallReport(error=message) for _ in requests]
        if not self.running:
            self.start()
        start = time.monotonic()
        deadline = None if self.time_limit is None else start + self.time_limit
        reports: dict[int, CallReport] = {}
        for rank, (conn, payload) in enumerate(zip(self._conns, payloads, strict=True)):
            try:
                conn.send_bytes(payload)
            except OSError:
                reports[rank] = CallReport(error=self._died(rank))
        pending = {
            self._conns[r]: r for r in range(self.world_size) if r not in reports
        }
        while pending:
            if any(rep.error or rep.plain is None for rep in reports.values()):
                grace = time.monotonic() + GRACE
                deadline = grace if deadline is None else min(deadline, grace)
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            ready = wait(list(pending), timeout)
            if not ready:
                break
            for ready_conn in ready:
                conn = cast(Connection, ready_conn)
                rank = pending.pop(conn)
                try:
                    reports[rank] = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    reports[rank] = CallReport(error=self._died(rank))
        if pending:
            failed = sorted(r for r, rep in reports.items() if rep.error)
            for rank in pending.values():
                if failed:
                    why = (
                        f"killed: still running {GRACE:g} s after rank(s) "
                        f"{', '.join(map(str, failed))} failed (waiting in a "
                        "collective?)"
                    )
                else:
                    why = (
                        f"timeout: the group ran past the time limit of "
                        f"{self.time_limit:g} s (every rank was killed)"
                    )
                reports[rank] = CallReport(error=why)
        if pending or any(rep.error for rep in reports.values()):
            self.stop()  # a failed call may leave collectives unmatched: start afresh
        return [reports[r] for r in range(self.world_size)]

    def _died(self, rank: int) -> str:
        process = self._processes[rank]
        process.join(timeout=5)
        return f"the rank's process {_describe_exit(process.exitcode)} during compute()"

    def stop(self) -> None:
        """Kill every rank and everything it started; close the pipes."""
        processes, conns = self._processes, self._conns
        self._processes, self._conns = [], []
        for conn in conns:
            conn.close()
        for process in processes:
            _kill_group(process.pid)
        for process in processes:
            process.join(timeout=5)


@atexit.register
def _stop_all() -> None:
    for group in list(_LIVE):
        group.stop()


__all__ = ["GRACE", "START_TIMEOUT", "GroupError", "RankGroup"]
