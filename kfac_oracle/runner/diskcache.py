r"""A content-addressed disk cache of reference results.

Exact and reference blocks cost far more than reading them back, and they depend only
on what they are computed from. An entry's *key* names all of it: the problem's
content (the case definition, the model's architecture, every parameter and buffer,
every batch, the loss), what is computed (block kind, flavour, layers), and the
environment (kfac-oracle's version and a fingerprint of its source, torch's version,
the CPU capability and torch's thread count, which can change the last bits of a
sum). The file name is the SHA-256 of the canonical JSON of the key, so a change of
any of these is a miss and the value is recomputed.

Location: ``$KFAC_ORACLE_CACHE`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/kfac-oracle``, else ``~/.cache/kfac-oracle``. ``--no-cache``
(``kfac-oracle check``) and ``--kfac-no-cache`` (the pytest plugin) disable it for a
run. Deleting the folder is always safe.

An entry file is::

    kfac-oracle-cache 1\n
    {"key": KEY, "sha256": DIGEST, "size": BYTES}\n
    PAYLOAD

``PAYLOAD`` is :func:`torch.save` of the value (tensors, dicts, lists, strings,
numbers), read back with ``torch.load(weights_only=True)``: loading an entry never
runs code from the file. An entry is used only if its header parses, its key equals
the expected key, and the payload has the stated size and SHA-256; anything else (a
truncated or corrupt file, another key, a payload that is not weights-only) counts
as *invalid* and is recomputed and overwritten. Entries are written to a temporary
file in the same folder and moved into place with :func:`os.replace` (atomic on
POSIX and Windows), so concurrent writers of the same entry leave one complete
entry, and a reader sees either no entry or a complete one.

A cache that cannot be written (read-only folder, full disk) warns once and the run
goes on uncached.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

MAGIC = b"kfac-oracle-cache 1\n"
SUFFIX = ".kfc"
ENV = "KFAC_ORACLE_CACHE"
OFF = ("off", "none", "0", "false", "no")

T = TypeVar("T")

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Enable or disable the disk cache for this process (``--no-cache``)."""
    global _enabled
    _enabled = bool(enabled)


def cache_dir() -> Path | None:
    """The cache folder, or ``None`` when the cache is disabled (see module doc)."""
    if not _enabled:
        return None
    value = os.environ.get(ENV)
    if value is not None and value.strip():
        if value.strip().lower() in OFF:
            return None
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kfac-oracle"


def canonical(key: Mapping[str, Any]) -> str:
    """The key as canonical JSON (sorted keys, no spaces): what is hashed and stored."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def digest(key: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical key: the entry's file name."""
    return hashlib.sha256(canonical(key).encode()).hexdigest()


class InvalidEntry(Exception):
    """An entry that cannot be used (corrupt, truncated, another key, unsafe)."""


def encode(key: Mapping[str, Any], value: Any) -> bytes:
    """An entry's bytes: magic line, header line, payload."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
    header = {
        "key": json.loads(canonical(key)),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
    }
    return MAGIC + canonical(header).encode() + b"\n" + payload


def decode(key: Mapping[str, Any], data: bytes) -> Any:
    """The value stored in ``data`` for ``key``.

    Raises:
        InvalidEntry: If the entry is not a complete, intact entry of ``key`` whose
            payload loads with ``weights_only=True``.
    """
    import torch

    if not data.startswith(MAGIC):
        raise InvalidEntry("not a kfac-oracle cache entry (or another format)")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise InvalidEntry("truncated header")
    try:
        header = json.loads(data[len(MAGIC) : end])
        stored_key, sha, size = header["key"], header["sha256"], header["size"]
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidEntry(f"unreadable header: {error}") from error
    if canonical(stored_key) != canonical(json.loads(canonical(key))):
        raise InvalidEntry("the entry was stored under another key")
    payload = data[end + 1 :]
    if len(payload) != size:
        raise InvalidEntry(f"payload of {len(payload)} bytes, header says {size}")
    if hashlib.sha256(payload).hexdigest() != sha:
        raise InvalidEntry("payload checksum mismatch")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as error:  # noqa: BLE001 - any load failure is an invalid entry
        raise InvalidEntry(f"payload does not load weights-only: {error}") from error


@dataclass
class DiskCache:
    """Entries in one folder; counts hits, misses and invalid entries.

    Args:
        root: The folder (created on the first write).
    """

    root: Path
    hits: int = 0
    misses: int = 0
    invalid: int = 0
    writes: int = 0
    _broken: bool = field(default=False, repr=False)

    def path(self, key: Mapping[str, Any]) -> Path:
        """Where the entry of ``key`` lives."""
        return self.root / f"{digest(key)}{SUFFIX}"

    def load(self, key: Mapping[str, Any]) -> tuple[bool, Any]:
        """``(True, value)`` for a valid entry, else ``(False, None)`` (counted)."""
        try:
            data = self.path(key).read_bytes()
        except OSError:
            self.misses += 1
            return False, None
        try:
            value = decode(key, data)
        except InvalidEntry:
            self.invalid += 1
            return False, None
        self.hits += 1
        return True, value

    def store(self, key: Mapping[str, Any], value: Any) -> None:
        """Write the entry atomically (temporary file, then :func:`os.replace`)."""
        if self._broken:
            return
        data = encode(key, value)
        target = self.path(key)
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=SUFFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            tmp = None
            self.writes += 1
        except OSError as error:
            self._broken = True
            warnings.warn(
                f"kfac-oracle: the reference cache {str(self.root)!r} cannot be "
                f"written ({error}); this run goes on without it",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def get(
        self,
        key: Mapping[str, Any],
        compute: Callable[[], T],
        to_disk: Callable[[T], Any] = lambda v: v,
        from_disk: Callable[[Any], T] = lambda v: v,
    ) -> T:
        """The cached value of ``key``, or ``compute()`` (then stored).

        ``to_disk``/``from_disk`` convert the value to and from what
        ``torch.load(weights_only=True)`` accepts.
        """
        found, raw = self.load(key)
        if found:
            try:
                return from_disk(raw)
            except Exception:  # noqa: BLE001 - a well-formed entry of a wrong shape
                self.hits -= 1
                self.invalid += 1
        value = compute()
        self.store(key, to_disk(value))
        return value


def default_cache() -> DiskCache | None:
    """The cache at :func:`cache_dir`, or ``None`` when disabled."""
    root = cache_dir()
    return None if root is None else DiskCache(root)


def source_fingerprint(package_dir: Path | None = None) -> str:
    """SHA-256 over kfac_oracle's own source files (names and contents).

    A changed reference (an edit in a development install, where the version does
    not change) is then a new key, never a stale hit.
    """
    root = package_dir or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


_ENVIRONMENT: dict[str, Any] | None = None


def environment() -> dict[str, Any]:
    """The part of every key that describes the software and the machine."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        import torch

        from kfac_oracle import __version__

        _ENVIRONMENT = {
            "format": 1,
            "oracle": __version__,
            "source": source_fingerprint(),
            "torch": str(torch.__version__),
            "cpu": str(torch.backends.cpu.get_cpu_capability()),
        }
    env = dict(_ENVIRONMENT)
    import torch

    env["threads"] = torch.get_num_threads()
    return env


def tensor_digest(h: Any, name: str, tensor: Any) -> None:
    """Feed a tensor's name, dtype, shape, device and bytes into the hash ``h``."""
    import torch

    t = tensor.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.device}\0".encode())
    flat = t.cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    h.update(b"\0")


def problem_fingerprint(
    problem: Any, definition: Mapping[str, Any], extra: Iterable[Any] = ()
) -> str:
    """SHA-256 of a problem's content: definition, architecture, parameters, data."""
    h = hashlib.sha256()
    h.update(canonical(dict(definition)).encode() + b"\0")
    for item in extra:
        h.update(repr(item).encode() + b"\0")
    h.update(repr(problem.model).encode() + b"\0")
    h.update(repr(problem.loss_func).encode() + b"\0")
    h.update(repr(getattr(problem.loss_func, "reduction", None)).encode() + b"\0")
    for name, value in problem.model.state_dict(keep_vars=True).items():
        tensor_digest(h, name, value)
    for k, (X, y) in enumerate(problem.data):
        tensor_digest(h, f"X{k}", X)
        tensor_digest(h, f"y{k}", y)
    return h.hexdigest()


__all__ = [
    "DiskCache",
    "InvalidEntry",
    "cache_dir",
    "decode",
    "default_cache",
    "digest",
    "encode",
    "environment",
    "problem_fingerprint",
    "set_enabled",
    "source_fingerprint",
]
