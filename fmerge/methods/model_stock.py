"""Model Stock (Jang et al. 2024): move from the base toward the models' average by how much the
task vectors agree.

With N models, cos θ the mean over model pairs of the cosine between task vectors (norm products
floored at 1e-6), t = N·cos θ / (1 + (N − 1)·cos θ) and θ = t·mean_i θ_i + (1 − t)·θ_0. Where the
denominator is below 1e-6 in magnitude (strongly opposed task vectors) t has no finite value and
the base is kept. `filter_wise` takes cos θ and t per row (output filter) instead of per tensor.
Operations follow mergekit 0.1.5's model_stock in order, so converted configs give its bytes.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import RecipeError
from .base import MergeContext, MergeMethod, MethodParams, TensorGroup, register


def model_stock(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [m.unsqueeze(0) if base.dim() == 1 else m for m in models]
    else:
        w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, 1, denominator))
    average = ws[0].clone()
    for w in ws[1:]:
        average += w
    average /= n
    return (t * average + (1 - t) * w0).reshape(shape)


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="One t per row (output filter) instead of one per tensor.")


@register
class ModelStock(MergeMethod):
    """θ = t·θ̄ + (1 − t)·θ_0, t from the mean pairwise cosine of the task vectors."""

    name = "model_stock"
    description = "Model Stock: interpolate base and model average by the task vectors' mean cosine."
    Params = ModelStockParams
    version = 1

    def validate(self, params: ModelStockParams, ctx: MergeContext) -> None:
        if ctx.n < 2:
            raise RecipeError(f"model_stock needs at least two models besides the base (their task vectors' "
                              f"angle sets the interpolation); got {ctx.n}.")

    def merge(self, group: TensorGroup, params: ModelStockParams, ctx: MergeContext, state=None) -> torch.Tensor:
        return model_stock(group.base, group.models, params.filter_wise)
