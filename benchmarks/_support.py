"""Shared pieces of the benchmark suite: problems, implementations, memory, products.

Everything is called through the public contract (``impl.compute(KFACRequest(...))``)
so any third-party implementation is benchmarked the same way as the built-in ones.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from kfac_oracle.contract import KFACRequest, KroneckerFactors
from kfac_oracle.models import MeanPool, Permute

# ----------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchProblem:
    """A model, a loss and one batch of data, built on demand.

    Attributes:
        name: Short id used in test ids, e.g. ``"mlp512"``.
        description: One line for the report.
        build_model: ``() -> nn.Module`` (float32 on CPU, seeded).
        make_data: ``(generator) -> (X, y)`` on CPU.
        weight_sharing: Whether layers see several positions (expand != reduce).
        output_ndim: Number of dimensions of the model output.
        loss: ``"CrossEntropyLoss"`` or ``"MSELoss"``.
        layer_kinds: Class names of the layers with KFAC factors.
        small: Part of the quick subset.
    """

    name: str
    description: str
    build_model: Callable[[], nn.Module]
    make_data: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    weight_sharing: bool = False
    output_ndim: int = 2
    loss: str = "CrossEntropyLoss"
    layer_kinds: frozenset[str] = frozenset({"Linear"})
    small: bool = False

    def build(self, device: str, dtype: torch.dtype):
        """``(model, loss_func, data)`` on ``device`` in ``dtype`` (seeded)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = self.build_model()
        generator = torch.Generator().manual_seed(1)
        X, y = self.make_data(generator)
        if X.is_floating_point():
            X = X.to(dtype)
        if y.is_floating_point():
            y = y.to(dtype)
        model = model.to(device=device, dtype=dtype)
        loss_func = getattr(nn, self.loss)(reduction="mean")
        return model, loss_func, [(X.to(device), y.to(device))]

    def num_params(self) -> int:
        """P, the number of trainable parameters."""
        with torch.random.fork_rng(devices=[]):
            return sum(p.numel() for p in self.build_model().parameters())


def _mlp(width: int, d_in: int = 784, classes: int = 10, act=nn.ReLU):
    def build():
        return nn.Sequential(
            nn.Linear(d_in, width),
            act(),
            nn.Linear(width, width),
            act(),
            nn.Linear(width, classes),
        )

    return build


def _classification(n: int, shape: tuple[int, ...], classes: int = 10, pos=()):
    def make(generator):
        X = torch.randn(n, *shape, generator=generator)
        y = torch.randint(0, classes, (n, *pos), generator=generator)
        return X, y

    return make


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def _seq_mean():
    # A transformer-style position-wise MLP on (N, S, D), mean over positions, head.
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), MeanPool(1), nn.Linear(32, 10)
    )


def _seq_pos():
    # Position-wise MLP with a loss term per position: logits (N, S, C) -> (N, C, S).
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10), Permute(0, 2, 1)
    )


PROBLEMS: dict[str, BenchProblem] = {
    p.name: p
    for p in [
        BenchProblem(
            "mlp64",
            "MLP 784-64-64-10 ReLU, CE, N=512",
            _mlp(64),
            _classification(512, (784,)),
            small=True,
        ),
        BenchProblem(
            "mlp256",
            "MLP 784-256-256-10 ReLU, CE, N=512",
            _mlp(256),
            _classification(512, (784,)),
        ),
        BenchProblem(
            "mlp512",
            "MLP 784-512-512-10 ReLU, CE, N=512",
            _mlp(512),
            _classification(512, (784,)),
        ),
        BenchProblem(
            "cnn",
            "CNN conv3x3(3,16)-conv3x3/2(16,16)-linear, 3x16x16, CE, N=32",
            _cnn,
            _classification(32, (3, 16, 16)),
            weight_sharing=True,
            layer_kinds=frozenset({"Linear", "Conv2d"}),
            small=True,
        ),
        BenchProblem(
            "seqmean",
            "sequence (N=64, S=16, D=32): position-wise MLP, mean over S, head, CE",
            _seq_mean,
            _classification(64, (16, 32)),
            weight_sharing=True,
            small=True,
        ),
        BenchProblem(
            "seqpos",
            "sequence (N=32, S=8, D=32): position-wise MLP, CE per position",
            _seq_pos,
            _classification(32, (8, 32), pos=(8,)),
            weight_sharing=True,
            output_ndim=3,
            small=True,
        ),
        # Problems for the exact references (dense GGN).
        BenchProblem(
            "ggn7k",
            "MLP 32-64-64-10 tanh, CE, N=64 (P=6,922)",
            _mlp(64, d_in=32, act=nn.Tanh),
            _classification(64, (32,)),
        ),
        BenchProblem(
            "ggnsmall",
            "MLP 8-12-4 tanh, CE, N=16 (P=160)",
            lambda: nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)),
            _classification(16, (8,), classes=4),
            small=True,
        ),
    ]
}

KFAC_PROBLEMS = ("mlp64", "mlp256", "mlp512", "cnn", "seqmean", "seqpos")
FLOAT64_PROBLEMS = ("mlp64", "seqmean")
FLAVOURS = ("type-2", "mc", "empirical")


def selected_problems(config, names):
    """Filter problem names by ``--kfac-bench-problems`` and ``--kfac-bench-quick``."""
    opts = config.kfac_bench
    out = [n for n in names if not opts["problems"] or n in opts["problems"]]
    if opts["quick"]:
        out = [n for n in out if PROBLEMS[n].small]
    return out


def device_params(config):
    """``pytest.param`` per device, CUDA skipped with a reason when unavailable."""
    params = []
    for device in config.kfac_bench["devices"]:
        marks = []
        if device == "cuda" and not torch.cuda.is_available():
            marks.append(
                pytest.mark.skip(
                    reason="CUDA not available (torch.cuda.is_available() is False)"
                )
            )
        params.append((device, marks))
    return params


# ----------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------


@dataclass
class ImplEntry:
    """An implementation to benchmark, or the reason it cannot run.

    Attributes:
        name: Its name (test-id prefix).
        factory: ``() -> impl`` (an object with ``compute`` and ``capabilities``).
        unavailable: Why it is skipped (library not installed, ...), else ``None``.
    """

    name: str
    factory: Callable[[], Any] | None
    unavailable: str | None = None


def builtin_implementations() -> list[ImplEntry]:
    """The reference and every registered adapter (skipped when its library is
    missing).

    EKFAC adapters (an ``approximation`` capability other than ``kfac``) return dense
    blocks of the whole operator and are not KFAC-factor benchmarks; they are listed
    as skipped.
    """
    from kfac_oracle.capabilities import Capabilities
    from kfac_oracle.implementations import implementations

    entries = []
    for name, impl in implementations().items():
        if name == "reference-separate":
            continue
        reason = impl.unavailable()
        if reason is None:
            caps = Capabilities.from_mapping(
                getattr(impl.factory, "capabilities", None)
            )
            if caps.approximation_name != "kfac":
                reason = f"{name} is not KFAC ({caps.approximation_name})"
        entries.append(ImplEntry(name, None if reason else impl.factory, reason))
    return entries


def load_external(spec: str) -> list[ImplEntry]:
    """Implementations from ``module:attr`` (a class, an instance, or a dict of them).

    Args:
        spec: ``"package.module:attribute"``.

    Returns:
        One entry per implementation found (a failed import becomes a skip reason).
    """
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        return [ImplEntry(spec.replace(":", "."), None, f"cannot load {spec}: {error}")]
    items = obj.items() if isinstance(obj, dict) else [(None, obj)]
    entries = []
    for name, item in items:
        factory = item if isinstance(item, type) else (lambda item=item: item)
        label = name or getattr(item, "name", None) or attr
        entries.append(ImplEntry(str(label), factory))
    return entries


def unsupported(impl, problem: BenchProblem, fisher_type: str, approx: str):
    """Why ``impl``'s capabilities exclude this combination, or ``None``."""
    from kfac_oracle.capabilities import Capabilities

    caps = Capabilities.from_mapping(getattr(impl, "capabilities", None))
    return caps.excludes(
        loss=problem.loss,
        reduction="mean",
        fisher_type=fisher_type,
        kfac_approx=approx,
        layers=problem.layer_kinds,
        output_ndim=problem.output_ndim,
    )


def make_request(model, loss_func, data, fisher_type, approx) -> KFACRequest:
    """The request every implementation gets."""
    return KFACRequest(
        model=model,
        loss_func=loss_func,
        data=data,
        fisher_type=fisher_type,
        kfac_approx=approx,
        mc_samples=1,
        seed=0,
    )


# ----------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------


def synchronized(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by ``torch.cuda.synchronize()`` on CUDA (inside the timing)."""
    if device.startswith("cuda"):

        def run():
            out = fn()
            torch.cuda.synchronize()
            return out

        return run
    return fn


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_memory(fn: Callable[[], Any], device: str) -> tuple[int | None, str, float]:
    """Peak memory of one call of ``fn`` above what was in use before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
    (minus the memory allocated before the call). CPU: the process's resident-set
    high-water mark (``VmHWM``), reset before the call by writing ``5`` to
    ``/proc/self/clear_refs`` (Linux >= 4.0), after ``malloc_trim(0)`` so that memory
    freed earlier is returned to the OS and new allocations show up in the RSS;
    minus ``VmRSS`` before the call. This counts every allocation (torch's and the
    libraries'), at page granularity; it is a lower bound where the allocator reuses
    memory that was still resident.

    Returns:
        ``(bytes or None, method, seconds of the call)``.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return (
            torch.cuda.max_memory_allocated() - base,
            "cuda.max_memory_allocated",
            seconds,
        )
    _malloc_trim()
    ok = _reset_peak_rss()
    base = _proc_status("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = _proc_status("VmHWM")
    if not ok or base is None or peak is None:
        return None, "unavailable (no /proc/self/clear_refs)", seconds
    return max(peak - base, 0), "cpu.rss-high-water-mark", seconds


def rounds_for(seconds: float, budget: float, lo: int = 3, hi: int = 15) -> int:
    """Rounds so that the timed part takes about ``budget`` seconds."""
    if seconds <= 0:
        return hi
    return int(min(hi, max(lo, math.ceil(budget / seconds))))


def bench_budget() -> float:
    """Seconds of timed rounds per benchmark (env ``KFAC_BENCH_BUDGET``, 1.0)."""
    return float(os.environ.get("KFAC_BENCH_BUDGET", "1.0"))


def measure(benchmark, fn, device: str, setup_info: dict[str, Any]) -> Any:
    """Peak memory (untimed call), then ``benchmark.pedantic`` with a warm-up round.

    With ``--benchmark-disable`` the memory call is skipped and ``fn`` runs once.
    """
    fn = synchronized(fn, device)
    benchmark.extra_info.update(setup_info)
    if getattr(benchmark, "disabled", False):
        return benchmark.pedantic(fn, rounds=1, iterations=1)
    fn()  # warm-up (lazy initialisation, caches)
    mem, method, seconds = peak_memory(fn, device)
    benchmark.extra_info["peak_memory_bytes"] = mem
    benchmark.extra_info["memory_method"] = method
    rounds = rounds_for(seconds, bench_budget())
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------------
# Products with Kronecker factors (reshaping, never a dense kron)
# ----------------------------------------------------------------------------------


def _split(f: KroneckerFactors, v: Tensor) -> tuple[Tensor, Tensor | None]:
    """Split a layer's ``[rvec(W), b]`` vector into ``W`` (or ``[W|b]``) and ``b``."""
    d_out = f.gradient_covariance.shape[0]
    d_in = f.input_covariance.shape[0]
    if f.bias == "joint":
        W, b = v[: d_out * (d_in - 1)], v[d_out * (d_in - 1) :]
        return torch.cat([W.reshape(d_out, d_in - 1), b.reshape(d_out, 1)], 1), None
    if f.bias == "separate":
        return v[: d_out * d_in].reshape(d_out, d_in), v[d_out * d_in :]
    return v.reshape(d_out, d_in), None


def _merge(f: KroneckerFactors, M: Tensor, b: Tensor | None) -> Tensor:
    if f.bias == "joint":
        return torch.cat([M[:, :-1].reshape(-1), M[:, -1]])
    if b is not None:
        return torch.cat([M.reshape(-1), b])
    return M.reshape(-1)


def layer_size(f: KroneckerFactors) -> int:
    """The number of entries of the layer's ``[weight, bias]``."""
    d_out = f.gradient_covariance.shape[0]
    d_in = f.input_covariance.shape[0]
    return d_out * d_in + (d_out if f.bias == "separate" else 0)


def kron_matvec(factors: dict[str, KroneckerFactors], vs: dict[str, Tensor]):
    """``(G ⊗ A) v`` per layer as ``G V A`` (``V`` the weight viewed ``(out, in)``)."""
    out = {}
    for name, f in factors.items():
        V, b = _split(f, vs[name])
        GVA = f.gradient_covariance @ V @ f.input_covariance
        if b is not None:
            Gb = f.bias_covariance if f.bias_covariance is not None else None
            b = (Gb if Gb is not None else f.gradient_covariance) @ b
        out[name] = _merge(f, GVA, b)
    return out


def kron_inverse_matvec(
    factors: dict[str, KroneckerFactors], vs: dict[str, Tensor], damping: float
):
    """``((G + λI)^{-1} ⊗ (A + λI)^{-1}) v`` per layer, by Cholesky solves.

    Includes the factorisation of the damped factors (a cold inverse-vector
    product, as after every factor update).
    """
    out = {}
    for name, f in factors.items():
        V, b = _split(f, vs[name])
        G, A = f.gradient_covariance, f.input_covariance
        LG = torch.linalg.cholesky(
            G + damping * torch.eye(len(G), dtype=G.dtype, device=G.device)
        )
        LA = torch.linalg.cholesky(
            A + damping * torch.eye(len(A), dtype=A.dtype, device=A.device)
        )
        X = torch.cholesky_solve(V, LG)
        X = torch.cholesky_solve(X.T, LA).T
        if b is not None:
            if f.bias_covariance is None:
                b = torch.cholesky_solve(b.unsqueeze(1), LG).squeeze(1)
            else:
                Gb = f.bias_covariance
                Gb = Gb + damping * torch.eye(len(Gb), dtype=Gb.dtype, device=Gb.device)
                b = torch.linalg.solve(Gb, b)
        out[name] = _merge(f, X, b)
    return out
