"""What a check function sees: the case, its layer, the candidate and the references."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kfac_oracle.capabilities import Capabilities
from kfac_oracle.catalogue import Case
from kfac_oracle.checks.compare import EXACT_RTOL
from kfac_oracle.errors import Unsupported
from kfac_oracle.flavours import BiasMode, FisherType, Flavour, KFACApprox
from kfac_oracle.problem import Problem
from kfac_oracle.reference.approximations import Approximation
from kfac_oracle.runner.caller import CandidateCaller, RequestKey
from kfac_oracle.runner.references import ReferenceCache
from kfac_oracle.runner.validate import CandidateResult


@dataclass
class CheckContext:
    """The environment of one check.

    Attributes:
        case: The catalogue case.
        layer: The layer under check, or ``None`` for a case-wide check.
        caller: Calls the candidate (cached, isolated, validated).
        references: Exact and reference blocks (cached).
    """

    case: Case
    layer: str | None
    caller: CandidateCaller
    references: ReferenceCache

    @property
    def capabilities(self) -> Capabilities:
        """The candidate's validated capabilities."""
        return self.caller.capabilities

    @property
    def approximation(self) -> Approximation:
        """The approximation the candidate computes (KFAC, EKFAC, ...)."""
        return self.references.approximation

    def key(
        self,
        fisher_type: str,
        kfac_approx: str,
        mc_samples: int = 1,
        seed: int = 0,
        variant: str = "base",
        bias: str | None = None,
        repeat: int = 0,
    ) -> RequestKey:
        """The request key of this case for a flavour."""
        return RequestKey(
            self.case.id,
            str(fisher_type),
            str(kfac_approx),
            mc_samples,
            seed,
            variant,
            bias,
            repeat,
        )

    def candidate(self, key: RequestKey) -> CandidateResult:
        """The candidate's validated result for ``key``.

        Raises:
            CandidateError: If the candidate failed for this request.
        """
        return self.caller.result(self.case, key)

    def problem(self, variant: str = "base") -> Problem:
        """The case's problem under ``variant`` (shared: do not modify it)."""
        return self.references.problem(self.case, variant)

    def module(self, layer: str | None = None) -> nn.Module:
        """The module of ``layer`` (default: the check's layer) in the base problem."""
        name = layer if layer is not None else self.layer
        assert name is not None
        return self.problem().model.get_submodule(name)

    def reference(self, flavour: Flavour, variant: str = "base") -> dict[str, Tensor]:
        """The approximation's reference blocks of every layer."""
        return self.references.blocks(self.case, flavour, variant)

    def ambiguous(self, flavour: Flavour, variant: str = "base") -> set[str]:
        """Layers where the approximation has no unique answer."""
        return self.references.ambiguous(self.case, flavour, variant)

    def block_tolerance(self, flavour: Flavour) -> tuple[float, str]:
        """The relative tolerance of this layer's block, and what it rests on.

        :data:`~kfac_oracle.checks.compare.EXACT_RTOL` in a float64 run; in a float32
        run the measured rounding tolerance of the layer's reference block for
        ``flavour`` (:mod:`kfac_oracle.rounding`), described for the record.
        """
        if self.caller.dtype == torch.float64:
            return EXACT_RTOL, ""
        assert self.layer is not None
        tolerance = self.references.rounding(self.case, flavour)[self.layer]
        return tolerance.tolerance, tolerance.describe()

    def default_approx(self) -> KFACApprox:
        """The approximation matching the case's weight sharing (expand without)."""
        return KFACApprox.REDUCE if self.case.setting == "reduce" else KFACApprox.EXPAND

    def first_supported(
        self, fisher_types: Iterable[FisherType]
    ) -> tuple[FisherType, KFACApprox]:
        """The first of ``fisher_types`` the candidate supports, with the case's approx.

        Raises:
            Unsupported: If it supports none of them (the message says why).
        """
        approx = self.default_approx()
        reason = None
        for ft in fisher_types:
            if not self.approximation.supports(ft):
                continue
            reason = self.excludes(ft, approx)
            if reason is None:
                return ft, approx
            if not reason.startswith("fisher_type"):
                raise Unsupported(reason)
        raise Unsupported(reason or "no applicable fisher_type in capabilities")

    def excludes(
        self, fisher_type: str | None = None, kfac_approx: str | None = None
    ) -> str | None:
        """Why the candidate's capabilities exclude this case (and flavour)."""
        case = self.case
        return self.capabilities.excludes(
            loss=case.loss,
            reduction=case.reduction,
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            layers=case.layer_kinds,
            output_ndim=case.output_ndim,
        )

    @staticmethod
    def reference_bias(mode: str) -> BiasMode:
        """The reference bias mode that a result's declared mode is compared with."""
        return BiasMode.JOINT if mode == BiasMode.NONE else BiasMode.parse(mode)


__all__ = ["CheckContext"]
