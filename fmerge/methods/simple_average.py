"""Simple average: the data-free baseline every other method must beat."""

from __future__ import annotations

import torch

from .base import MergeContext, MergeMethod, MethodParams, TensorGroup, register


class SimpleAverageParams(MethodParams):
    """No parameters: use `weighted_average` for unequal weights."""


@register
class SimpleAverage(MergeMethod):
    """θ = mean_i θ_i. Needs no base model: the average is the same with or without one."""

    name = "simple_average"
    description = "Uniform average of the fine-tuned models' weights."
    Params = SimpleAverageParams
    needs_base = False
    version = 1

    def merge(
        self, group: TensorGroup, params: MethodParams, ctx: MergeContext, state=None
    ) -> torch.Tensor:
        # Accumulate in place: one output-sized buffer instead of stacking N copies.
        total = group.models[0].clone()
        for theta in group.models[1:]:
            total.add_(theta)
        return total.div_(len(group.models))
