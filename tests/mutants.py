"""Deliberately broken KFAC implementations, one pitfall of docs/theory.md §7 each.

Every mutant is the reference with one step replaced. The mutation meta-tests run them
through the conformance checks and require every one to be caught.
"""

from __future__ import annotations

import math

import torch

from kfac_oracle.contract import DenseBlock
from kfac_oracle.conventions import joint_to_canonical_permutation
from kfac_oracle.diagnosis import KernelOrderSwapped, UnfoldWithoutPadding
from kfac_oracle.problem import Problem
from kfac_oracle.reference.candidate import ReferenceKFAC
from kfac_oracle.reference.kfac import KFACSteps, layer_inputs


def mutant(
    steps_cls,
    name: str,
    pitfall: str,
    diagnosis: str | None = None,
    causes: tuple[str, ...] = (),
):
    """A ReferenceKFAC subclass whose steps are ``steps_cls``.

    ``diagnosis`` is a text some diagnosis of the mutant must contain. ``causes`` are
    what a diagnosis of it may name: texts of structural pitfalls, and
    ``"scale:SYMBOL"`` patterns (fnmatch) for named scales; a diagnosis naming
    anything else names a wrong cause (tests/test_diagnosis_combined.py).
    """
    return type(
        name,
        (ReferenceKFAC,),
        {
            "name": name,
            "steps_class": steps_cls,
            "pitfall": pitfall,
            "expected_diagnosis": diagnosis,
            "causes": causes,
        },
    )


class _ReductionIgnored(KFACSteps):
    def reduction_factor(self, problem):
        return 1.0


class _MSEMeanOverN(KFACSteps):
    def reduction_factor(self, problem):
        if problem.loss_name == "MSELoss" and problem.reduction == "mean":
            return 1.0 / problem.num_data
        return problem.reduction_factor


class _MSEHalf(KFACSteps):
    def hessian_sqrt(self, loss_name, output):
        V = super().hessian_sqrt(loss_name, output)
        return V / math.sqrt(2) if loss_name == "MSELoss" else V


class _MCVarianceOne(KFACSteps):
    def labels(self, problem, mc_samples, seed):
        labels = super().labels(problem, mc_samples, seed)
        if problem.loss_name != "MSELoss":
            return labels
        out = []
        for (X, _), lab in zip(problem.data, labels):
            with torch.no_grad():
                f = problem.model(X)
            out.append(f + (lab - f) * math.sqrt(2))
        return out


class _PerBatchReduction(KFACSteps):
    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        V = super().backpropagated_vectors(problem, fisher_type, output, y, labels, M)
        if problem.reduction == "mean":
            V = V * math.sqrt(problem.num_data / output.shape[0])
        return V


class _EFForType2(KFACSteps):
    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        if fisher_type == "type-2":
            fisher_type = "empirical"
        return super().backpropagated_vectors(
            problem, fisher_type, output, y, labels, M
        )


class _MCTrueLabels(KFACSteps):
    def labels(self, problem, mc_samples, seed):
        return [y.unsqueeze(0).expand(mc_samples, *y.shape) for _, y in problem.data]


class _BiasFirst(KFACSteps):
    def layer_inputs(self, module, a, bias_column):
        x = layer_inputs(module, a, False)
        if bias_column:
            x = torch.cat([x.new_ones(*x.shape[:-1], 1), x], dim=-1)
        return x


class _BiasMissingOne(KFACSteps):
    def layer_inputs(self, module, a, bias_column):
        x = layer_inputs(module, a, False)
        if bias_column:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], dim=-1)
        return x


class _ExpandNormInReduce(KFACSteps):
    def normalisation(self, num_data, positions, kfac_approx):
        return num_data * positions


class _AlwaysReduce(KFACSteps):
    def normalisation(self, num_data, positions, kfac_approx):
        return num_data

    def reduce_inputs(self, x, kfac_approx):
        return super().reduce_inputs(x, "reduce")

    def reduce_gradients(self, g, kfac_approx):
        return super().reduce_gradients(g, "reduce")


class _MCNoOneOverM(KFACSteps):
    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        V = super().backpropagated_vectors(problem, fisher_type, output, y, labels, M)
        return V * math.sqrt(M) if fisher_type == "mc" else V


class _MCReuseSample(KFACSteps):
    def labels(self, problem, mc_samples, seed):
        labels = super().labels(problem, 1, seed)
        return [lab.expand(mc_samples, *lab.shape[1:]) for lab in labels]


class _MCIgnoresSeed(KFACSteps):
    def labels(self, problem, mc_samples, seed):
        return super().labels(problem, mc_samples, int(torch.randint(0, 2**31, ())))


# What a diagnosis may name for the scale pitfalls: the mean reduction ignored is N·T
# (N when T = 1); a per-batch reduction over equal batches is the constant N/B.
R_IGNORED = ("scale:N·T", "scale:N")
T_SCALE = ("scale:T",)
MSE_TWO = ("scale:2",)
PER_BATCH_R = ("the mean reduction taken per batch", "scale:N/B_*")

ReductionIgnored = mutant(
    _ReductionIgnored, "reduction_ignored", "1: R forgotten", "N·T", R_IGNORED
)
MSEMeanOverN = mutant(
    _MSEMeanOverN, "mse_mean_over_N", "1: MSE mean divided by N", "T", T_SCALE
)
PerBatchReduction = mutant(
    _PerBatchReduction,
    "per_batch_reduction",
    "1: per-batch R",
    "the mean reduction taken per batch",
    PER_BATCH_R,
)
MSEHalf = mutant(_MSEHalf, "mse_half", "2: MSE factor 2 missing", "2 (MSELoss", MSE_TWO)
MCVarianceOne = mutant(
    _MCVarianceOne, "mc_variance_one", "2: MSE MC variance 1", None, MSE_TWO
)
EFForType2 = mutant(
    _EFForType2,
    "ef_for_type2",
    "3: EF vectors for type-2",
    "empirical-Fisher",
    ("empirical-Fisher",),
)
MCTrueLabels = mutant(
    _MCTrueLabels,
    "mc_true_labels",
    "3: true labels in MC",
    "true labels",
    ("true labels",),
)
BiasFirst = mutant(
    _BiasFirst,
    "bias_first",
    "5: bias entry first",
    "bias entry placed first",
    ("bias entry placed first",),
)
BiasMissingOne = mutant(
    _BiasMissingOne,
    "bias_missing_one",
    "5: missing 1 in ã",
    "missing 1 in the",
    ("missing 1 in the",),
)
ExpandNormInReduce = mutant(
    _ExpandNormInReduce,
    "expand_norm_in_reduce",
    "7: 1/(N·S) in reduce",
    "S (shared positions",
    ("scale:S",),
)
AlwaysReduce = mutant(
    _AlwaysReduce,
    "always_reduce",
    "7: reduce on expand data",
    "KFAC-reduce computed",
    ("KFAC-reduce computed",),
)
ConvNoPadding = mutant(
    UnfoldWithoutPadding,
    "conv_no_padding",
    "8: unfold without padding",
    "without the padding",
    ("without the padding",),
)
ConvKernelOrder = mutant(
    KernelOrderSwapped,
    "conv_kernel_order",
    "8: kernel order",
    "(kh, kw, C_in)",
    ("(kh, kw, C_in)",),
)
MCNoOneOverM = mutant(
    _MCNoOneOverM,
    "mc_no_one_over_M",
    "9: MC 1/M forgotten",
    "M (MC samples",
    ("scale:M",),
)
MCReuseSample = mutant(_MCReuseSample, "mc_reuse_sample", "9: one MC sample reused")
MCIgnoresSeed = mutant(_MCIgnoresSeed, "mc_ignores_seed", "9: seed ignored")


class SwappedOrder(ReferenceKFAC):
    """Pitfall 4: the dense block formed as A ⊗ G but declared rvec."""

    name = "swapped_order"
    pitfall = "4: Kronecker order swapped"
    expected_diagnosis = "Kronecker order swapped"
    causes = ("Kronecker order swapped", "cvec")

    def compute(self, request):
        out = {}
        for name, f in super().compute(request).items():
            K = torch.kron(f.input_covariance, f.gradient_covariance)
            if f.bias == "joint":
                perm = joint_to_canonical_permutation(
                    f.gradient_covariance.shape[0], f.input_covariance.shape[0] - 1
                )
                K = K[perm][:, perm]
            out[name] = DenseBlock(K, layout="rvec")
        return out


class EqualBatchWeights(ReferenceKFAC):
    """Pitfall 6: per-batch factors averaged with equal weights."""

    name = "equal_batch_weights"
    pitfall = "6: equal weights over unequal batches"
    expected_diagnosis = "equal weights over unequal batches"
    causes = ("equal weights over unequal batches",)

    def compute(self, request):
        per_batch = []
        for batch in request.data:
            sub = type(request)(**{**request.__dict__, "data": [batch]})
            per_batch.append(super().compute(sub))
        out = per_batch[0]
        for name, f in out.items():
            f.input_covariance = sum(p[name].input_covariance for p in per_batch) / len(
                per_batch
            )
            f.gradient_covariance = sum(
                p[name].gradient_covariance for p in per_batch
            ) / len(per_batch)
        return out


class StaleParameters(ReferenceKFAC):
    """Pitfall 10: factors cached by structure, so new parameter values are ignored."""

    name = "stale_parameters"
    pitfall = "10: stale parameters"
    expected_diagnosis = "stale"
    causes = ("stale",)

    def __init__(self):
        super().__init__()
        self._cache = {}

    def compute(self, request):
        key = (
            repr(request.model),
            request.fisher_type,
            request.kfac_approx,
            request.mc_samples,
            request.seed,
            request.bias,
            tuple(tuple(X.shape) for X, _ in request.data),
            request.reduction,
        )
        if key not in self._cache:
            self._cache[key] = super().compute(request)
        return self._cache[key]


class FirstBatchOnly(ReferenceKFAC):
    """Pitfall 1/6: only the first batch is used."""

    name = "first_batch_only"
    pitfall = "6: only the first batch"
    expected_diagnosis = "only the first batch"
    causes = ("only the first batch",)

    def compute(self, request):
        Problem(request.model, request.loss_func, request.data)
        sub = type(request)(**{**request.__dict__, "data": request.data[:1]})
        return super().compute(sub)


MUTANTS = [
    ReductionIgnored,
    MSEMeanOverN,
    PerBatchReduction,
    MSEHalf,
    MCVarianceOne,
    EFForType2,
    MCTrueLabels,
    SwappedOrder,
    BiasFirst,
    BiasMissingOne,
    EqualBatchWeights,
    ExpandNormInReduce,
    AlwaysReduce,
    ConvNoPadding,
    ConvKernelOrder,
    MCNoOneOverM,
    MCReuseSample,
    MCIgnoresSeed,
    StaleParameters,
    FirstBatchOnly,
]


def _mc_mutants() -> list[type]:
    """The Monte-Carlo sensitivity list (tests/mc_candidates.py) as mutants."""
    from tests.mc_candidates import WRONG

    new = ("scale_5_percent", "true_labels_10_percent", "one_over_M_minus_1")
    new += ("capped_at_3", "shared_noise", "seed_ignored_fixed")
    return [mutant(WRONG[name], f"mc_{name}", f"9: MC {name}") for name in new]


MUTANTS += _mc_mutants()


# --- Pitfalls named by the diagnosis of combined and squared effects ---


def _unfold(module, a, bias_column, stride=None, dilation=None):
    """Conv2d patches with the layer's padding and the given stride and dilation."""
    a = torch.nn.functional.pad(a, module._reversed_padding_repeated_twice)
    x = torch.nn.functional.unfold(
        a,
        module.kernel_size,
        dilation=module.dilation if dilation is None else dilation,
        stride=module.stride if stride is None else stride,
    ).transpose(1, 2)
    if bias_column:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    return x


class _ConvNoStride(KFACSteps):
    def layer_inputs(self, module, a, bias_column):
        if isinstance(module, torch.nn.Conv2d):
            return _unfold(module, a, bias_column, stride=1)
        return super().layer_inputs(module, a, bias_column)


class _ConvNoDilation(KFACSteps):
    def layer_inputs(self, module, a, bias_column):
        if isinstance(module, torch.nn.Conv2d):
            return _unfold(module, a, bias_column, dilation=1)
        return super().layer_inputs(module, a, bias_column)


class _MSEMeanInBothFactors(KFACSteps):
    """MSE's mean over the T output entries applied to A and to G (1/T²)."""

    def normalisation(self, num_data, positions, kfac_approx):
        return super().normalisation(num_data, positions, kfac_approx) * self._T

    def factors(self, problem, flavour=None, layers=None, **fields):
        mean_mse = problem.loss_name == "MSELoss" and problem.reduction == "mean"
        self._T = problem.loss_terms_per_datum if mean_mse else 1
        return super().factors(problem, flavour, layers, **fields)

    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        V = super().backpropagated_vectors(problem, fisher_type, output, y, labels, M)
        return V / math.sqrt(self._T)


class _SumsEverywhere(KFACSteps):
    """Sums instead of means in both factors: no R in G, no 1/N in A."""

    def reduction_factor(self, problem):
        return 1.0

    def normalisation(self, num_data, positions, kfac_approx):
        return super().normalisation(1, positions, kfac_approx)


ConvNoStride = mutant(
    _ConvNoStride,
    "conv_no_stride",
    "8: unfold without stride",
    "without the stride",
    ("without the stride",),
)
ConvNoDilation = mutant(
    _ConvNoDilation,
    "conv_no_dilation",
    "8: unfold without dilation",
    "without the dilation",
    ("without the dilation",),
)
MSEMeanInBothFactors = mutant(
    _MSEMeanInBothFactors,
    "mse_mean_in_both_factors",
    "1: mean over outputs in A and G",
    "T² (loss terms per datum",
    ("scale:T²", "scale:T"),
)
SumsEverywhere = mutant(
    _SumsEverywhere,
    "sums_everywhere",
    "1: sums in both factors",
    "N² (reduction over the data",
    ("scale:N²", "scale:N", "scale:N·T", "scale:T"),
)


class BiasJointLayout(ReferenceKFAC):
    """Pitfall 5: the ``[W | b]`` block (bias in every row) declared canonical."""

    name = "bias_joint_layout"
    pitfall = "5: [W | b] layout read as [rvec(W), b]"
    expected_diagnosis = "bias entries scrambled"
    causes = ("bias entries scrambled",)

    def compute(self, request):
        out = {}
        for name, f in super().compute(request).items():
            K = torch.kron(f.gradient_covariance, f.input_covariance)
            out[name] = f if f.bias != "joint" else DenseBlock(K, layout="rvec")
        return out


class SummedBatches(ReferenceKFAC):
    """Pitfall 6: per-batch factors summed instead of averaged (``K²``)."""

    name = "summed_batches"
    pitfall = "6: per-batch factors summed"
    expected_diagnosis = "K² (both factors summed"
    causes = ("equal weights over unequal batches", "scale:K²")

    def compute(self, request):
        per_batch = [
            super(SummedBatches, self).compute(
                type(request)(**{**request.__dict__, "data": [batch]})
            )
            for batch in request.data
        ]
        out = per_batch[0]
        for name, f in out.items():
            f.input_covariance = sum(p[name].input_covariance for p in per_batch)
            f.gradient_covariance = sum(p[name].gradient_covariance for p in per_batch)
        return out


class _ReferenceEKFAC(ReferenceKFAC):
    """Reference EKFAC as dense blocks (George et al. 2018)."""

    capabilities = {
        **ReferenceKFAC.capabilities,
        "fisher_type": {"type-2", "empirical"},
        "approximation": {"ekfac"},
    }

    def ekfac_factors(self, problem, flavour, layers):
        from kfac_oracle.reference.ekfac import ekfac

        return ekfac(problem, flavour, layers)

    def block(self, factors, problem):
        from kfac_oracle.reference.ekfac import ekfac_block

        return ekfac_block(factors)

    def compute(self, request):
        from kfac_oracle.flavours import Flavour

        problem = Problem(
            request.model, request.loss_func, request.data, check_outputs=False
        )
        flavour = Flavour(
            request.fisher_type,
            request.kfac_approx,
            request.bias or self.bias,
            request.mc_samples,
            request.seed,
        )
        factors = self.ekfac_factors(problem, flavour, list(request.layers) or None)
        return {name: DenseBlock(self.block(f, problem)) for name, f in factors.items()}


def _eigh_rows(M):
    """``torch.linalg.eigh`` with the eigenvectors read as rows."""
    result = _EIGH(M)
    return type(result)((result.eigenvalues, result.eigenvectors.T.contiguous()))


_EIGH = torch.linalg.eigh


class EKFACTransposedBasis(_ReferenceEKFAC):
    """EKFAC whose eigenvectors are read as rows, not columns, everywhere."""

    name = "ekfac_transposed_basis"
    pitfall = "E7: EKFAC eigenbasis transposed"
    expected_diagnosis = "EKFAC eigenbasis transposed (U_A and U_G read as rows"
    causes = ("EKFAC eigenbasis transposed",)

    def ekfac_factors(self, problem, flavour, layers):
        from unittest import mock

        with mock.patch.object(torch.linalg, "eigh", _eigh_rows):
            return super().ekfac_factors(problem, flavour, layers)


class EKFACTransposedRebuild(_ReferenceEKFAC):
    """EKFAC with the right eigenvalues, rebuilt as ``Qᵀ diag(Λ) Q``."""

    name = "ekfac_transposed_rebuild"
    pitfall = "E7: EKFAC rebuilt in the transposed eigenbasis"
    expected_diagnosis = "in the reconstruction Q diag(Λ) Qᵀ only"
    causes = ("EKFAC eigenbasis transposed",)

    def block(self, factors, problem):
        from dataclasses import replace

        from kfac_oracle.reference.ekfac import ekfac_block

        return ekfac_block(
            replace(
                factors,
                input_eigenvectors=factors.input_eigenvectors.T.contiguous(),
                gradient_eigenvectors=factors.gradient_eigenvectors.T.contiguous(),
            )
        )


# --- Two pitfalls at once ---


class _BiasFirstReductionIgnored(_BiasFirst, _ReductionIgnored):
    pass


class _PerBatchReductionMSEHalf(_PerBatchReduction, _MSEHalf):
    pass


class _ReductionIgnoredMSEHalf(_ReductionIgnored, _MSEHalf):
    pass


class _ConvNoPaddingReductionIgnored(UnfoldWithoutPadding, _ReductionIgnored):
    pass


class _ConvNoPaddingKernelOrder(KFACSteps):
    def layer_inputs(self, module, a, bias_column):
        x = UnfoldWithoutPadding().layer_inputs(module, a, False)
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            shape = (*x.shape[:-1], module.in_channels, k)
            x = x.reshape(shape).transpose(-1, -2).reshape(x.shape)
        if bias_column:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return x


BiasFirstReductionIgnored = mutant(
    _BiasFirstReductionIgnored,
    "bias_first_reduction_ignored",
    "5+1: bias entry first and R forgotten",
    "bias entry placed first in the augmented input [1; a], with a constant factor",
    ("bias entry placed first", *R_IGNORED),
)
PerBatchReductionMSEHalf = mutant(
    _PerBatchReductionMSEHalf,
    "per_batch_reduction_mse_half",
    "1+2: per-batch R and MSE factor 2 missing",
    "the mean reduction taken per batch",
    (*PER_BATCH_R, *MSE_TWO),
)
ReductionIgnoredMSEHalf = mutant(
    _ReductionIgnoredMSEHalf,
    "reduction_ignored_mse_half",
    "1+2: R forgotten and MSE factor 2 missing",
    "too large by N·T (the mean reduction ignored) and too small by 2",
    (*R_IGNORED, *MSE_TWO),
)
ConvNoPaddingReductionIgnored = mutant(
    _ConvNoPaddingReductionIgnored,
    "conv_no_padding_reduction_ignored",
    "8+1: unfold without padding and R forgotten",
    "without the padding, with a constant factor too large by",
    ("without the padding", *R_IGNORED),
)
ConvNoPaddingKernelOrder = mutant(
    _ConvNoPaddingKernelOrder,
    "conv_no_padding_kernel_order",
    "8+8: unfold without padding and kernel order",
    None,
    ("without the padding", "(kh, kw, C_in)"),
)


class SwappedOrderMSEHalf(SwappedOrder):
    """Pitfalls 4 and 2: ``A ⊗ G`` declared rvec, MSE factor 2 missing."""

    name = "swapped_order_mse_half"
    pitfall = "4+2: Kronecker order swapped and MSE factor 2 missing"
    expected_diagnosis = "too small by 2 (MSELoss Hessian"
    causes = ("Kronecker order swapped", "cvec", *MSE_TWO)
    steps_class = _MSEHalf


class SummedBatchesMSEMeanOverN(SummedBatches):
    """Pitfalls 6 and 1: per-batch factors summed, MSE mean divided by N only."""

    name = "summed_batches_mse_mean_over_N"
    pitfall = "6+1: per-batch factors summed and MSE mean over N"
    expected_diagnosis = "K² (both factors summed"
    causes = ("equal weights over unequal batches", "scale:K²", *T_SCALE)
    steps_class = _MSEMeanOverN


class EKFACTransposedSum(EKFACTransposedBasis):
    """EKFAC with a transposed eigenbasis and eigenvalues not divided by N."""

    name = "ekfac_transposed_sum"
    pitfall = "E7+1: EKFAC eigenbasis transposed and 1/N missing"
    expected_diagnosis = "too large by N (reduction over the data)"
    causes = ("EKFAC eigenbasis transposed", "scale:N")

    def block(self, factors, problem):
        return super().block(factors, problem) * problem.num_data


DIAGNOSIS_MUTANTS = [
    ConvNoStride,
    ConvNoDilation,
    MSEMeanInBothFactors,
    SumsEverywhere,
    BiasJointLayout,
    SummedBatches,
    EKFACTransposedBasis,
    EKFACTransposedRebuild,
]
COMBINED_MUTANTS = [
    BiasFirstReductionIgnored,
    PerBatchReductionMSEHalf,
    ReductionIgnoredMSEHalf,
    ConvNoPaddingReductionIgnored,
    ConvNoPaddingKernelOrder,
    SwappedOrderMSEHalf,
    SummedBatchesMSEMeanOverN,
    EKFACTransposedSum,
]
