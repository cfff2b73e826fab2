"""Check records: one per check × case (× layer), the rows of every report."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from kfac_oracle.checks.registry import check_id

STATUSES = ("passed", "failed", "unsupported", "xfailed", "documented", "error")
BAD = ("failed", "error")


@dataclass
class CheckRecord:
    """The outcome of one check item (one row of ``--json``).

    ``blocks`` (candidate and reference of a failed comparison, for ``--plots``) is
    not part of the JSON record.
    """

    check: str
    case: str
    layer: str | None
    family: str
    status: str
    error: float | None = None
    tolerance: float | None = None
    diagnosis: str | None = None
    message: str = ""
    implementation: str = ""
    seconds: float = 0.0
    reproduce: str = ""
    blocks: tuple[Tensor, Tensor] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def id(self) -> str:
        """``check[case-layer]`` (or ``check[case]``)."""
        return check_id(self.check, self.case, self.layer)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form, with the id first (``blocks`` left out)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.pop("blocks")
        return {"id": self.id, **data}
