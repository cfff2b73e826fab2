"""The typed result of one check function."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Outcome:
    """What a check found.

    Attributes:
        status: ``"passed"`` or ``"failed"`` (unsupported and error are raised:
            :class:`~kfac_oracle.errors.Unsupported`,
            :class:`~kfac_oracle.errors.CandidateError`).
        error: The measured error (relative, unless the message says otherwise).
        tolerance: What the error was compared with.
        message: One line on what was compared and how far apart it was.
        blocks: ``(candidate, reference)`` blocks of a failed comparison, for plots.
        diagnosis: A cause the check already knows (otherwise the family's diagnose
            function is asked).
    """

    status: str
    error: float | None = None
    tolerance: float | None = None
    message: str = ""
    blocks: tuple[Tensor, Tensor] | None = None
    diagnosis: str | None = None

    @property
    def passed(self) -> bool:
        """Whether the check passed."""
        return self.status == "passed"


def verdict(error: float, tolerance: float, message: str) -> Outcome:
    """``passed`` when ``error <= tolerance``, else ``failed``."""
    status = "passed" if error <= tolerance else "failed"
    return Outcome(status, error, tolerance, message)
