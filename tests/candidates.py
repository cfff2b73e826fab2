"""Hostile and clumsy candidates: each is the reference plus one misbehaviour.

The harness must report each one with a clear message and go on (never a green run
for a wrong result, never a false failure of a right one).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import signal
import sys
import time

import torch

from kfac_oracle.contract import DenseBlock, KroneckerFactors, MatVecBlock
from kfac_oracle.conventions import kronecker_block
from kfac_oracle.reference.candidate import ReferenceKFAC


class Mutating(ReferenceKFAC):
    """Applies ``mutate(factors)`` to every layer's factors."""

    name = "mutating"

    def mutate(self, f: KroneckerFactors) -> None:
        raise NotImplementedError

    def compute(self, request):
        out = super().compute(request)
        for f in out.values():
            self.mutate(f)
        return out


class Raises(ReferenceKFAC):
    name = "raises"

    def compute(self, request):
        raise RuntimeError("boom")


class ReturnsNaN(Mutating):
    name = "nan"

    def mutate(self, f):
        f.gradient_covariance = f.gradient_covariance * float("nan")


class WrongShape(Mutating):
    name = "wrong_shape"

    def mutate(self, f):
        f.input_covariance = f.input_covariance[:-1, :-1]


class Swapped(Mutating):
    name = "swapped"

    def mutate(self, f):
        f.input_covariance, f.gradient_covariance = (
            f.gradient_covariance,
            f.input_covariance,
        )


class NonSymmetric(Mutating):
    name = "non_symmetric"

    def mutate(self, f):
        f.gradient_covariance = torch.triu(f.gradient_covariance)


class Indefinite(Mutating):
    name = "indefinite"

    def mutate(self, f):
        G = f.gradient_covariance
        f.gradient_covariance = G - 10 * torch.eye(G.shape[0], dtype=G.dtype)


class WrongDtype(Mutating):
    name = "wrong_dtype"

    def mutate(self, f):
        f.input_covariance = f.input_covariance.float()


class MissesLayer(ReferenceKFAC):
    name = "misses_layer"

    def compute(self, request):
        out = super().compute(request)
        out.pop(next(iter(out)))
        return out


class ModifiesModel(ReferenceKFAC):
    name = "modifies_model"

    def compute(self, request):
        with torch.no_grad():
            next(request.model.parameters()).add_(1.0)
        return super().compute(request)


class NotADict(ReferenceKFAC):
    name = "not_a_dict"

    def compute(self, request):
        return [1, 2]


class Slow(ReferenceKFAC):
    name = "slow"
    seconds = 3.0

    def compute(self, request):
        time.sleep(self.seconds)
        return super().compute(request)


# --- correct candidates in unusual forms: must pass ------------------------------


class Transposed(Mutating):
    """``A.T``: a non-contiguous view of a symmetric factor."""

    name = "transposed"

    def mutate(self, f):
        f.input_covariance = f.input_covariance.T


class NumpyFactors(Mutating):
    name = "numpy_factors"

    def mutate(self, f):
        f.input_covariance = f.input_covariance.numpy()
        f.gradient_covariance = f.gradient_covariance.numpy()


class Dense(ReferenceKFAC):
    """The reference as a dense block (``"rvec"``, ``"numpy"``) or an operator."""

    name = "dense"
    form = "rvec"
    capabilities = {**ReferenceKFAC.capabilities, "bias": {"joint"}}

    def compute(self, request):
        out = {}
        for name, f in super().compute(request).items():
            B = kronecker_block(f)
            if self.form == "numpy":
                out[name] = DenseBlock(B.numpy())
            elif self.form == "matvec":
                out[name] = MatVecBlock(lambda v, B=B: B @ v, B.shape[0])
            else:
                out[name] = DenseBlock(B)
        return out


class ReusesBuffer(ReferenceKFAC):
    """Writes every result into the same output buffer (common in libraries)."""

    name = "reuses_buffer"
    first_batch_only = False
    capabilities = {**ReferenceKFAC.capabilities, "bias": {"joint"}}

    def __init__(self):
        super().__init__()
        self.buffers: dict = {}

    def compute(self, request):
        if self.first_batch_only:
            request = dataclasses.replace(request, data=request.data[:1])
        out = {}
        for name, f in super().compute(request).items():
            B = kronecker_block(f)
            buf = self.buffers.setdefault((name, B.shape), torch.empty_like(B))
            out[name] = DenseBlock(buf.copy_(B))
        return out


class FirstBatchReusesBuffer(ReusesBuffer):
    """A real pitfall (only the first batch) hidden behind buffer reuse."""

    name = "first_batch_reuses_buffer"
    first_batch_only = True


# --- global side effects ---------------------------------------------------------


class LeavesDefaultDtype(ReferenceKFAC):
    name = "leaves_float64"

    def compute(self, request):
        out = super().compute(request)
        torch.set_default_dtype(torch.float64)
        return out


class LeavesDefaultDevice(ReferenceKFAC):
    name = "leaves_meta_device"

    def compute(self, request):
        out = super().compute(request)
        torch.set_default_device("meta")
        return out


class LeavesHook(ReferenceKFAC):
    name = "leaves_hook"

    def compute(self, request):
        request.model.register_forward_hook(lambda *args: None)
        return super().compute(request)


class LeavesEvalMode(ReferenceKFAC):
    name = "leaves_eval"

    def compute(self, request):
        request.model.eval()
        return super().compute(request)


class ReseedsGlobalRNG(ReferenceKFAC):
    name = "reseeds"

    def compute(self, request):
        torch.manual_seed(request.seed)
        return super().compute(request)


class GlobalHookSabotage(ReferenceKFAC):
    """Installs a global forward hook scaling every output (sabotage)."""

    name = "global_hook"

    def compute(self, request):
        from torch.nn.modules.module import register_module_forward_hook

        register_module_forward_hook(lambda mod, args, out: out * 2**0.5)
        return super().compute(request)


class CastsModel(ReferenceKFAC):
    name = "casts_model"

    def compute(self, request):
        out = super().compute(request)
        request.model.float()
        return out


class AddsBuffer(ReferenceKFAC):
    name = "adds_buffer"

    def compute(self, request):
        out = super().compute(request)
        request.model.register_buffer("extra", torch.zeros(1))
        return out


# --- candidates that try to end or block the run -------------------------------


class ExitsZero(ReferenceKFAC):
    name = "exits_zero"

    def compute(self, request):
        sys.exit(0)


class HardExit(ReferenceKFAC):
    name = "hard_exit"

    def compute(self, request):
        os._exit(0)


class CustomBaseException(BaseException):
    pass


class RaisesBaseException(ReferenceKFAC):
    name = "raises_base_exception"

    def compute(self, request):
        raise CustomBaseException("not an Exception")


class Segfaults(ReferenceKFAC):
    name = "segfaults"

    def compute(self, request):
        ctypes.string_at(0)


class HangsInC(ReferenceKFAC):
    name = "hangs_in_c"

    def compute(self, request):
        sum(itertools.repeat(0))


class SwallowsTimeout(ReferenceKFAC):
    """A retry loop with a broad ``except Exception``."""

    name = "swallows"
    seconds = 3.0

    def compute(self, request):
        start = time.time()
        while time.time() - start < self.seconds:
            try:
                time.sleep(0.05)
            except Exception:  # noqa: BLE001, S110 - the point of this candidate
                pass
        return super().compute(request)


class OwnAlarm(ReferenceKFAC):
    """Arms and cancels its own SIGALRM watchdog around slow work."""

    name = "own_alarm"
    seconds = 3.0

    def compute(self, request):
        signal.alarm(30)
        try:
            time.sleep(self.seconds)
        finally:
            signal.alarm(0)
        return super().compute(request)


class LazyMatVec(Dense):
    """A correct operator whose products are slow (lazy work after ``compute``)."""

    name = "lazy_matvec"
    form = "matvec"
    delay = 0.3

    def compute(self, request):
        out = super().compute(request)
        for name, block in out.items():
            mv = block.matvec

            def slow(v, mv=mv):
                time.sleep(self.delay)
                return mv(v)

            out[name] = MatVecBlock(slow, block.size)
        return out


class LazyDict(dict):
    """A mapping that computes on first access."""

    delay = 3.0

    def __getitem__(self, key):
        time.sleep(self.delay)
        return super().__getitem__(key)


class LazyMapping(ReferenceKFAC):
    name = "lazy_mapping"

    def compute(self, request):
        return LazyDict(super().compute(request))


class HugeMatVec(ReferenceKFAC):
    name = "huge_matvec"

    def compute(self, request):
        return {name: MatVecBlock(lambda v: v, 10**6) for name in request.layers}


class AllNotImplemented(ReferenceKFAC):
    name = "all_not_implemented"

    def compute(self, request):
        raise NotImplementedError("nothing yet")


class NumpyOnes(ReferenceKFAC):
    """A float32 operator for a float64 problem: must be a dtype message."""

    name = "float32_matvec"

    def compute(self, request):
        out = {}
        for name, f in super().compute(request).items():
            B = kronecker_block(f).float()
            out[name] = MatVecBlock(lambda v, B=B: B @ v.float(), B.shape[0])
        return out


class IntKeys(ReferenceKFAC):
    name = "int_keys"

    def compute(self, request):
        return {int(k): v for k, v in super().compute(request).items()}


class SparseFactor(Mutating):
    name = "sparse"

    def mutate(self, f):
        f.input_covariance = f.input_covariance.to_sparse()


class OneDimBiasCovariance(ReferenceKFAC):
    name = "one_dim_bias_covariance"
    capabilities = {**ReferenceKFAC.capabilities, "bias": {"separate"}}

    def compute(self, request):
        out = super().compute(request)
        for f in out.values():
            if f.bias == "separate":
                f.bias_covariance = f.gradient_covariance.diagonal().clone()
        return out

    def __init__(self):
        super().__init__(bias="separate")
