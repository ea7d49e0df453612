"""NuSLERP: spherical interpolation of two models (or of their task vectors), over whole tensors,
rows or columns.

With weights w_0, w_1, t = w_1 / (w_0 + w_1) (0.5 when the weights sum to less than 1e-6 in
magnitude). Each vector pair (v_0, v_1) becomes (sin((1 − t)·Ω)·v_0 + sin(t·Ω)·v_1) / sin Ω, with
cos Ω taken between the normalised vectors (norms floored at 1e-7); exactly (anti)parallel
vectors, 1 − cos²Ω ≤ 1e-16, are interpolated linearly. `over` picks the vectors: the whole
tensor flattened, each row (last dimension), or each column (first dimension). With task_vectors
(the default, mergekit's behaviour when the config names a base) the task vectors are interpolated
and added to the base; without, the weights themselves. Operations follow mergekit 0.1.5's nuslerp
in order, so converted configs give its bytes.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import RecipeError
from .base import MergeContext, MergeMethod, MethodParams, PerModel, TensorGroup, per_model, register

NORMALISE_FLOOR = 1e-7
PARALLEL_EPS = 1e-8


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, over: str = "tensor") -> torch.Tensor:
    """Interpolate along the unit sphere between matching vectors of v0 and v1 (see the module)."""
    shape = v0.shape
    if over == "tensor":
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif over == "columns":
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORMALISE_FLOOR)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORMALISE_FLOOR)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= PARALLEL_EPS**2
    omega = torch.acos(torch.where(parallel, 0, cos))
    spherical = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    result = torch.where(parallel, (1 - t) * v0 + t * v1, spherical)
    if over == "columns":
        result = result.transpose(0, -1)
    return result.reshape(shape)


def interpolation_position(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


class NuslerpParams(MethodParams):
    weight: PerModel = Field(1.0, description="Weight of each of the two models: t = w_1 / (w_0 + w_1).")
    over: Literal["tensor", "rows", "columns"] = Field(
        "tensor", description="Interpolate whole tensors flattened (mergekit's nuslerp_flatten: true), each row "
        "(nuslerp_flatten: false) or each column (nuslerp_row_wise: true).")
    task_vectors: bool = Field(True, description="Interpolate the task vectors θ_i − θ_0 and add them to the "
                               "base (mergekit with a base_model), or else the weights themselves.")


@register
class Nuslerp(MergeMethod):
    """θ = θ_0 + nuslerp(t, τ_1, τ_2), or nuslerp(t, θ_1, θ_2) without task vectors."""

    name = "nuslerp"
    description = "Spherical interpolation of two models or task vectors, over tensors, rows or columns."
    Params = NuslerpParams
    version = 1

    def base_needed(self, params: NuslerpParams) -> bool:
        return params.task_vectors

    def validate(self, params: NuslerpParams, ctx: MergeContext) -> None:
        if ctx.n != 2:
            raise RecipeError(f"nuslerp interpolates exactly two models; got {ctx.n} ({', '.join(ctx.model_names)}).")
        per_model(params.weight, ctx, "weight")

    def merge(self, group: TensorGroup, params: NuslerpParams, ctx: MergeContext, state=None) -> torch.Tensor:
        t = interpolation_position(per_model(params.weight, ctx, "weight"))
        over = "tensor" if group.models[0].dim() == 0 else params.over
        if not params.task_vectors:
            return nuslerp(t, group.models[0], group.models[1], over)
        base = group.base
        return base + nuslerp(t, group.models[0] - base, group.models[1] - base, over)
