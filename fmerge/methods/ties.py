"""TIES merging (Yadav et al. 2023): trim each task vector, elect a sign, merge disjointly.

Choices, stated because peers differ:
- Trim keeps every entry with |τ| ≥ the k-th largest magnitude, k = ⌈density·numel⌉, computed on
  the decimal value of density (0.07 × 100 is 7, not the float product's 8). Entries tied with
  the k-th magnitude are all kept: the result is deterministic and the same on every device,
  where picking exactly k indices would leave the choice among ties to torch.topk.
- Per-model λ_i scale the trimmed τ_i *before* the sign election, so a model with a larger λ also
  weighs more in the vote; a model with λ = 0 takes no part. With one λ for all this equals the
  paper's θ_0 + λ·merged.
- A coordinate whose elected sign is 0 (the trimmed, scaled task vectors sum to exactly 0 there)
  gets merged value 0, i.e. keeps the base value. Entries equal to 0 never count as agreeing.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Literal

import torch
from pydantic import Field

from .base import (
    MergeContext,
    MergeMethod,
    MethodParams,
    PerModel,
    TensorGroup,
    per_model,
    register,
)
from .task_arithmetic import scaling_factors


def top_k_count(density: float, numel: int) -> int:
    """k = ⌈density·numel⌉ on the decimal density the user wrote (no float round-up to k+1)."""
    return min(numel, math.ceil(Fraction(repr(density)) * numel))


def kth_largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor; selects from the smaller side to save memory."""
    numel = magnitudes.numel()
    if k > numel // 2:
        # The k-th largest is the largest of the (numel − k + 1) smallest.
        return torch.topk(magnitudes, numel - k + 1, largest=False, sorted=False).values.max()
    return torch.topk(magnitudes, k, sorted=False).values.min()


def keep_magnitude_at_least(delta: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    return torch.where(delta.abs() >= threshold, delta, 0.0)


def trim_to_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the top-⌈density·numel⌉ magnitudes of one tensor (ties at the cut kept)."""
    k = top_k_count(density, delta.numel())
    if k >= delta.numel():
        return delta
    return keep_magnitude_at_least(delta, kth_largest(delta.abs().flatten(), k))


def disjoint_merge(deltas: list[torch.Tensor], merge: str) -> torch.Tensor:
    """Elect the sign of Σ deltas per coordinate; combine the agreeing entries by mean or sum."""
    elected = deltas[0].clone()
    for delta in deltas[1:]:
        elected.add_(delta)
    elected.sign_()
    merged = torch.zeros_like(elected)
    agreeing = torch.zeros_like(elected)
    for delta in deltas:
        agrees = delta * elected > 0  # same non-zero sign; false wherever the elected sign is 0
        merged.add_(torch.where(agrees, delta, 0.0))
        agreeing.add_(agrees)
    if merge == "mean":
        merged.div_(agreeing.clamp_min_(1))  # coordinates with no agreeing entry stay 0
    return merged


class TiesParams(MethodParams):
    density: float = Field(
        0.2, gt=0, le=1, description="Fraction of each task vector kept, by magnitude (0 < d ≤ 1)."
    )
    lambda_: PerModel = Field(
        1.0,
        alias="lambda",
        description="Scale λ of the merged task vector: one number, or per model (list in model "
        "order or {model: λ}), applied to each trimmed task vector before the sign election.",
    )
    merge: Literal["mean", "sum"] = Field(
        "mean",
        description="Combine agreeing entries by their mean (disjoint mean, the paper) or their "
        "sum (FusionBench's default).",
    )
    trim: Literal["tensor", "global"] = Field(
        "tensor",
        description="Top-k per tensor (scales to any model size), or over the whole model per "
        "model (FusionBench; holds every model's |τ| in CPU memory, 4·N·P bytes).",
    )


@register
class Ties(MergeMethod):
    """θ = θ_0 + disjoint_merge(λ_i · trim(τ_i))."""

    name = "ties"
    description = "TIES: trim task vectors by magnitude, elect signs, disjoint mean (or sum)."
    Params = TiesParams
    version = 1

    def validate(self, params: TiesParams, ctx: MergeContext) -> None:
        scaling_factors(params.lambda_, ctx)

    def needs_prepare(self, params: TiesParams) -> bool:
        return params.trim == "global" and params.density < 1

    def prepare(
        self, params: TiesParams, groups: Iterable[TensorGroup], ctx: MergeContext
    ) -> list[float]:
        """Each model's magnitude threshold over all its tensors (global trim).

        Collects |τ_i| of every tensor on the CPU (4·N·P bytes) whatever the tensors' device, so
        that GPU memory stays bounded; the thresholds are exact, not sampled.
        """
        magnitudes: list[list[torch.Tensor]] = [[] for _ in ctx.model_names]
        for group in groups:
            for parts, theta in zip(magnitudes, group.models):
                parts.append((theta - group.base).abs_().flatten().cpu())
        thresholds = []
        while magnitudes:  # pop so that one model's concatenation is freed before the next
            flat = torch.cat(magnitudes.pop(0))
            thresholds.append(kth_largest(flat, top_k_count(params.density, flat.numel())).item())
        return thresholds

    def merge(
        self, group: TensorGroup, params: TiesParams, ctx: MergeContext, state=None
    ) -> torch.Tensor:
        global_trim = self.needs_prepare(params)
        if global_trim and state is None:
            raise RuntimeError("ties with trim: global needs the thresholds from prepare()")
        lambdas = per_model(params.lambda_, ctx, "lambda")
        deltas = []
        for i, (lam, theta) in enumerate(zip(lambdas, group.models)):
            tau = theta - group.base
            trimmed = (
                keep_magnitude_at_least(tau, state[i])
                if global_trim
                else trim_to_top_k(tau, params.density)
            )
            deltas.append(trimmed.mul_(lam))
        return group.base + disjoint_merge(deltas, params.merge)
