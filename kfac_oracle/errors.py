"""Every exception kfac_oracle raises, in one place.

Two kinds matter to a caller:

- :class:`UsageError` and its subclasses: the *user's* input is wrong (a bad case file,
  an unknown capability, a selection that matches nothing, an invalid problem). The
  command line exits with status 2 and prints the message.
- :class:`CandidateError` and :class:`Unsupported`: facts about the implementation under
  test, recorded as ``error`` or ``unsupported`` check records; they never end a run.

:class:`CheckTimeout` derives from :class:`BaseException`, so that a candidate's own
``except Exception`` cannot swallow the time limit.
"""

from __future__ import annotations


class OracleError(Exception):
    """Base class of kfac_oracle's ordinary exceptions."""


class UsageError(OracleError, ValueError):
    """The user's input is invalid; the message names what is wrong (exit status 2)."""


class ProblemError(UsageError):
    """Input that does not describe a valid curvature problem (model, loss, data)."""


class UnsupportedLayerError(ProblemError):
    """A layer for which the reference defines no KFAC (e.g. a grouped Conv2d)."""


class CaseError(UsageError):
    """A case file or case definition is invalid; names the file and the case."""


class SelectionError(UsageError):
    """A selection (cases, checks, families, expected failures) matches nothing."""


class ImplementationError(UsageError):
    """The implementation could not be resolved, instantiated or understood."""


class CapabilityError(ImplementationError):
    """A candidate's ``capabilities`` has an unknown key or value, or a wrong type."""


class CandidateError(OracleError):
    """The candidate raised, crashed, timed out, or returned something ill-formed."""


class CandidateUnsupported(CandidateError):
    """The candidate raised ``NotImplementedError``: it does not support the request.

    By convention a candidate signals a request its ``capabilities`` cannot express
    (e.g. BCE with several outputs) with ``NotImplementedError``; the check is then
    reported ``unsupported`` with the candidate's message, never passed.
    """


class Unsupported(OracleError):
    """The check needs what the candidate does not declare, or is undefined here."""


class CheckTimeout(BaseException):  # noqa: N818 - "timeout" reads better than "Error"
    """A candidate call ran past the per-call time limit.

    A ``BaseException``: a candidate's ``except Exception`` cannot swallow it.
    """


__all__ = [
    "CandidateError",
    "CandidateUnsupported",
    "CapabilityError",
    "CaseError",
    "CheckTimeout",
    "ImplementationError",
    "OracleError",
    "ProblemError",
    "SelectionError",
    "Unsupported",
    "UnsupportedLayerError",
    "UsageError",
]
