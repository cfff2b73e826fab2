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


def mutant(steps_cls, name: str, pitfall: str, diagnosis: str | None = None):
    """A ReferenceKFAC subclass whose steps are ``steps_cls``."""
    return type(
        name,
        (ReferenceKFAC,),
        {
            "name": name,
            "steps_class": steps_cls,
            "pitfall": pitfall,
            "expected_diagnosis": diagnosis,
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


class _PerBatchReduction(KFACSteps):
    def backpropagated_vectors(self, problem, fisher_type, output, y, labels, M):
        V = super().backpropagated_vectors(problem, fisher_type, output, y, labels, M)
        if problem.reduction == "mean":
            V = V * math.sqrt(problem.num_data / output.shape[0])
        return V


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


ReductionIgnored = mutant(
    _ReductionIgnored, "reduction_ignored", "1: R forgotten", "N·T"
)
MSEMeanOverN = mutant(_MSEMeanOverN, "mse_mean_over_N", "1: MSE mean divided by N", "T")
PerBatchReduction = mutant(_PerBatchReduction, "per_batch_reduction", "1: per-batch R")
MSEHalf = mutant(_MSEHalf, "mse_half", "2: MSE factor 2 missing", "2 (MSELoss")
MCVarianceOne = mutant(_MCVarianceOne, "mc_variance_one", "2: MSE MC variance 1")
EFForType2 = mutant(
    _EFForType2, "ef_for_type2", "3: EF vectors for type-2", "empirical-Fisher"
)
MCTrueLabels = mutant(
    _MCTrueLabels, "mc_true_labels", "3: true labels in MC", "true labels"
)
BiasFirst = mutant(
    _BiasFirst, "bias_first", "5: bias entry first", "bias entry placed first"
)
BiasMissingOne = mutant(_BiasMissingOne, "bias_missing_one", "5: missing 1 in ã")
ExpandNormInReduce = mutant(
    _ExpandNormInReduce, "expand_norm_in_reduce", "7: 1/(N·S) in reduce"
)
AlwaysReduce = mutant(
    _AlwaysReduce, "always_reduce", "7: reduce on expand data", "KFAC-reduce computed"
)
ConvNoPadding = mutant(
    UnfoldWithoutPadding,
    "conv_no_padding",
    "8: unfold without padding",
    "without the padding",
)
ConvKernelOrder = mutant(
    KernelOrderSwapped, "conv_kernel_order", "8: kernel order", "(kh, kw, C_in)"
)
MCNoOneOverM = mutant(
    _MCNoOneOverM, "mc_no_one_over_M", "9: MC 1/M forgotten", "M (MC samples"
)
MCReuseSample = mutant(_MCReuseSample, "mc_reuse_sample", "9: one MC sample reused")
MCIgnoresSeed = mutant(_MCIgnoresSeed, "mc_ignores_seed", "9: seed ignored")


class SwappedOrder(ReferenceKFAC):
    """Pitfall 4: the dense block formed as A ⊗ G but declared rvec."""

    name = "swapped_order"
    pitfall = "4: Kronecker order swapped"
    expected_diagnosis = "Kronecker order swapped"

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
    expected_diagnosis = None

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
    expected_diagnosis = None

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
