"""Weighted average of the fine-tuned models' weights."""

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


class WeightedAverageParams(MethodParams):
    weights: PerModel = Field(
        1.0,
        description="Weight of each model: one number, a list in model order, or {model: weight}.",
    )
    normalize: bool = Field(
        True,
        description="Divide by the sum of the weights (a weighted mean); false gives Σ w_i θ_i.",
    )


@register
class WeightedAverage(MergeMethod):
    """θ = Σ w_i θ_i / Σ w_i, or Σ w_i θ_i without normalisation.

    Negative weights are allowed (extrapolation). With `normalize` the weights must not sum to 0;
    without it they may (e.g. θ_1 − θ_2), but not all be 0 (the result would be all zeros).
    """

    name = "weighted_average"
    description = "Weighted average of the fine-tuned models' weights (normalised by default)."
    Params = WeightedAverageParams
    needs_base = False
    version = 1

    def validate(self, params: WeightedAverageParams, ctx: MergeContext) -> None:
        weights = per_model(params.weights, ctx, "weights")
        listed = ", ".join(f"{n}={w:g}" for n, w in zip(ctx.model_names, weights))
        if all(w == 0 for w in weights):
            raise RecipeError(f"Parameter 'weights' is 0 for every model ({listed}).")
        if params.normalize and sum(weights) == 0:
            raise RecipeError(
                f"Parameter 'weights' sums to 0 ({listed}), so the weighted mean is undefined; "
                "change the weights or set normalize: false."
            )

    def merge(
        self, group: TensorGroup, params: WeightedAverageParams, ctx: MergeContext, state=None
    ) -> torch.Tensor:
        weights = per_model(params.weights, ctx, "weights")
        # w_0·θ_0 first, in θ_0's own buffer when the driver owns it: no zero-filled tensor (its
        # pages cost as much as the sum at 1B parameters), and the same bits as 0 + w_0·θ_0.
        first = group.models[0]
        total = first.mul_(weights[0]) if group.models_owned else first * weights[0]
        for weight, theta in zip(weights[1:], group.models[1:]):
            total.add_(theta, alpha=weight)
        if params.normalize:
            total.div_(sum(weights))
        return total
