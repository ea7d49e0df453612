"""DARE (Yu et al. 2024): randomly drop task-vector entries, rescale the rest, then merge.

The drop mask of model i on tensor `name` comes from a CPU torch.Generator seeded with
tensor_seed(seed, name, i): keep where torch.rand(shape) ≥ p. It is drawn on the CPU even for
CUDA tensors (then moved), because CPU and CUDA generators give different streams: this way the
same recipe yields the same weights on any device and in any tensor order. With combine: ties the
magnitude trim and the sign vote follow `rule` (exact or mergekit), as in ties.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ..errors import RecipeError
from .base import (
    MergeContext,
    MergeMethod,
    MethodParams,
    PerModel,
    TensorGroup,
    per_model,
    register,
    tensor_seed,
)
from .task_arithmetic import scaling_factors
from .ties import RULE_DESCRIPTION, Rule, disjoint_merge, one_lambda, trim_to_top_k


def drop_and_rescale(delta: torch.Tensor, p: float, seed: int, rescale: bool = True) -> torch.Tensor:
    """Zero each entry with probability p (mask from a CPU generator), divide survivors by 1 − p."""
    if p == 0:
        return delta
    generator = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(delta.shape, generator=generator) >= p
    return torch.where(keep.to(delta.device), delta / (1 - p) if rescale else delta, 0.0)


DropProbability = Annotated[float, Field(ge=0, lt=1)]


class DareParams(MethodParams):
    p: DropProbability | list[DropProbability] | dict[str, DropProbability] = Field(
        ..., description="Drop probability of each task-vector entry (0 ≤ p < 1): one number, or per "
        "model (list in model order or {model: p}); mergekit's density is 1 − p."
    )
    rescale: bool = Field(
        True, description="Divide the surviving entries by 1 − p (the paper). mergekit 0.1.5 instead "
        "rescales to the task vector's L1 norm, which is 1/(1 − p) only in expectation."
    )
    weight: PerModel = Field(
        1.0, description="Per-model weight (mergekit's `weight`): scales each task vector like λ; "
        "with combine: ties and merge: mean the agreeing entries are divided by their summed weight."
    )
    combine: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="How the sparsified task vectors are merged."
    )
    lambda_: PerModel = Field(
        1.0,
        alias="lambda",
        description="Scale λ of each task vector: one number, a list in model order, or "
        "{model: λ}.",
    )
    density: float = Field(
        1.0,
        gt=0,
        le=1,
        description="combine: ties only: magnitude top-k kept after the drop (1 = no trim).",
    )
    merge: Literal["mean", "sum"] = Field(
        "mean", description="combine: ties only: disjoint mean or sum of agreeing entries."
    )
    seed: int = Field(0, description="Seed of the drop masks (one stream per tensor and model).")
    rule: Rule = Field("exact", description="combine: ties only: the TIES rule (see ties). " + RULE_DESCRIPTION)


@register
class Dare(MergeMethod):
    """θ = θ_0 + combine(λ_i · w_i · drop_p(τ_i) / (1 − p))."""

    name = "dare"
    description = "DARE: drop task-vector entries at random, rescale, then task arithmetic or TIES."
    Params = DareParams
    version = 2  # 2: the TIES trim keeps exactly k (ties' version 2); rule: mergekit

    def validate(self, params: DareParams, ctx: MergeContext) -> None:
        scaling_factors(params.lambda_, ctx)
        per_model(params.weight, ctx, "weight")
        per_model(params.p, ctx, "p")
        ties_only = sorted({"density", "merge", "rule"} & params.model_fields_set)
        if params.combine == "task_arithmetic" and ties_only:
            raise RecipeError(
                f"DARE parameter(s) {', '.join(ties_only)} only apply with combine: ties, "
                "but combine is task_arithmetic."
            )
        if params.combine == "ties" and params.rule == "mergekit":
            one_lambda(scaling_factors(params.lambda_, ctx))

    def merge(
        self, group: TensorGroup, params: DareParams, ctx: MergeContext, state=None
    ) -> torch.Tensor:
        weights = per_model(params.weight, ctx, "weight")
        lambdas = [lam * w for lam, w in zip(per_model(params.lambda_, ctx, "lambda"), weights)]
        drop = per_model(params.p, ctx, "p")
        sparse = [
            drop_and_rescale(theta - group.base, drop[i], tensor_seed(params.seed, group.name, i), params.rescale)
            for i, theta in enumerate(group.models)
        ]
        if params.combine == "task_arithmetic":
            merged = group.base.clone()
            for lam, delta in zip(lambdas, sparse):
                merged.add_(delta, alpha=lam)
            return merged
        if params.rule == "mergekit":  # mergekit's order: weights before the vote, λ after the merge
            deltas = [trim_to_top_k(d, params.density, "mergekit").mul_(w) for w, d in zip(weights, sparse)]
            merged = disjoint_merge(deltas, params.merge, weights, "mergekit")
            lam = one_lambda(per_model(params.lambda_, ctx, "lambda"))
            return (merged.mul_(lam) if lam != 1 else merged).add_(group.base)
        deltas = [trim_to_top_k(d, params.density).mul_(lam) for lam, d in zip(lambdas, sparse)]
        return group.base + disjoint_merge(deltas, params.merge, weights)
