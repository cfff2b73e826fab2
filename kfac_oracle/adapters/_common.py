"""What every adapter needs besides its own translation.

Its library (lazy import, version, install hint), its self-test expectations, and the
contract arithmetic it would otherwise redo.

An adapter module declares ``LIBRARY = Library(distribution, module, extra)`` and
``ADAPTERS = {built-in name: class}``; it is registered through the entry-point group
``kfac_oracle.adapters`` (:mod:`kfac_oracle.implementations`). Importing an adapter
module never imports its library; :meth:`Library.load` does, inside ``compute``.
Reduction scale ``R``, loss terms per datum ``T`` and the requested modules come from
:class:`~kfac_oracle.contract.KFACRequest`; layout permutations from
:mod:`kfac_oracle.conventions`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import torch

from kfac_oracle.capabilities import Capabilities
from kfac_oracle.contract import KFACRequest


def distribution_version(distribution: str) -> str | None:
    """The installed version of a PyPI distribution, or ``None``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Library:
    """A third-party library an adapter wraps.

    Attributes:
        distribution: Its PyPI distribution, e.g. ``"backpack-for-pytorch"``.
        module: Its import name, e.g. ``"backpack"``.
        extra: The kfac-oracle extra that installs it (``None``: a dependency).
    """

    distribution: str
    module: str
    extra: str | None = None

    def version(self) -> str | None:
        """The installed version, or ``None``."""
        return distribution_version(self.distribution)

    @property
    def install_hint(self) -> str:
        """How to install it."""
        target = f"'kfac-oracle[{self.extra}]'" if self.extra else self.distribution
        return (
            f"{self.distribution} is not installed (imported as {self.module!r}): "
            f"pip install -c constraints-cpu.txt {target}"
        )

    def load(self, *submodules: str) -> ModuleType:
        """Import the library (and ``submodules``, e.g. ``"task"``).

        Raises:
            ImportError: With :attr:`install_hint` when it is not installed.
        """
        try:
            module = importlib.import_module(self.module)
            for sub in submodules:
                importlib.import_module(f"{self.module}.{sub}")
        except Exception as error:  # noqa: BLE001 - e.g. an incompatible dependency
            raise ImportError(f"{self.install_hint} ({error!r})") from error
        return module


@dataclass(frozen=True)
class Expectation:
    """What an adapter's own tests require of it on the catalogue.

    With ``status="passed"`` the library is right there, so every selected check must
    pass: a wrong reduction scale, factor order, bias layout or batch handling in the
    adapter would fail it. Otherwise it pins a finding (``docs/findings.md``): the
    first selected record must have this status, ``text`` in its diagnosis or message
    and, if given, this relative ``error``.

    Attributes:
        adapter: The adapter's built-in name.
        cases: Case pattern(s).
        checks: Check pattern(s).
        status: ``"passed"``, ``"failed"``, ``"error"`` or ``"unsupported"``.
        text: Expected in the record's diagnosis or message.
        error: The record's expected relative error (to 1e-6).
        finding: The finding's id, e.g. ``"C1"``.
    """

    adapter: str
    cases: str
    checks: str
    status: str = "passed"
    text: str = ""
    error: float | None = None
    finding: str = ""


FINDING_STATUSES = (
    "new",
    "known",
    "fixed upstream, unreleased",
    "documented convention",
    "documented limitation",
)


@dataclass(frozen=True)
class Finding:
    """Where a library differs from the oracle, with its upstream status.

    Attributes:
        id: Its id in docs/findings.md, e.g. ``"B1"``.
        status: One of :data:`FINDING_STATUSES`: *new* (not reported upstream),
            *known* (an upstream issue, PR or source comment acknowledges it),
            *fixed upstream, unreleased*, *documented convention*, *documented
            limitation*.
        summary: One line on what differs.
        evidence: The citation behind the status (issue, PR, commit, docstring).
        adapters: The adapters whose records show it.
        checks: For a documented convention or limitation: the check-id patterns
            where the library's documented behaviour fails a check; those records
            get the status ``documented`` instead of ``failed``.
    """

    id: str
    status: str
    summary: str
    evidence: str
    adapters: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in FINDING_STATUSES:
            raise ValueError(
                f"finding {self.id}: status {self.status!r} is not one of "
                f"{FINDING_STATUSES}"
            )
        if self.checks and not self.status.startswith("documented"):
            raise ValueError(
                f"finding {self.id}: only documented conventions and limitations "
                "mark records as documented"
            )

    @property
    def label(self) -> str:
        """``"B1 (known)"``."""
        return f"{self.id} ({self.status})"


def documented_differences(findings: list[Finding], adapter: str) -> dict[str, str]:
    """``{check pattern: reason}`` of an adapter's documented conventions/limitations.

    Set as the adapter class's ``documented`` attribute: the harness then reports
    those failures as ``documented``, with the reason, not as failures of the library.
    """
    return {
        pattern: f"{f.id}, {f.status}: {f.summary} ({f.evidence})"
        for f in findings
        if adapter in f.adapters
        for pattern in f.checks
    }


def check_request(name: str, capabilities: Any, request: KFACRequest) -> None:
    """Raise ``NotImplementedError`` for a request the capabilities exclude.

    The harness already reports such requests "unsupported" without calling the
    adapter; this protects direct callers of ``compute``.
    """
    caps = Capabilities.from_mapping(capabilities, f"{name}'s capabilities")
    reason = caps.excludes(
        loss=request.loss_name,
        reduction=request.reduction,
        fisher_type=request.fisher_type,
        kfac_approx=request.kfac_approx,
    )
    if reason:
        raise NotImplementedError(f"{name}: {reason}")


def output_probe(request: KFACRequest) -> torch.Tensor:
    """The model's output on the first datum (for its shape; no gradients)."""
    X = request.data[0][0]
    with torch.no_grad():
        return request.model(X[:1])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for a library that samples from it.

    The generator's state is restored afterwards, so the caller's random stream is
    untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


__all__ = [
    "FINDING_STATUSES",
    "Expectation",
    "Finding",
    "documented_differences",
    "Library",
    "check_request",
    "distribution_version",
    "output_probe",
    "seeded",
]
