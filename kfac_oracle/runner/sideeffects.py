"""What a candidate call may not leave behind, and torch's global state around it.

Before and after each call the harness takes a :class:`Snapshot` of the model handed to
the candidate and of torch's process-wide state. Two kinds of difference:

- the model's *values* (parameters and buffers: values, dtypes, shapes, names) or its
  module structure changed: the candidate modified the model, and its result is
  rejected (:func:`model_changes`);
- *leftovers* (:func:`leftovers`): hooks added to a module (forward, forward-pre,
  backward, full backward, state-dict) or installed globally, a module's ``training``
  flag or a parameter's ``requires_grad`` changed, torch's global RNG state, default
  dtype, default device or grad mode changed. Libraries really do leave hooks behind
  after an error and models in eval mode; the ``side_effects`` check reports them.

:func:`restore_globals` puts torch's global state back after every call, so that a
leftover cannot change a later check.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_mod

from kfac_oracle.torchstate import default_device_setting, set_default_device_setting

_HOOK_DICTS = (
    ("forward hook", "_forward_hooks"),
    ("forward pre-hook", "_forward_pre_hooks"),
    ("backward hook", "_backward_hooks"),
    ("backward pre-hook", "_backward_pre_hooks"),
    ("state-dict hook", "_state_dict_hooks"),
    ("load-state-dict pre-hook", "_load_state_dict_pre_hooks"),
)
_GLOBAL_HOOKS = (
    ("global forward hook", "_global_forward_hooks"),
    ("global forward pre-hook", "_global_forward_pre_hooks"),
    ("global backward hook", "_global_backward_hooks"),
    ("global backward pre-hook", "_global_backward_pre_hooks"),
)


@dataclass
class GlobalState:
    """torch's process-wide state that a candidate could change."""

    default_dtype: torch.dtype
    default_device: torch.device | None
    grad_enabled: bool
    rng_state: Tensor
    global_hooks: dict[str, int]

    @classmethod
    def capture(cls) -> GlobalState:
        """The current global state."""
        return cls(
            default_dtype=torch.get_default_dtype(),
            default_device=default_device_setting(),
            grad_enabled=torch.is_grad_enabled(),
            rng_state=torch.get_rng_state(),
            global_hooks={
                what: len(getattr(module_mod, attr, {})) for what, attr in _GLOBAL_HOOKS
            },
        )


@dataclass
class Snapshot:
    """A model's values and structure, its flags and hooks, and torch's global state."""

    values: dict[str, tuple[torch.dtype, tuple[int, ...], Tensor]]
    modules: list[tuple[str, str]]
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    hooks: dict[str, dict[str, int]]
    globals: GlobalState

    @classmethod
    def capture(cls, model: nn.Module) -> Snapshot:
        """Snapshot ``model`` (values are copied) and torch's global state."""
        values = {
            name: (v.dtype, tuple(v.shape), v.detach().clone())
            for name, v in model.state_dict(keep_vars=True).items()
        }
        named = list(model.named_modules())
        return cls(
            values=values,
            modules=[(name, type(m).__name__) for name, m in named],
            training={name: m.training for name, m in named},
            requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
            hooks={
                name: {
                    what: len(getattr(m, attr, None) or {})
                    for what, attr in _HOOK_DICTS
                }
                for name, m in named
            },
            globals=GlobalState.capture(),
        )


def model_changes(before: Snapshot, model: nn.Module) -> str | None:
    """How the candidate modified the model's values or structure, or ``None``."""
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    if modules != before.modules:
        added = sorted(set(modules) - set(before.modules))
        removed = sorted(set(before.modules) - set(modules))
        return (
            "the candidate changed the model's modules "
            f"(added {added[:3]}, removed {removed[:3]})"
        )
    state = model.state_dict(keep_vars=True)
    if set(state) != set(before.values):
        new_names = sorted(set(state) - set(before.values))
        old_names = sorted(set(before.values) - set(state))
        return (
            "the candidate changed the model's parameters or buffers "
            f"(added {new_names[:3]}, removed {old_names[:3]})"
        )
    for name, value in state.items():
        dtype, shape, old = before.values[name]
        if value.dtype != dtype:
            return (
                f"the candidate modified the model's {name!r}: dtype {dtype} became "
                f"{value.dtype}"
            )
        if tuple(value.shape) != shape or not torch.equal(value.detach(), old):
            return f"the candidate modified the model's {name!r}"
    return None


def leftovers(before: Snapshot, model: nn.Module) -> list[str]:
    """Side effects the candidate left behind (empty when none)."""
    out: list[str] = []
    named = dict(model.named_modules())
    for name, counts in before.hooks.items():
        module = named.get(name)
        if module is None:
            continue
        label = name or "(the model)"
        for what, attr in _HOOK_DICTS:
            extra = len(getattr(module, attr, None) or {}) - counts[what]
            if extra > 0:
                out.append(f"{extra} {what}(s) left on module {label!r}")
    for name, flag in before.training.items():
        module = named.get(name)
        if module is not None and module.training != flag:
            mode = "training" if module.training else "eval"
            out.append(f"module {name or '(the model)'!r} left in {mode} mode")
    for name, p in model.named_parameters():
        wanted = before.requires_grad.get(name)
        if wanted is not None and p.requires_grad != wanted:
            out.append(f"parameter {name!r} left with requires_grad={p.requires_grad}")
    out.extend(global_leftovers(before.globals))
    return out


def global_leftovers(before: GlobalState) -> list[str]:
    """Changes of torch's process-wide state since ``before``."""
    now = GlobalState.capture()
    out = []
    if now.default_dtype != before.default_dtype:
        out.append(
            f"torch's default dtype changed from {before.default_dtype} to "
            f"{now.default_dtype}"
        )
    if now.default_device != before.default_device:
        old = before.default_device or "unset (cpu)"
        new = now.default_device or "unset (cpu)"
        out.append(f"torch's default device changed from {old} to {new}")
    if now.grad_enabled != before.grad_enabled:
        out.append(f"grad mode left {'on' if now.grad_enabled else 'off'}")
    if not torch.equal(now.rng_state, before.rng_state):
        out.append(
            "torch's global random number generator was used or reseeded (its state "
            "changed)"
        )
    for what, count in now.global_hooks.items():
        extra = count - before.global_hooks[what]
        if extra > 0:
            out.append(f"{extra} {what}(s) installed for every module")
    return out


def restore_globals(before: GlobalState) -> None:
    """Put torch's global state back as it was (hooks installed globally removed)."""
    torch.set_default_dtype(before.default_dtype)
    set_default_device_setting(before.default_device)
    torch.set_grad_enabled(before.grad_enabled)
    torch.set_rng_state(before.rng_state)
    for what, attr in _GLOBAL_HOOKS:
        hooks = getattr(module_mod, attr, None)
        if isinstance(hooks, OrderedDict) and len(hooks) > before.global_hooks[what]:
            for key in list(hooks)[before.global_hooks[what] :]:
                del hooks[key]


__all__ = [
    "GlobalState",
    "Snapshot",
    "global_leftovers",
    "leftovers",
    "model_changes",
    "restore_globals",
]
