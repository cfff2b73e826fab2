"""The case catalogue: declarative cases, their claims, and loading case files.

A case file is a Python file defining ``CASES``, a list of :class:`Case`. The built-in
files live in the project's ``cases/`` folder (shipped inside the installed package as
``kfac_oracle/_cases``). Users add their own with ``KFAC_ORACLE_CASES`` (paths to
files or folders separated by ``os.pathsep``) or the command line's ``--case-file``.

Claims (docs/theory.md §5) are per layer. A :class:`Claim` says whether the reference
KFAC of a
flavour equals the matching exact block (``statement="kfac"``): type-2 ↔ GGN,
empirical ↔ empirical Fisher, mc ↔ MC Fisher for the same samples; whether the per-layer
Hessian block equals the GGN block (``"hessian"``, E8); whether MC-KFAC converges to
type-2 KFAC (``"mc_convergence"``, E6) or equals it for every sample because the
sampled outer products do not vary (``"mc_exact"``). ``holds=False`` is a negative
claim: the two provably differ and the gap must be clear. E7 (EKFAC's diagonal equals
``diag(Qᵀ B Q)`` of the exact block) holds for every layer and is implied.
"""

from __future__ import annotations

import importlib.util
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from kfac_oracle.capabilities import LOSSES, REDUCTIONS
from kfac_oracle.errors import CaseError, UsageError
from kfac_oracle.factory import (
    ModelFactory,
    build_from_factory,
    describe_factory,
    is_factory,
    kfac_layers,
)
from kfac_oracle.flavours import FisherType, KFACApprox
from kfac_oracle.independence import check_modes
from kfac_oracle.models import build_model, describe
from kfac_oracle.problem import Problem

EQUIVALENCES = {
    "E1": "one datum: KFAC equals the block of its flavour, any network and loss",
    "E2": "affine tail + MSE: type-2 KFAC equals the GGN block",
    "E3": "expand setting: KFAC-expand exact, KFAC-reduce not",
    "E4": "reduce setting: KFAC-reduce exact, KFAC-expand not (before the pooling)",
    "E5": "convolutions: per-pixel expand exact; conv-pool-affine reduce exact",
    "E6": "MC-KFAC converges to type-2 KFAC as M grows",
    "E7": "EKFAC's diagonal equals the exact block's diagonal in the Kronecker basis",
    "E8": "deep linear net: per-layer Hessian block equals the GGN block",
    "N": "negative: KFAC differs from the exact block",
}
STATEMENTS = ("kfac", "hessian", "mc_convergence", "mc_exact")
SETTINGS = ("none", "expand", "reduce")
TARGETS = ("default", "soft", "binary")


@dataclass(frozen=True)
class Claim:
    """One provable statement about one layer of a case.

    Attributes:
        equivalence: ``"E1"`` ... ``"E8"``, or ``"N"`` for a plain negative claim.
        statement: ``"kfac"``, ``"hessian"`` or ``"mc_convergence"``.
        fisher_type: The KFAC flavour (``"type-2"``, ``"empirical"``, ``"mc"``).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        holds: ``False`` for a negative claim (a clear gap is asserted).
    """

    equivalence: str
    statement: str = "kfac"
    fisher_type: str = "type-2"
    kfac_approx: str = "expand"
    holds: bool = True

    @property
    def id(self) -> str:
        """A readable id, e.g. ``E3-kfac-type-2-reduce-not``."""
        parts = [self.equivalence, self.statement]
        if self.statement == "kfac":
            parts += [self.fisher_type, self.kfac_approx]
        if self.statement in ("mc_convergence", "mc_exact"):
            parts += [self.kfac_approx]
        if not self.holds:
            parts.append("not")
        return "-".join(parts)

    def as_dict(self) -> dict:
        """JSON-friendly form."""
        return {
            "id": self.id,
            "equivalence": self.equivalence,
            "statement": self.statement,
            "fisher_type": self.fisher_type,
            "kfac_approx": self.kfac_approx,
            "holds": self.holds,
        }


@dataclass
class Case:
    """A declarative catalogue case.

    Attributes:
        id: Stable identifier (used in test ids and records).
        family: Family name, e.g. ``"deep_linear"``.
        model: Layer specs (:mod:`kfac_oracle.models`), or a factory: a callable
            returning any ``nn.Module`` (:mod:`kfac_oracle.factory`); its layers are
            its ``nn.Linear`` and ``nn.Conv2d`` modules by name.
        input_shape: Shape of one datum's input.
        loss: ``"MSELoss"``, ``"CrossEntropyLoss"`` or ``"BCEWithLogitsLoss"``.
        reduction: ``"mean"`` or ``"sum"``.
        batch_sizes: Sizes of the batches; ``N = sum(batch_sizes)``.
        setting: Weight sharing: ``"none"``, ``"expand"`` or ``"reduce"``.
        claims: ``{layer name: [Claim, ...]}``.
        targets: ``"default"``; ``"soft"`` or ``"binary"`` for BCE.
        identical_data: Repeat one datum ``N`` times (E1 with ``N > 1``).
        seed: Seed of the model and the data.
        description: One line on what the case exercises.
        vocab: With a vocabulary size, inputs are integer token ids in
            ``[0, vocab)`` of shape ``input_shape`` (for embeddings).
        opt_in: Left out of the default catalogue; selected only by a ``--cases``
            pattern with a literal part matching its id or family (the ``large``
            family).
    """

    id: str
    family: str
    model: list | ModelFactory
    input_shape: tuple[int, ...]
    loss: str
    reduction: str = "mean"
    batch_sizes: tuple[int, ...] = (4, 2)
    setting: str = "none"
    claims: dict[str, list[Claim]] = field(default_factory=dict)
    targets: str = "default"
    identical_data: bool = False
    seed: int = 0
    description: str = ""
    vocab: int | None = None
    opt_in: bool = False

    def __str__(self) -> str:
        return self.id

    @property
    def num_data(self) -> int:
        """N."""
        return sum(self.batch_sizes)

    def build_model(self, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
        """The case's model with seeded parameters."""
        if not isinstance(self.model, list | tuple):
            return build_from_factory(self.model, seed=self.seed, dtype=dtype)
        return build_model(self.model, seed=self.seed, dtype=dtype)

    def build(
        self,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> Problem:
        """The :class:`Problem`: model, loss module and seeded batches."""
        model = self.build_model(dtype).to(device)
        check_modes(model)  # before running it on one datum
        loss_func = getattr(torch.nn, self.loss)(reduction=self.reduction)
        # Data are drawn in float32 on the CPU from the case's seed, then converted:
        # independent of torch's default dtype and device.
        generator = torch.Generator().manual_seed(self.seed + 1)
        N = self.num_data
        f32 = torch.float32
        first = 1 if self.identical_data else N
        if self.vocab is not None:
            X = torch.randint(
                0, self.vocab, (first, *self.input_shape), generator=generator
            )
        else:
            X = torch.randn((first, *self.input_shape), generator=generator, dtype=f32)
        X = X.expand(N, *self.input_shape).clone()
        X = X.to(dtype=dtype if X.dtype.is_floating_point else X.dtype, device=device)
        with torch.no_grad():
            out_shape = model(X[:1]).shape[1:]
        y = self._targets(out_shape, N, generator)
        if self.identical_data:
            y = y[:1].expand(N, *y.shape[1:]).clone()
        y = y.to(device=device, dtype=dtype if y.dtype.is_floating_point else y.dtype)
        data, start = [], 0
        for size in self.batch_sizes:
            data.append((X[start : start + size], y[start : start + size]))
            start += size
        return Problem(model, loss_func, data)

    def _targets(self, out_shape, N, generator):
        f32 = torch.float32
        if self.loss == "CrossEntropyLoss":
            C = out_shape[0]
            return torch.randint(0, C, (N, *out_shape[1:]), generator=generator)
        if self.loss == "BCEWithLogitsLoss":
            p = torch.rand((N, *out_shape), generator=generator, dtype=f32)
            return p if self.targets == "soft" else (p > 0.5).to(p.dtype)
        return torch.randn((N, *out_shape), generator=generator, dtype=f32)

    @property
    def layers(self) -> list[str]:
        """Names of the case's Linear and Conv2d modules."""
        if not isinstance(self.model, list | tuple):
            return list(self._factory_layers())
        return [
            str(i) for i, s in enumerate(self.model) if s[0] in ("Linear", "Conv2d")
        ]

    @property
    def layer_kinds(self) -> set[str]:
        """The module kinds of :attr:`layers` (``"Linear"``, ``"Conv2d"``)."""
        if not isinstance(self.model, list | tuple):
            return set(self._factory_layers().values())
        return {self.model[int(name)][0] for name in self.layers}

    def _factory_layers(self) -> dict[str, str]:
        """``{name: kind}`` of a factory model's KFAC layers (cached)."""
        cached = self.__dict__.get("_layer_kinds")
        if cached is None:
            model = self.build_model()
            cached = {
                name: "Conv2d"
                if isinstance(model.get_submodule(name), torch.nn.Conv2d)
                else "Linear"
                for name in kfac_layers(model)
            }
            self.__dict__["_layer_kinds"] = cached
        return cached

    @property
    def output_ndim(self) -> int:
        """The model output's number of dimensions, batch included (cached)."""
        cached = self.__dict__.get("_output_ndim")
        if cached is None:
            problem = self.build()
            X, _ = problem.data[0]
            with torch.no_grad():
                cached = problem.model(X[:1]).ndim
            self.__dict__["_output_ndim"] = cached
        return cached

    def num_params(self) -> int:
        """Number of parameters of the model."""
        return sum(p.numel() for p in self.build_model().parameters())

    def claims_for(self, layer: str) -> list[Claim]:
        """The claims of one layer (E7 is implied everywhere and not listed)."""
        return list(self.claims.get(layer, []))

    def as_dict(self) -> dict:
        """JSON-friendly summary (``kfac-oracle cases --json``)."""
        return {
            "id": self.id,
            "family": self.family,
            "model": describe(self.model)
            if isinstance(self.model, list | tuple)
            else describe_factory(self.model),
            "input_shape": list(self.input_shape),
            "loss": self.loss,
            "reduction": self.reduction,
            "batch_sizes": list(self.batch_sizes),
            "num_data": self.num_data,
            "setting": self.setting,
            "num_params": self.num_params(),
            "layers": self.layers,
            "claims": {
                layer: [c.as_dict() for c in self.claims_for(layer)]
                for layer in self.layers
            },
            "description": self.description,
        }


def builtin_case_dir() -> Path:
    """The folder of the built-in case files (installed or source checkout)."""
    here = Path(__file__).resolve().parent
    installed = here / "_cases"
    return installed if installed.is_dir() else here.parent / "cases"


def _case_files(path: Path) -> list[Path]:
    """The case files of a file or folder.

    In a folder, only ``*.py`` files that mention ``CASES`` are loaded (a folder may
    hold other scripts, which must not be executed); names starting with ``_`` are
    skipped.
    """
    if path.is_dir():
        return sorted(
            p
            for p in path.glob("*.py")
            if not p.name.startswith("_") and _CASES_NAME.search(_read(p))
        )
    if path.is_file():
        return [path]
    raise CaseError(f"case file or folder not found: {path}")


_CASES_NAME = re.compile(r"\bCASES\b")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


_LOADED: dict[tuple[str, float], list[Case]] = {}


def load_case_file(path: str | os.PathLike) -> list[Case]:
    """Import a case file, validate its ``CASES`` and return them (cached per file).

    Raises:
        CaseError: Naming the file (and the case) for a file that does not import,
            does not define ``CASES`` as a list of :class:`Case`, or defines an
            invalid case (:func:`validate_case`).
    """
    path = Path(path)
    try:
        key = (str(path.resolve()), path.stat().st_mtime)
    except OSError as error:
        raise CaseError(f"cannot read case file {path}: {error}") from None
    if key in _LOADED:
        return _LOADED[key]
    spec = importlib.util.spec_from_file_location(
        f"kfac_oracle_cases_{path.stem}", path
    )
    if spec is None or spec.loader is None:
        raise CaseError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except CaseError:
        raise
    except BaseException as error:  # noqa: BLE001 - user code may raise anything
        raise CaseError(f"{path}: the case file raised {_describe(error)}") from error
    cases = getattr(module, "CASES", None)
    if not isinstance(cases, list) or not all(isinstance(c, Case) for c in cases):
        raise CaseError(f"{path} must define CASES, a list of kfac_oracle Case objects")
    builtin = path.resolve().parent == builtin_case_dir().resolve()
    for case in cases:
        validate_case(case, str(path), build=not builtin)
    _LOADED[key] = cases
    return cases


def _describe(error: BaseException) -> str:
    lines = traceback.format_exception_only(type(error), error)
    return " ".join(line.strip() for line in lines if line.strip())


def validate_case(case: Case, origin: str = "case", build: bool = True) -> None:
    """Check a case's fields, claims and model; raise :class:`CaseError` if invalid.

    With ``build`` the problem is built and the model run on every batch, so a shape
    that does not fit the model, an unknown layer kind or targets the loss rejects are
    caught when the case is loaded, not in the middle of a run. (The built-in
    catalogue, checked by the project's own tests, skips this step.)
    """
    where = f"{origin}: case {case.id!r}"

    def fail(message: str) -> NoReturn:
        raise CaseError(f"{where}: {message}")

    if not isinstance(case.id, str) or not case.id:
        fail("id must be a non-empty string")
    if case.loss not in LOSSES:
        fail(f"unknown loss {case.loss!r}; supported: {', '.join(LOSSES)}")
    if case.reduction not in REDUCTIONS:
        fail(f"unknown reduction {case.reduction!r}; use 'mean' or 'sum'")
    if case.setting not in SETTINGS:
        fail(f"unknown setting {case.setting!r}; use one of {', '.join(SETTINGS)}")
    if case.targets not in TARGETS:
        fail(f"unknown targets {case.targets!r}; use one of {', '.join(TARGETS)}")
    sizes = case.batch_sizes
    if (
        not isinstance(sizes, tuple | list)
        or not sizes
        or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes
        )
    ):
        fail(f"batch_sizes must be a non-empty tuple of positive ints, got {sizes!r}")
    if not is_factory(case.model) and (
        not isinstance(case.model, list | tuple) or not case.model
    ):
        fail(
            "model must be a non-empty list of layer specs or a factory returning "
            "an nn.Module"
        )
    if case.vocab is not None and (
        not isinstance(case.vocab, int)
        or isinstance(case.vocab, bool)
        or case.vocab < 1
    ):
        fail(f"vocab must be a positive int, got {case.vocab!r}")
    # A factory's layers need its model: built-in factory cases (tested by the
    # project) are not built when loaded; their claims' layers are checked in tests.
    layers: set[str] | None = None
    if build or isinstance(case.model, list | tuple):
        try:
            layers = set(case.layers)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001 - a factory may raise anything
            fail(f"cannot build its model: {_describe(error)}")
        if not layers:
            fail("the model has no Linear or Conv2d layer")
    if not isinstance(case.claims, dict):
        fail("claims must be a dict {layer name: [Claim, ...]}")
    for layer, claims in case.claims.items():
        if layers is not None and layer not in layers:
            fail(f"claims name layer {layer!r}, which is not one of {sorted(layers)}")
        for claim in claims:
            if not isinstance(claim, Claim):
                fail(f"layer {layer!r}: claims must be Claim objects, got {claim!r}")
            _validate_claim(claim, fail)
    if not build:
        return
    try:
        case.build()
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - report any failure to build
        fail(f"cannot build its problem: {_describe(error)}")


def _validate_claim(claim: Claim, fail: Callable[[str], NoReturn]) -> None:
    if claim.equivalence not in EQUIVALENCES:
        known = ", ".join(EQUIVALENCES)
        fail(f"unknown equivalence {claim.equivalence!r}; use one of {known}")
    if claim.statement not in STATEMENTS:
        fail(
            f"unknown statement {claim.statement!r}; use one of {', '.join(STATEMENTS)}"
        )
    try:
        FisherType.parse(claim.fisher_type, "fisher_type")
        KFACApprox.parse(claim.kfac_approx, "kfac_approx")
    except UsageError as error:
        fail(f"claim {claim.id}: {error}")


def load_cases(
    pattern: str | None = None, extra_files: list[str] | None = None
) -> list[Case]:
    """All built-in and user cases, optionally filtered by a ``pattern``.

    Args:
        pattern: Patterns on case ids or families (comma-separated alternatives,
            ``*`` and ``?`` wildcards), e.g. ``"deep_linear*,conv*"``.
            Opt-in cases (``opt_in=True``, the ``large`` family) are left out
            unless a pattern with a literal part (not only wildcards) matches them.
        extra_files: More case files or folders (besides ``KFAC_ORACLE_CASES``).

    Raises:
        CaseError: For an invalid case file or case, or two cases with one id.
    """
    from kfac_oracle.runner.selection import matches, split_patterns

    sources = [builtin_case_dir()]
    env = os.environ.get("KFAC_ORACLE_CASES")
    if env:
        sources += [Path(p) for p in env.split(os.pathsep) if p]
    sources += [Path(p) for p in extra_files or []]
    cases: list[Case] = []
    for source in sources:
        for file in _case_files(source):
            cases.extend(load_case_file(file))
    seen = set()
    for case in cases:
        if case.id in seen:
            raise CaseError(f"duplicate case id {case.id!r}")
        seen.add(case.id)
    pats = split_patterns(pattern)
    if pats:
        cases = [
            c
            for c in cases
            if any(
                (matches(c.id, p) or matches(c.family, p))
                and (not c.opt_in or p.strip("*?"))
                for p in pats
            )
        ]
    else:
        cases = [c for c in cases if not c.opt_in]
    return cases


def get_case(case_id: str) -> Case:
    """The case with id ``case_id``."""
    for case in load_cases(case_id):
        if case.id == case_id:
            return case
    raise CaseError(f"no case with id {case_id!r}")


# Helpers for case files ------------------------------------------------------------


def exact(equivalence: str, fisher_type="type-2", kfac_approx="expand") -> Claim:
    """A positive ``kfac`` claim."""
    return Claim(equivalence, "kfac", fisher_type, kfac_approx, True)


def inexact(
    equivalence: str = "N", fisher_type="type-2", kfac_approx="expand"
) -> Claim:
    """A negative ``kfac`` claim: KFAC provably differs from the exact block."""
    return Claim(equivalence, "kfac", fisher_type, kfac_approx, False)


def one_datum_claims() -> list[Claim]:
    """E1: type-2, empirical and MC KFAC equal their exact blocks."""
    return [exact("E1", ft) for ft in ("type-2", "empirical", "mc")]


def hessian_equals_ggn() -> Claim:
    """E8: the layer's Hessian block equals its GGN block."""
    return Claim("E8", "hessian")


def mc_converges(kfac_approx: str = "expand") -> Claim:
    """E6: MC-KFAC converges to type-2 KFAC."""
    return Claim("E6", "mc_convergence", "mc", kfac_approx)


def mc_exact(kfac_approx: str = "expand") -> Claim:
    """E6 without variance: MC-KFAC equals type-2 KFAC for any M and seed.

    Holds where every sampled gradient outer product equals the type-2 one
    (two-class cross-entropy at equal logits, BCE with one output at logit 0).
    """
    return Claim("E6", "mc_exact", "mc", kfac_approx)
