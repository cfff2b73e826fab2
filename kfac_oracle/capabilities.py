"""What a candidate declares it supports: a validated, typed ``capabilities`` mapping.

A candidate's ``capabilities`` is a mapping ``{key: set of values}``; a missing key
means
"no restriction". Every key the harness reads is here, with its allowed values:

=================  ==========================================================
``fisher_type``    ``type-2``, ``mc``, ``empirical``, ``forward-only``
``kfac_approx``    ``expand``, ``reduce``
``layers``         ``Linear``, ``Conv2d``
``losses``         ``MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss``
``reductions``     ``mean``, ``sum``
``bias``           ``joint``, ``separate`` (which treatments it can be asked for)
``output_ndim``    integers >= 2: the model output's number of dimensions
``approximation``  one of the registered approximations (``kfac``, ``ekfac``)
``operations``     ``inverse``, ``logdet``, ``trace``, ``scores``, ``diagonal``,
                   ``eigenvalues``, ``data_scores``
``damping``        ``product``, ``per_factor``, ``pi``, ``mean_eigenvalue``
``distributed``    ``data-parallel``: ``compute`` works under ``torch.distributed``
                   (``kfac-oracle check --world-size W``)
``dtype``          ``float64``, ``float32``: the precisions ``compute`` works in
=================  ==========================================================

``dtype`` decides the precision of the models and data a candidate is given
(:meth:`Capabilities.compute_dtype`): float64 unless the candidate declares float32
only (or the run asks for float32, ``kfac-oracle check --dtype float32``). A float32
run is judged against float64 references with tolerances from a measured rounding
model (:mod:`kfac_oracle.rounding`).

``operations`` and ``damping`` are the exception to "missing means no restriction": a
candidate offers operations (:class:`~kfac_oracle.contract.LayerOperations`) only if it
declares them, and the damping conventions it honours with them
(:mod:`kfac_oracle.damping`); ``inverse``, ``logdet``, ``scores`` and ``data_scores``
need ``damping``.

An unknown key (``"fisher_types"``), an unknown value (``"type2"``), a plain string
where a set is expected (``"MSELoss"``), or an empty set is a
:class:`~kfac_oracle.errors.CapabilityError` naming the key and the allowed values:
never "supports everything" and never "supports nothing".

:meth:`Capabilities.excludes` is the one function that decides "unsupported, and why";
the checks, the adapters and the benchmarks all use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from kfac_oracle.damping import DampingConvention
from kfac_oracle.errors import CapabilityError
from kfac_oracle.flavours import BiasMode, FisherType, KFACApprox

LOSSES = ("MSELoss", "CrossEntropyLoss", "BCEWithLogitsLoss")
LAYERS = ("Linear", "Conv2d")
REDUCTIONS = ("mean", "sum")
OPERATIONS = (
    "inverse",
    "logdet",
    "trace",
    "scores",
    "diagonal",
    "eigenvalues",
    "data_scores",
)
DAMPING = DampingConvention.values()
# Operations that invert the damped block, so need a damping convention.
DAMPED_OPERATIONS = ("inverse", "logdet", "scores", "data_scores")
DISTRIBUTED = ("data-parallel",)
DTYPES = ("float64", "float32")


def _approximations() -> tuple[str, ...]:
    from kfac_oracle.reference.approximations import approximation_names

    return approximation_names()


def _vocabulary(key: str) -> tuple[Any, ...] | None:
    """Allowed values of a key (``None``: integers >= 2)."""
    return {
        "fisher_type": FisherType.values(),
        "kfac_approx": KFACApprox.values(),
        "layers": LAYERS,
        "losses": LOSSES,
        "reductions": REDUCTIONS,
        "bias": (BiasMode.JOINT.value, BiasMode.SEPARATE.value),
        "output_ndim": None,
        "approximation": _approximations(),
        "operations": OPERATIONS,
        "damping": DAMPING,
        "distributed": DISTRIBUTED,
        "dtype": DTYPES,
    }[key]


@dataclass(frozen=True)
class Capabilities:
    """A candidate's validated capabilities; ``None`` means unrestricted.

    Build it with :meth:`from_mapping` (validates) or :meth:`full`.
    """

    fisher_type: frozenset[str] | None = None
    kfac_approx: frozenset[str] | None = None
    layers: frozenset[str] | None = None
    losses: frozenset[str] | None = None
    reductions: frozenset[str] | None = None
    bias: frozenset[str] | None = None
    output_ndim: frozenset[int] | None = None
    approximation: frozenset[str] | None = None
    operations: frozenset[str] | None = None
    damping: frozenset[str] | None = None
    distributed: frozenset[str] | None = None
    dtype: frozenset[str] | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every capability key."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def full(cls) -> Capabilities:
        """Everything the contract can express for KFAC (what the reference offers)."""
        return cls.from_mapping(
            {
                "fisher_type": FisherType.values(),
                "kfac_approx": KFACApprox.values(),
                "layers": LAYERS,
                "losses": LOSSES,
                "reductions": REDUCTIONS,
                "bias": ("joint", "separate"),
            }
        )

    @classmethod
    def from_mapping(
        cls, capabilities: object, owner: str = "capabilities"
    ) -> Capabilities:
        """Validate a ``{key: set of values}`` mapping.

        Args:
            capabilities: The candidate's ``capabilities`` (a mapping, a
                :class:`Capabilities`, or ``None`` for "no restriction").
            owner: How to name it in messages, e.g. ``"my-kfac's capabilities"``.

        Raises:
            CapabilityError: For anything but a mapping of known keys to non-empty
                sets (lists, tuples) of known values.
        """
        if isinstance(capabilities, Capabilities):
            return capabilities
        if capabilities is None:
            return cls()
        if not isinstance(capabilities, Mapping):
            raise CapabilityError(
                f"{owner} must be a mapping {{key: set of values}}, got "
                f"{type(capabilities).__name__}"
            )
        known = cls.keys()
        values: dict[str, frozenset[Any]] = {}
        for key, value in capabilities.items():
            if key not in known:
                raise CapabilityError(
                    f"{owner} has the unknown key {key!r}; known keys: "
                    f"{', '.join(known)}"
                )
            values[key] = _validate_values(owner, key, value)
        if "approximation" in values and len(values["approximation"]) != 1:
            raise CapabilityError(
                f"{owner}['approximation'] must name one approximation, got "
                f"{sorted(values['approximation'])}"
            )
        damped = sorted(set(values.get("operations", ())) & set(DAMPED_OPERATIONS))
        if damped and "damping" not in values:
            raise CapabilityError(
                f"{owner} declares the operations {damped}, which invert a damped "
                f"block, but no 'damping' convention; declare 'damping' with some of: "
                f"{', '.join(DAMPING)}"
            )
        return cls(**values)

    def allowed(self, key: str) -> frozenset[Any] | None:
        """The declared values of ``key`` (``None``: unrestricted)."""
        return getattr(self, key)

    def offers(self, key: str, values: Iterable[Any]) -> bool:
        """Whether every one of ``values`` is declared (unrestricted: yes)."""
        allowed = self.allowed(key)
        return allowed is None or set(values) <= allowed

    def compute_dtype(self, requested: str | None = None) -> torch.dtype:
        """The dtype of the models and data the candidate is given.

        ``requested`` (``"float64"``/``"float32"``) when given and declared; otherwise
        float64 unless the candidate declares ``float32`` only.

        Raises:
            CapabilityError: If ``requested`` is not a known dtype or not declared.
        """
        if requested is not None:
            if requested not in DTYPES:
                raise CapabilityError(
                    f"unknown dtype {requested!r}; allowed: {', '.join(DTYPES)}"
                )
            if self.dtype is not None and requested not in self.dtype:
                raise CapabilityError(
                    f"a {requested} run was asked for, but the candidate's "
                    f"capabilities['dtype'] declares {sorted(self.dtype)}"
                )
            return getattr(torch, requested)
        if self.dtype is None or "float64" in self.dtype:
            return torch.float64
        return torch.float32

    @property
    def approximation_name(self) -> str:
        """The approximation the candidate computes (``kfac`` unless declared)."""
        return next(iter(self.approximation)) if self.approximation else "kfac"

    def excludes(
        self,
        *,
        loss: str | None = None,
        reduction: str | None = None,
        fisher_type: str | None = None,
        kfac_approx: str | None = None,
        layers: Iterable[str] | None = None,
        output_ndim: int | None = None,
    ) -> str | None:
        """Why these capabilities exclude a request, or ``None`` if they do not."""
        for key, value, what in (
            ("losses", loss, "loss"),
            ("reductions", reduction, "reduction"),
            ("fisher_type", fisher_type, "fisher_type"),
            ("kfac_approx", kfac_approx, "kfac_approx"),
        ):
            allowed = self.allowed(key)
            if value is not None and allowed is not None and value not in allowed:
                return f"{what} {value!r} not in capabilities {sorted(allowed)}"
        if layers is not None and self.layers is not None:
            missing = set(layers) - self.layers
            if missing:
                return f"layers {sorted(missing)} not in capabilities"
        if output_ndim is not None and self.output_ndim is not None:
            if output_ndim not in self.output_ndim:
                return (
                    f"output ndim {output_ndim} not in capabilities "
                    f"{sorted(self.output_ndim)}"
                )
        return None

    def as_dict(self) -> dict[str, list[Any]]:
        """The declared keys as sorted lists (JSON-friendly)."""
        return {
            key: sorted(value)
            for key in self.keys()
            if (value := self.allowed(key)) is not None
        }


def _validate_values(owner: str, key: str, value: object) -> frozenset[Any]:
    where = f"{owner}[{key!r}]"
    vocabulary = _vocabulary(key)
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        example = f"{{{value!r}}}" if isinstance(value, str | int) else "{...}"
        raise CapabilityError(
            f"{where} must be a set of values, got {type(value).__name__} "
            f"{value!r} (write {example})"
        )
    items = list(value)
    if not items:
        raise CapabilityError(
            f"{where} is empty: the candidate would support nothing; leave the key out "
            "to declare no restriction"
        )
    for item in items:
        if vocabulary is None:
            ok = isinstance(item, int) and not isinstance(item, bool) and item >= 2
            allowed = "integers >= 2"
        else:
            ok = isinstance(item, str) and item in vocabulary
            allowed = ", ".join(map(str, vocabulary))
        if not ok:
            raise CapabilityError(
                f"{where} has the unknown value {item!r}; allowed: {allowed}"
            )
    return frozenset(str(i) if vocabulary is not None else i for i in items)


__all__ = [
    "DAMPED_OPERATIONS",
    "DAMPING",
    "DTYPES",
    "LAYERS",
    "LOSSES",
    "OPERATIONS",
    "REDUCTIONS",
    "Capabilities",
]
