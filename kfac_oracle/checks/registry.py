"""The check registry: families, checks, and their collection for a list of cases.

A *family* is one module of :mod:`kfac_oracle.checks` (``exactness.py`` is the family
``exactness``); its module docstring describes it, and it calls :func:`family` once to
give its rank in reports. A *check* is a plain top-level function of that module,
registered with :func:`check`::

    @check(targets=per_layer_claims)
    def exact(ctx: CheckContext, *, fisher_type: str, kfac_approx: str) -> Outcome:
        \"\"\"The theorem the check tests (shown by ``kfac-oracle checks``).\"\"\"

``targets(case)`` yields the :class:`Target` s the check applies to in a case: each
gives the check's name as it appears in ids (e.g. ``agree_type-2_expand``), the layer
(``None`` for a case-wide check), the flavour it needs (``fisher_type`` and
``kfac_approx``, compared with the candidate's capabilities before the check runs) and
keyword parameters; the function is called as ``function(ctx, **target.arguments())``
(the flavour fields first, then the parameters), and so is ``diagnose(ctx, outcome,
**target.arguments())``. ``needs`` declares further capabilities a check
requires (``{"bias": {"joint", "separate"}}``). A check id is ``name[case-layer]`` (or
``name[case]``).

Family modules are discovered from the package folder: adding a check is one function
in its family's module, adding a family is one new module.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kfac_oracle.catalogue import Case
    from kfac_oracle.checks.outcome import Outcome

# Modules of kfac_oracle.checks that are infrastructure, not families.
_INFRASTRUCTURE = {
    "registry",
    "vanishing",
    "context",
    "outcome",
    "compare",
    "variants",
    "diagnose",
    "matrixfree",
}


@dataclass(frozen=True)
class Family:
    """A family of checks: one module of :mod:`kfac_oracle.checks`.

    Attributes:
        name: The family's name (its module's name).
        rank: Position in reports and matrix columns (ascending).
        summary: One line on what the family checks.
    """

    name: str
    rank: int
    summary: str


@dataclass(frozen=True)
class Target:
    """One application of a check to a case.

    Attributes:
        name: The check's name in ids, e.g. ``"agree_type-2_expand"``.
        layer: Module name, or ``None`` for a check of the whole case.
        fisher_type: The fisher type the check requests (``None``: none in
            particular); the candidate must declare it.
        kfac_approx: The approximation it requests, likewise.
        params: Keyword arguments of the check function.
    """

    name: str
    layer: str | None = None
    fisher_type: str | None = None
    kfac_approx: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of the check function: the flavour, then ``params``."""
        flavour = {
            k: v
            for k, v in (
                ("fisher_type", self.fisher_type),
                ("kfac_approx", self.kfac_approx),
            )
            if v is not None
        }
        return {**flavour, **self.params}


CheckFunction = Callable[..., "Outcome"]
Diagnose = Callable[..., "str | None"]


@dataclass(frozen=True)
class CheckSpec:
    """A registered check.

    Attributes:
        function: ``function(ctx, **target.params) -> Outcome``.
        family: The family's name.
        targets: ``targets(case) -> iterable of Target``.
        needs: Capabilities the check needs beyond its target's flavour,
            ``{key: values}``: the key must be declared (not left unrestricted)
            and hold every value, since the check is meaningful only for
            candidates that say they honour these request fields.
        diagnose: ``diagnose(ctx, outcome, **target.params) -> str | None``, called
            when the check fails, to name the cause.
        matrix_free: Whether the check works on blocks too large to densify
            (:mod:`kfac_oracle.operators`); other checks are unsupported there.
        float32: Whether the check has a verdict for a candidate that computes in
            float32 (:mod:`kfac_oracle.rounding`); other checks are unsupported in
            a float32 run.
    """

    function: CheckFunction
    family: str
    targets: Callable[[Case], Iterable[Target]]
    needs: Mapping[str, frozenset[str]] = field(default_factory=dict)
    diagnose: Diagnose | None = None
    matrix_free: bool = False
    float32: bool = False

    @property
    def name(self) -> str:
        """The function's name."""
        return self.function.__name__

    @property
    def theorem(self) -> str:
        """The function's docstring: the statement the check tests."""
        return inspect.cleandoc(self.function.__doc__ or "").strip()


_FAMILIES: dict[str, Family] = {}
_CHECKS: list[CheckSpec] = []
_DISCOVERED = False


def _module_family(module_name: str) -> str:
    package, _, name = module_name.rpartition(".")
    if package != __package__:
        raise RuntimeError(
            f"checks must be defined in a family module of {__package__}, "
            f"not in {module_name}"
        )
    return name


def family(rank: int, summary: str | None = None) -> Family:
    """Declare the calling module a check family (its name is the module's).

    Args:
        rank: Position of the family in reports and matrix columns.
        summary: One line; defaults to the module docstring's first line.
    """
    frame = sys._getframe(1)
    module_name = frame.f_globals["__name__"]
    doc = frame.f_globals.get("__doc__") or ""
    name = _module_family(module_name)
    fam = Family(name, rank, summary or doc.strip().splitlines()[0])
    _FAMILIES[name] = fam
    return fam


def check(
    targets: Callable[[Case], Iterable[Target]],
    needs: Mapping[str, Iterable[str]] | None = None,
    diagnose: Diagnose | None = None,
    matrix_free: bool = False,
    float32: bool = False,
) -> Callable[[CheckFunction], CheckFunction]:
    """Register a check function of the calling family module.

    Args:
        targets: Which targets the check has in a case.
        needs: Further capabilities the check requires.
        diagnose: Names the cause of a failure.
        matrix_free: The check also compares blocks too large to densify.
        float32: The check has a verdict for float32 candidates (its tolerances
            come from :mod:`kfac_oracle.rounding`).
    """

    def register(function: CheckFunction) -> CheckFunction:
        name = _module_family(function.__module__)
        spec = CheckSpec(
            function=function,
            family=name,
            targets=targets,
            needs={k: frozenset(v) for k, v in (needs or {}).items()},
            diagnose=diagnose,
            matrix_free=matrix_free,
            float32=float32,
        )
        _CHECKS[:] = [c for c in _CHECKS if c.function is not function]
        _CHECKS.append(spec)
        return function

    return register


def discover() -> None:
    """Import every family module of :mod:`kfac_oracle.checks` (once)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name in _INFRASTRUCTURE:
            continue
        importlib.import_module(f"{__package__}.{info.name}")
    _DISCOVERED = True


def families() -> list[Family]:
    """Every family, by rank."""
    discover()
    return sorted(_FAMILIES.values(), key=lambda f: (f.rank, f.name))


def family_names() -> list[str]:
    """Names of every family, by rank."""
    return [f.name for f in families()]


def checks(family_name: str | None = None) -> list[CheckSpec]:
    """Every registered check (of one family), by family rank, then definition."""
    order = {name: k for k, name in enumerate(family_names())}
    specs = [c for c in _CHECKS if family_name in (None, c.family)]
    return sorted(specs, key=lambda c: order[c.family])


@dataclass(frozen=True)
class CheckItem:
    """One runnable check: a registered check on one case and target.

    Attributes:
        spec: The registered check.
        case: The catalogue case.
        target: Name, layer, flavour and parameters.
    """

    spec: CheckSpec
    case: Case
    target: Target

    @property
    def check(self) -> str:
        """The check's name in ids."""
        return self.target.name

    @property
    def family(self) -> str:
        """The family's name."""
        return self.spec.family

    @property
    def layer(self) -> str | None:
        """The layer, or ``None``."""
        return self.target.layer

    @property
    def id(self) -> str:
        """``check[case-layer]`` (or ``check[case]``)."""
        return check_id(self.check, self.case.id, self.layer)


def check_id(check_name: str, case_id: str, layer: str | None) -> str:
    """The id ``check[case-layer]`` (or ``check[case]``)."""
    inner = case_id if layer is None else f"{case_id}-{layer}"
    return f"{check_name}[{inner}]"


def items_of(
    case: Case, family_names_: Iterable[str] | None = None
) -> Iterator[CheckItem]:
    """The check items of one case (optionally of some families only)."""
    wanted = None if family_names_ is None else set(family_names_)
    for spec in checks():
        if wanted is not None and spec.family not in wanted:
            continue
        for target in spec.targets(case):
            yield CheckItem(spec, case, target)


def collect(
    cases: Iterable[Case], families: Iterable[str] | None = None
) -> list[CheckItem]:
    """Every check item for ``cases``, case by case, families in rank order."""
    wanted = None if families is None else list(families)
    return [item for case in cases for item in items_of(case, wanted)]


__all__ = [
    "CheckItem",
    "CheckSpec",
    "Family",
    "Target",
    "check",
    "check_id",
    "checks",
    "collect",
    "discover",
    "families",
    "family",
    "family_names",
]
