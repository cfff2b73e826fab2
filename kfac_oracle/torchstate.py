"""torch's process-wide defaults: reading and setting them without side effects.

``torch.set_default_device`` installs a function mode that intercepts every torch call
(even for ``"cpu"``), so "restoring" the CPU default by setting it would slow every
later operation many times over. These helpers read the *setting* (``None`` when no
default device was set) and restore exactly that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def default_device_setting() -> torch.device | None:
    """The device set with ``torch.set_default_device``, or ``None`` if none is set."""
    holder = getattr(torch, "_GLOBAL_DEVICE_CONTEXT", None)
    context = getattr(holder, "device_context", None)
    return None if context is None else torch.device(context.device)


def set_default_device_setting(device: torch.device | None) -> None:
    """Set (or, with ``None``, clear) torch's default device."""
    setter = getattr(torch, "set_default_device", None)
    if setter is not None and default_device_setting() != device:
        setter(device)


@contextmanager
def fixed_defaults(dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Run under a fixed default dtype and no default device; restore both after."""
    old_dtype, old_device = torch.get_default_dtype(), default_device_setting()
    torch.set_default_dtype(dtype)
    set_default_device_setting(None)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        set_default_device_setting(old_device)


__all__ = ["default_device_setting", "fixed_defaults", "set_default_device_setting"]
