"""Robustness: the candidate's result is well formed, and it leaves nothing behind.

``wellformed`` calls the candidate once per case (the first flavour it declares): the
result must be a dict holding every requested layer, with factors or blocks of the
right shapes, dtype and device, finite, symmetric and positive semi-definite, computed
within the time limit, without modifying the model's parameters or buffers. A
candidate that raises or crashes is reported ``error`` here and in every check that
needs that result, with the same message; the run goes on.

``side_effects`` then asks whether any call of the case left something behind: hooks
on a module or installed globally, a module's training flag or a parameter's
``requires_grad`` changed, torch's global random state, default dtype, default device
or grad mode changed (the harness restores them after every call).
"""

from __future__ import annotations

from collections.abc import Iterator

from kfac_oracle.catalogue import Case
from kfac_oracle.checks.context import CheckContext
from kfac_oracle.checks.outcome import Outcome
from kfac_oracle.checks.registry import Target, check, family
from kfac_oracle.errors import CandidateError, Unsupported
from kfac_oracle.flavours import FisherType

family(rank=5)


def whole_case(case: Case) -> Iterator[Target]:
    """One target per case."""
    yield Target("wellformed")


def _flavours() -> list[FisherType]:
    """Deterministic fisher types first, then stochastic ones."""
    return sorted(FisherType, key=lambda ft: ft.stochastic)


@check(targets=whole_case, matrix_free=True, float32=True)
def wellformed(ctx: CheckContext) -> Outcome:
    """The result is a dict of every requested layer, well formed (contract §3)."""
    ft, approx = ctx.first_supported(_flavours())
    result = ctx.candidate(ctx.key(ft, approx))
    modes = sorted(set(result.bias.values()))
    return Outcome(
        "passed",
        message=f"{ft}/{approx}: {len(result.blocks)} layers, bias {modes}, "
        "well formed",
    )


def each_case(case: Case) -> Iterator[Target]:
    """One target per case."""
    yield Target("side_effects")


@check(targets=each_case, matrix_free=True, float32=True)
def side_effects(ctx: CheckContext) -> Outcome:
    """No call of the candidate on this case left anything behind.

    Compared before and after each call: hooks on every module and global hooks,
    ``training`` and ``requires_grad`` flags, torch's global random state, default
    dtype, default device and grad mode (restored by the harness after each call).
    """
    ft, approx = ctx.first_supported(_flavours())
    try:
        ctx.candidate(ctx.key(ft, approx))
    except CandidateError:
        pass  # the call's own failure is reported by the other checks
    calls = ctx.caller.calls(ctx.case.id)
    left = ctx.caller.leftovers(ctx.case.id)
    if not left:
        if not ctx.caller.returned(ctx.case.id):
            raise Unsupported(
                "no call of this case returned a result (side effects are judged on "
                "calls that ran to the end)"
            )
        return Outcome("passed", message=f"{calls} calls left nothing behind")
    messages: dict[str, int] = {}
    for _, found in left:
        for message in found:
            messages[message] = messages.get(message, 0) + 1
    listed = "; ".join(f"{m} ({n} of {calls} calls)" for m, n in messages.items())
    return Outcome(
        "failed",
        float(len(left)),
        0.0,
        f"{len(left)} of {calls} calls left side effects: {listed}",
        diagnosis="side effects of the candidate (docs/theory.md §7, pitfall 10)",
    )
