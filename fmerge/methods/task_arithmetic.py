"""Task arithmetic (Ilharco et al. 2023): add scaled task vectors to the base."""

from __future__ import annotations

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
)


def scaling_factors(value: PerModel, ctx: MergeContext, key: str = "lambda") -> list[float]:
    """Per-model λ; all zero is refused because the merge would silently return the base."""
    lambdas = per_model(value, ctx, key)
    if all(lam == 0 for lam in lambdas):
        raise RecipeError(f"Parameter '{key}': all λ are zero: the merge would equal the base.")
    return lambdas


class TaskArithmeticParams(MethodParams):
    lambda_: PerModel = Field(
        0.3,
        alias="lambda",
        description="Scale λ of each task vector: one number, a list in model order, or "
        "{model: λ}. 0.3 is FusionBench's default.",
    )
    weight: PerModel = Field(
        1.0, description="Per-model weight multiplying λ (mergekit's `weight`; its `lambda` is one λ for all)."
    )


@register
class TaskArithmetic(MergeMethod):
    """θ = θ_0 + Σ λ_i w_i (θ_i − θ_0).

    Task vectors are formed explicitly rather than as (1 − Σλ)θ_0 + Σ λ_i θ_i, which would lose
    the small differences to cancellation in fp32.
    """

    name = "task_arithmetic"
    description = "Base plus the λ-scaled sum of the task vectors θ_i − θ_0."
    Params = TaskArithmeticParams
    version = 1

    def validate(self, params: TaskArithmeticParams, ctx: MergeContext) -> None:
        scaling_factors(params.lambda_, ctx)
        weights = per_model(params.weight, ctx, "weight")
        if all(w == 0 for w in weights):
            raise RecipeError("Parameter 'weight' is 0 for every model: the merge would equal the base.")

    def merge(
        self, group: TensorGroup, params: TaskArithmeticParams, ctx: MergeContext, state=None
    ) -> torch.Tensor:
        merged = group.base.clone()
        lambdas = per_model(params.lambda_, ctx, "lambda")
        for lam, w, theta in zip(lambdas, per_model(params.weight, ctx, "weight"), group.models):
            merged.add_(theta - group.base, alpha=lam * w)
        return merged
