"""The vocabulary of KFAC flavours: fisher type, approximation of weight sharing, bias.

Each vocabulary is a ``str`` enum, so plain strings keep working everywhere
(``FisherType.MC == "mc"``, and a member formats as its value). :class:`Flavour` is the
value object that names one KFAC computation; it replaces the same seven arguments
passed around separately.

Adding a fisher type means adding a member to :class:`FisherType` with its row in
``_FISHER_INFO`` (what the checks need to know about it) and its backpropagated
vectors in :meth:`kfac_oracle.reference.kfac.KFACSteps.backpropagated_vectors`
(docs/theory.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from kfac_oracle.errors import UsageError

V = TypeVar("V", bound="Vocabulary")


class Vocabulary(str, Enum):
    """A ``str`` enum whose members print, format and compare as their values."""

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls: type[V], value: object, what: str | None = None) -> V:
        """The member for ``value`` (a member or its string).

        Raises:
            UsageError: Naming ``what`` and the allowed values.
        """
        try:
            return cls(value)
        except ValueError:
            what = what or cls.__name__
            raise UsageError(
                f"unknown {what} {value!r}; use one of {', '.join(cls.values())}"
            ) from None

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The allowed string values, in declaration order."""
        return tuple(str(m.value) for m in cls)


@dataclass(frozen=True)
class FisherInfo:
    """What the checks need to know about a fisher type.

    Attributes:
        stochastic: Results depend on sampled labels (and so on the seed).
        backpropagates: Vectors are backpropagated (``False``: ``G = I``).
        exact_curvature: The exact curvature KFAC of this type approximates, as a
            :func:`kfac_oracle.reference.exact.curvature_block` kind; ``None`` when
            there is no deterministic exact counterpart.
        vectors: How its backpropagated vectors are described in diagnoses.
    """

    stochastic: bool
    backpropagates: bool
    exact_curvature: str | None
    vectors: str


class FisherType(Vocabulary):
    """Which vectors are backpropagated to form ``G`` (docs/theory.md §4)."""

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"

    @property
    def info(self) -> FisherInfo:
        """The properties of this fisher type."""
        return _FISHER_INFO[self]

    @property
    def stochastic(self) -> bool:
        """Whether results depend on sampled labels."""
        return self.info.stochastic

    @property
    def exact_curvature(self) -> str | None:
        """The exact curvature kind this type approximates, or ``None``."""
        return self.info.exact_curvature


_FISHER_INFO = {
    FisherType.TYPE2: FisherInfo(False, True, "ggn", "type-2 vectors"),
    FisherType.MC: FisherInfo(True, True, None, "Monte-Carlo vectors (sampled labels)"),
    FisherType.EMPIRICAL: FisherInfo(
        False, True, "empirical", "empirical-Fisher vectors (true labels)"
    ),
    FisherType.FORWARD_ONLY: FisherInfo(False, False, None, "no vectors (G = I)"),
}


class KFACApprox(Vocabulary):
    """How positions that share a weight enter the factors (docs/theory.md §4)."""

    EXPAND = "expand"
    REDUCE = "reduce"

    @property
    def other(self) -> KFACApprox:
        """The other approximation."""
        return KFACApprox.REDUCE if self is KFACApprox.EXPAND else KFACApprox.EXPAND


class BiasMode(Vocabulary):
    """How a bias enters a layer's block (docs/theory.md §3)."""

    JOINT = "joint"
    SEPARATE = "separate"
    NONE = "none"


def deterministic_fisher_types() -> list[FisherType]:
    """Fisher types whose results do not depend on a seed, in declaration order."""
    return [ft for ft in FisherType if not ft.stochastic]


@dataclass(frozen=True, init=False)
class Flavour:
    """One KFAC computation: fisher type, weight-sharing approximation, bias, sampling.

    Strings are accepted and converted to the vocabularies; invalid values raise a
    :class:`~kfac_oracle.errors.UsageError` naming the allowed ones.

    Attributes:
        fisher_type: Which vectors are backpropagated.
        kfac_approx: ``expand`` or ``reduce`` (matters only with weight sharing).
        bias: ``joint``, ``separate`` or ``none`` (layers without bias use ``none``).
        mc_samples: ``M``, labels sampled per datum (``fisher_type="mc"``).
        seed: Seed of the sampled labels.
    """

    fisher_type: FisherType
    kfac_approx: KFACApprox
    bias: BiasMode
    mc_samples: int
    seed: int

    def __init__(
        self,
        fisher_type: FisherType | str = FisherType.TYPE2,
        kfac_approx: KFACApprox | str = KFACApprox.EXPAND,
        bias: BiasMode | str = BiasMode.JOINT,
        mc_samples: int = 1,
        seed: int = 0,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "fisher_type", FisherType.parse(fisher_type, "fisher_type"))
        set_(self, "kfac_approx", KFACApprox.parse(kfac_approx, "kfac_approx"))
        set_(self, "bias", BiasMode.parse(bias, "bias mode"))
        if (
            isinstance(mc_samples, bool)
            or not isinstance(mc_samples, int)
            or mc_samples < 1
        ):
            raise UsageError(
                f"mc_samples must be a positive integer, got {mc_samples!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UsageError(f"seed must be an integer, got {seed!r}")
        set_(self, "mc_samples", mc_samples)
        set_(self, "seed", seed)

    @classmethod
    def of(cls, flavour: Flavour | str | None = None, **fields: object) -> Flavour:
        """A flavour from a :class:`Flavour`, a fisher type string, and/or fields.

        ``Flavour.of("mc", mc_samples=3)`` and ``Flavour.of(flavour, seed=2)`` both
        work; ``None`` fields are ignored.
        """
        fields = {k: v for k, v in fields.items() if v is not None}
        if isinstance(flavour, Flavour):
            return flavour.replace(**fields) if fields else flavour
        if flavour is not None:
            fields.setdefault("fisher_type", flavour)
        return cls(**fields)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> Flavour:
        """A copy with some fields changed."""
        fields = {
            "fisher_type": self.fisher_type,
            "kfac_approx": self.kfac_approx,
            "bias": self.bias,
            "mc_samples": self.mc_samples,
            "seed": self.seed,
        }
        fields.update(changes)
        return Flavour(**fields)  # type: ignore[arg-type]


__all__ = [
    "BiasMode",
    "FisherInfo",
    "FisherType",
    "Flavour",
    "KFACApprox",
    "Vocabulary",
    "deterministic_fisher_types",
]
