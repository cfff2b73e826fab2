"""Constant factors a KFAC implementation gets wrong, and how a measured one is named.

A scale pitfall multiplies the block by a constant ``c`` (docs/theory.md §7, pitfalls
1, 2, 6, 7, 9). The named scales are *atoms*: one known mistake each, with its value on
the problem at hand (``N``, ``T``, ``N·T``, ``2`` for MSE, ``M`` for MC, ``S`` and
``S²`` with weight sharing, ``N/B_b``, and ``K``/``K²`` for per-batch factors summed
over ``K`` equal batches). Real libraries combine mistakes, so an *explanation* is

    c = s^{±1}, or s^{±2} for N, T, M    one atom (squared: applied twice)
    c = s₁^{±1} · s₂^{±1}                two atoms sharing no symbol, both too large
                                         or both too small, except with the MSE 2

(docs/theory.md, "Combined pitfalls"); a pitfall that only rescales the reference on
the problem at hand joins the atoms with its factor (:mod:`.core`).

Explanations are compared by their exponents over the *primitive* symbols (``N·T`` is
``N¹T¹``), so ``N·T`` and ``N × T`` are one explanation, named by the fewest atoms.
Two explanations with different exponents but the same value on the problem (say
``N = K²`` with batches ``(2, 2)``, or ``S = T``) cannot be told apart by the constant
alone: the diagnosis then lists every one of them as *ambiguous on this case* rather
than naming one.

Atoms are filtered by the request: ``2`` only for ``MSELoss`` with type-2 or MC
vectors (the Hessian ``2·I``; MC variance ``½``), ``M`` only for MC with ``M > 1``,
``S`` only with shared positions, and scales equal to 1 are dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from kfac_oracle.problem import Problem

# Relative distance at which a fitted constant "is" a named scale; the constant comes
# from a fit at the failed check's tolerance (1e-10 for float64 comparisons).
NAME_RTOL = 1e-8
# More coinciding readings than this say nothing: the constant is then reported as
# inconclusive (small problems have many equal scales: T = K = 2, S = 4, ...).
MAX_READINGS = 6


@dataclass(frozen=True)
class Atom:
    """One named scale: a single known mistake and its value on the problem.

    Attributes:
        symbol: Short name, e.g. ``"N"`` or ``"N·T"``.
        meaning: What the mistake is.
        value: Its value on the problem.
        primitives: Exponents over primitive symbols (``N·T`` → ``{N: 1, T: 1}``).
    """

    symbol: str
    meaning: str
    value: float
    primitives: tuple[tuple[str, int], ...]
    squarable: bool = False
    combinable: bool = True

    @property
    def name(self) -> str:
        """``"symbol (meaning)"``, the form diagnoses print."""
        return f"{self.symbol} ({self.meaning})"


def _atom(
    symbol: str,
    meaning: str,
    value: float,
    squarable: bool = False,
    combinable: bool = True,
    primitives: dict[str, int] | None = None,
) -> Atom:
    prims = primitives or {symbol: 1}
    return Atom(
        symbol,
        meaning,
        float(value),
        tuple(sorted(prims.items())),
        squarable,
        combinable,
    )


@dataclass(frozen=True)
class ScaleExplanation:
    """``c = Π atom^exponent`` over one or two atoms.

    Attributes:
        factors: ``((atom, exponent), ...)``.
        value: The product on the problem.
        key: Exponents over the primitive symbols (equal keys: one explanation).
    """

    factors: tuple[tuple[Atom, int], ...]
    value: float
    key: tuple[tuple[str, int], ...] = field(compare=False)

    @property
    def effects(self) -> int:
        """How many mistakes the explanation combines."""
        return len(self.factors)

    def describe(self) -> str:
        """``too large by X``, ``too small by X``, or both for mixed exponents."""
        up = [_power(a, e) for a, e in self.factors if e > 0]
        down = [_power(a, -e) for a, e in self.factors if e < 0]
        parts = []
        if up:
            parts.append("too large by " + " × ".join(up))
        if down:
            parts.append("too small by " + " × ".join(down))
        return " and ".join(parts)

    @property
    def formula(self) -> str:
        """E.g. ``K²`` or ``N·T/2``."""
        if self.factors and len(self.factors) == 1 and self.factors[0][1] == 1:
            return self.factors[0][0].symbol
        up = "·".join(_symbol_power(a, e) for a, e in self.factors if e > 0)
        down = "·".join(_symbol_power(a, -e) for a, e in self.factors if e < 0)
        if not down:
            return up
        return f"{up or '1'}/{down if '·' not in down else f'({down})'}"


def _power(atom: Atom, e: int) -> str:
    if e == 1:
        return atom.name
    return f"{atom.symbol}² ({atom.meaning}, applied twice)"


def _symbol_power(atom: Atom, e: int) -> str:
    s = atom.symbol if len(atom.symbol) == 1 else f"({atom.symbol})"
    if e == 1:
        return s if "/" in atom.symbol else atom.symbol
    return f"{s}²"


def scale_atoms(
    problem: Problem,
    positions: int,
    mc_samples: int,
    fisher_type: str | None = None,
    per_batch_sums: bool | None = None,
) -> list[Atom]:
    """The named scales of a request (docs/theory.md §7), values ≠ 1 only.

    Args:
        problem: The problem the candidate was given.
        positions: ``S``, the positions sharing the layer's weight.
        mc_samples: ``M`` (MC requests).
        fisher_type: The requested flavour; ``None`` keeps every loss-specific scale.
        per_batch_sums: Name ``K`` and ``K²`` (per-batch factors summed instead of
            averaged). ``None``: only where that is a constant factor, i.e. when every
            batch has the same size.
    """
    N = problem.num_data
    T = problem.loss_terms_per_datum
    sizes = [len(X) for X, _ in problem.data]
    K = len(sizes)
    mse = problem.loss_name == "MSELoss"
    mean = problem.reduction == "mean"
    atoms = [
        _atom("N", "reduction over the data", N, squarable=True),
        _atom(
            "T", "loss terms per datum: mean over N instead of N·T", T, squarable=True
        ),
    ]
    if T > 1:  # with T = 1, N·T is N and 2·T is 2
        atoms.append(
            _atom(
                "N·T", "the mean reduction ignored", N * T, primitives={"N": 1, "T": 1}
            )
        )
    if mse and fisher_type in (None, "type-2", "mc"):
        why = "MSELoss Hessian 2·I"
        if fisher_type != "type-2":
            why += ", or MC variance ½"
        atoms.append(_atom("2", why, 2.0))
        if mean and T > 1:
            atoms.append(
                _atom(
                    "2·T",
                    "MSE factor 2 and mean over output entries",
                    2 * T,
                    primitives={"2": 1, "T": 1},
                )
            )
    if fisher_type in (None, "mc") and mc_samples > 1:
        atoms.append(
            _atom(
                "M",
                "MC samples: 1/M missing or applied twice",
                mc_samples,
                squarable=True,
            )
        )
    if positions > 1:
        atoms.append(
            _atom("S", "shared positions: expand/reduce normalisation", positions)
        )
        atoms.append(_atom("S²", "shared positions", positions**2, primitives={"S": 2}))
    if K > 1:
        for size in dict.fromkeys(sizes):  # one atom per distinct batch size
            which = [b for b, s in enumerate(sizes) if s == size]
            batches = f"batch {which[0]}" if len(which) == 1 else "a batch"
            atoms.append(
                _atom(
                    f"N/B_{which[0]}",
                    f"{batches} of size {size} treated as the data set",
                    N / size,
                    combinable=False,
                )
            )
        if per_batch_sums is None:
            per_batch_sums = len(set(sizes)) == 1
        if per_batch_sums:
            atoms.append(_atom("K", f"one factor summed over the {K} batches", K))
            atoms.append(
                _atom(
                    "K²",
                    f"both factors summed over the {K} batches, not averaged",
                    K * K,
                    primitives={"K": 2},
                )
            )
    return [a for a in atoms if a.value != 1.0]


def scale_explanations(atoms: list[Atom]) -> list[ScaleExplanation]:
    """Explanations over one or two atoms, one per primitive key (fewest atoms).

    One atom to the power ±1, or ±2 where squaring is a known mistake (``N``, ``T``,
    ``M``: a normalisation applied twice or in both factors); two atoms that share no
    primitive, both too large or both too small (only the MSE factor ``2`` combines
    in the opposite direction: ``½‖f − y‖²`` with another scale wrong). Per-batch
    scales ``N/B_b`` are not combined. Wider searches find coincidences, not causes:
    on small problems most ratios of two scales equal some third one.
    """
    found: dict[tuple[tuple[str, int], ...], ScaleExplanation] = {}

    def add(factors: tuple[tuple[Atom, int], ...]) -> None:
        x = _explanation(factors)
        if x.key and x.key not in found:
            found[x.key] = x

    for e in (1, -1, 2, -2):
        for a in atoms:
            if abs(e) == 1 or a.squarable:
                add(((a, e),))
    for a, b in itertools.combinations([a for a in atoms if a.combinable], 2):
        if {s for s, _ in a.primitives} & {s for s, _ in b.primitives}:
            continue  # N·T with T: not two independent mistakes
        for ea, eb in itertools.product((1, -1), repeat=2):
            if ea != eb and "2" not in (a.symbol, b.symbol):
                continue
            add(((a, ea), (b, eb)))
    return list(found.values())


def _explanation(factors: tuple[tuple[Atom, int], ...]) -> ScaleExplanation:
    key: dict[str, int] = {}
    value = 1.0
    for atom, e in factors:
        value *= atom.value**e
        for sym, p in atom.primitives:
            key[sym] = key.get(sym, 0) + p * e
    k = tuple(sorted((s, p) for s, p in key.items() if p))
    return ScaleExplanation(factors, value, k)


def _close(a: float, b: float, rtol: float = NAME_RTOL) -> bool:
    return abs(a - b) <= rtol * abs(b)


def coincidences(
    x: ScaleExplanation, atoms: list[Atom], rtol: float = NAME_RTOL
) -> list[ScaleExplanation]:
    """``x`` with one factor replaced by a different scale of the same value here.

    Where two scales coincide on the problem (``N = K²`` with batches ``(2, 2)``, ``T =
    2``), every explanation using one also reads with the other, even where that
    reading lies outside the searched combinations (``N·T·K² = N²·T``).
    """
    out = []
    for i, (a, e) in enumerate(x.factors):
        v = a.value**e
        for b in atoms:
            if b == a:
                continue
            for f in (1, -1, 2, -2):
                if _close(b.value**f, v, rtol):
                    out.append(
                        _explanation((*x.factors[:i], (b, f), *x.factors[i + 1 :]))
                    )
    return out


def matching_explanations(
    c: float, explanations: list[ScaleExplanation], rtol: float = NAME_RTOL
) -> list[ScaleExplanation]:
    """The explanations whose value is ``c`` (to ``rtol``), fewest atoms first."""
    hits = [x for x in explanations if abs(c - x.value) <= rtol * abs(x.value)]
    return sorted(hits, key=lambda x: x.effects)


def describe_constant(c: float, explanations: list[ScaleExplanation]) -> str:
    """Name a constant factor: one explanation, several coinciding ones, or none.

    Returns e.g. ``"a constant factor too large by N (reduction over the data)"``; when
    several explanations have the value ``c`` on this problem (including readings
    through scales that coincide here, :func:`coincidences`), ``"a constant factor
    ambiguous on this case (N = K² = 4): too large by N (...); or too large by K²
    (...)"``; with more than :data:`MAX_READINGS` readings, ``"a constant factor 8,
    inconclusive on this case: ..."``; otherwise ``"a constant factor 3.7 matching no
    known scale"``.
    """
    hits = matching_explanations(c, explanations)
    if not hits:
        return f"a constant factor {c:.6g} matching no known scale"
    atoms = list({a: None for x in explanations for a, _ in x.factors})
    readings = {h.key: h for h in hits}
    for h in hits:
        for alt in coincidences(h, atoms):
            readings.setdefault(alt.key, alt)
    if len(readings) == 1:
        return f"a constant factor {hits[0].describe()}"
    every = sorted(readings.values(), key=lambda x: x.effects)
    formulas = list(dict.fromkeys(x.formula for x in every))
    if len(every) > MAX_READINGS:
        return (
            f"a constant factor {c:.6g}, inconclusive on this case: {len(every)} "
            f"readings of the named scales give it ({', '.join(formulas[:4])}, ...)"
        )
    listed = "; or ".join(x.describe() for x in every)
    value = f"{c:.6g}"
    same = " = ".join(formulas + ([] if value in formulas else [value]))
    return f"a constant factor ambiguous on this case ({same}): {listed}"


def named_scales(
    problem: Problem, positions: int, mc_samples: int, fisher_type: str | None = None
) -> dict[str, float]:
    """Single named scales ``{name: value}`` (docs/theory.md §7), for statistical fits.

    The Monte-Carlo checks name a constant measured to a statistical tolerance; with
    that precision they name single scales only (:func:`name_scalar`).
    """
    atoms = scale_atoms(
        problem, positions, mc_samples, fisher_type, per_batch_sums=False
    )
    return {a.name: a.value for a in atoms}


def name_scalar(c: float, scales: dict[str, float], rtol: float = NAME_RTOL) -> str:
    """Describe a constant factor by the single scale it matches (to ``rtol``), if any.

    Scales that coincide within ``rtol`` are all named, as ambiguous.
    """
    matches = []
    for name, s in scales.items():
        for value, how in ((s, "too large by"), (1 / s, "too small by")):
            dist = abs(c - value) / abs(value)
            if dist <= rtol:
                matches.append((dist, how, name))
    if not matches:
        return f"a constant factor {c:.6g} matching no known scale"
    if len(matches) == 1:
        _, how, name = matches[0]
        return f"a constant factor {how} {name}"
    matches.sort()
    listed = "; or ".join(f"{how} {name}" for _, how, name in matches)
    return f"a constant factor ambiguous on this case: {listed}"
