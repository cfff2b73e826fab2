"""Shards of a run, and ``kfac-oracle check --workers N``.

A *shard* is a deterministic part of the selected cases: sorted by id, the k-th case
(from 0) belongs to shard ``k mod n + 1`` of ``n`` (:func:`shard_cases`); every case
is in exactly one shard, the shards' sizes differ by at most one, and a shard's cases
run in the order of the full selection. All checks of a case stay in its shard, so a
shard's records are those of the full run (the ``side_effects`` check counts the
calls of its own case only). ``kfac-oracle check --shard i/n --json part-i.json`` on
n machines, then ``kfac-oracle matrix --from part-*.json``, spreads a run over
several machines.

``--workers N`` runs the same shards at once on one machine: N processes of
``kfac-oracle check`` with the options of the parent, each given its cases by id
(:class:`WorkerPool`). The parent merges their records in the order of the serial
run, so the JSON, the report and the exit status are those of a serial run (timings
aside). Worker processes share the reference disk cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kfac_oracle.errors import UsageError

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*\Z")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` (1 <= i <= n) as ``(i, n)``.

    Raises:
        UsageError: For anything else.
    """
    match = _SHARD.match(spec)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(
            f"--shard must be i/n with 1 <= i <= n (e.g. 1/4), got {spec!r}"
        )
    return int(match[1]), int(match[2])


def shard_cases(cases: Sequence[Any], index: int, count: int) -> list[Any]:
    """Shard ``index`` of ``count`` of ``cases`` (see module doc), in their order.

    Raises:
        UsageError: If the shard is empty (more shards than cases).
    """
    rank = {case.id: k for k, case in enumerate(sorted(cases, key=lambda c: c.id))}
    chosen = [case for case in cases if rank[case.id] % count == index - 1]
    if not chosen:
        raise UsageError(
            f"--shard {index}/{count}: the selection has only {len(cases)} cases, "
            "so this shard is empty; use fewer shards"
        )
    return chosen


def child_arguments(
    args: argparse.Namespace, parser: argparse.ArgumentParser, skip: set[str]
) -> list[str]:
    """Arguments that reproduce ``args`` (of ``parser``), less the dests in ``skip``."""
    out: list[str] = []
    positionals: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public listing
        dest = action.dest
        if dest in skip or dest == "help" or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if not action.option_strings:
            positionals.append(str(value))
            continue
        flag = action.option_strings[-1]
        if value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(action.option_strings[0 if value else 1])
        elif isinstance(action, argparse._StoreConstAction):  # noqa: SLF001
            out += [flag] if value == action.const else []  # store_true/false too
        elif isinstance(action, argparse._CountAction):  # noqa: SLF001
            out += [flag] * int(value or 0)
        elif isinstance(action, argparse._AppendAction):  # noqa: SLF001
            for item in value or []:
                out += [flag, *_strings(item)]
        elif value is not None:
            out += [flag, *_strings(value)]
    return positionals + out


def _strings(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


@dataclass
class _Caller:
    notes: list[str] = field(default_factory=list)
    warnings: dict[str, int] = field(default_factory=dict)


@dataclass
class _Worker:
    process: subprocess.Popen
    cases: list[str]
    json: Path
    stdout: Path
    stderr: Path


class WorkerPool:
    """Runs a ``kfac-oracle check`` in N processes; looks like a run's session.

    Args:
        resolved: The implementation (resolved in the parent, for its name).
        argv: The parent's arguments for the children (without cases, shard,
            outputs).
        cases: The selected cases.
        order: Check ids in the order of the serial run.
        workers: Number of processes (at most one per case).
        quiet: No progress lines.
    """

    def __init__(
        self,
        resolved: Any,
        argv: list[str],
        cases: Sequence[Any],
        order: Sequence[str],
        workers: int,
        quiet: bool = False,
    ):
        self.resolved = resolved
        self.caller = _Caller()
        self.argv = argv
        self.cases = list(cases)
        self.position = {check_id: k for k, check_id in enumerate(order)}
        self.count = max(1, min(workers, len(self.cases)))
        self.quiet = quiet
        self._tmp = tempfile.TemporaryDirectory(prefix="kfac-oracle-workers-")
        self._workers: list[_Worker] = []

    @property
    def name(self) -> str:
        """The implementation's display name."""
        return str(self.resolved.name)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [p for p in sys.path if p] + [env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env

    def _start(self) -> None:
        tmp = Path(self._tmp.name)
        env = self._environment()
        for k in range(1, self.count + 1):
            ids = [case.id for case in shard_cases(self.cases, k, self.count)]
            out = tmp / f"worker-{k}.json"
            cmd = [sys.executable, "-m", "kfac_oracle.cli", "check", *self.argv]
            cmd += ["--cases", ",".join(ids), "--json", str(out), "-q"]
            stdout, stderr = tmp / f"worker-{k}.out", tmp / f"worker-{k}.err"
            with open(stdout, "wb") as fo, open(stderr, "wb") as fe:
                process = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
            self._workers.append(_Worker(process, ids, out, stdout, stderr))

    def _done(self) -> int:
        done = 0
        for worker in self._workers:
            for path in (worker.json, Path(f"{worker.json}.partial")):
                try:
                    if path.suffix == ".json":
                        done += len(json.loads(path.read_text()))
                    else:
                        done += sum(1 for _ in path.open())
                    break
                except (OSError, ValueError):
                    continue
        return done

    def run(
        self, *args: Any, progress: Callable[[int, int, Any], None], **kwargs: Any
    ) -> None:
        """Run the workers; then ``progress(done, total, record)`` in serial order.

        Takes the arguments of :func:`kfac_oracle.runner.run.run`; all but
        ``progress`` are those the pool was made with, and are ignored.

        Raises:
            UsageError: A worker reported a usage error.
            RuntimeError: A worker failed otherwise (its standard error is shown).
            KeyboardInterrupt: When interrupted (the records done so far are
                collected first).
        """
        self._start()
        total = len(self.position)
        last = time.monotonic()
        try:
            while any(w.process.poll() is None for w in self._workers):
                time.sleep(0.2)
                if not self.quiet and time.monotonic() - last >= 10:
                    last = time.monotonic()
                    sys.stderr.write(
                        f"{self.name} {self._done()}/{total} checks, "
                        f"{self.count} workers\n"
                    )
                    sys.stderr.flush()
        except KeyboardInterrupt:
            self._stop()
            self._collect(progress, partial=True)
            raise
        for worker in self._workers:
            code = worker.process.returncode
            if code not in (0, 1):
                err = worker.stderr.read_text(errors="replace")[-2000:]
                if code == 2:
                    raise UsageError(f"a worker process reported: {err.strip()}")
                raise RuntimeError(
                    f"worker process for cases {worker.cases} exited {code}:\n{err}"
                )
        self._collect(progress, partial=False)

    def _collect(self, collect: Callable[[int, int, Any], None], partial: bool) -> None:
        from kfac_oracle.runner.records import CheckRecord

        names = {f.name for f in fields(CheckRecord)} - {"blocks"}
        rows: list[dict[str, Any]] = []
        for worker in self._workers:
            self._read_output(worker)
            if worker.json.exists():
                rows += json.loads(worker.json.read_text())
            elif partial and Path(f"{worker.json}.partial").exists():
                for line in Path(f"{worker.json}.partial").read_text().splitlines():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        break  # a line cut by the interruption
        rows.sort(key=lambda r: self.position.get(r["id"], len(self.position)))
        total = len(rows) if partial else len(self.position)
        for k, row in enumerate(rows):
            record = CheckRecord(**{key: row[key] for key in names if key in row})
            collect(k + 1, total, record)

    def _read_output(self, worker: _Worker) -> None:
        """Notes and candidate warnings from a worker's standard output."""
        try:
            lines = worker.stdout.read_text(errors="replace").splitlines()
        except OSError:
            return
        in_warnings = False
        for line in lines:
            if line.startswith("note: "):
                note = line[len("note: ") :]
                if note not in self.caller.notes:
                    self.caller.notes.append(note)
            elif line.startswith("warnings raised by the candidate"):
                in_warnings = True
            elif in_warnings and (m := re.match(r"  (\d+) call\(s\): (.*)", line)):
                text = m[2]
                self.caller.warnings[text] = self.caller.warnings.get(text, 0) + int(
                    m[1]
                )
            else:
                in_warnings = False

    def close(self) -> None:
        """Stop workers still running; remove their files."""
        self._stop()
        self._tmp.cleanup()

    def _stop(self) -> None:
        for worker in self._workers:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in self._workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


__all__ = [
    "WorkerPool",
    "child_arguments",
    "parse_shard",
    "shard_cases",
]
