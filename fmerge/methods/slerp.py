"""SLERP: spherical interpolation between the base and one model, one whole tensor at a time.

θ = sin((1 − t)·Ω)/sin Ω · θ_0 + sin(t·Ω)/sin Ω · θ_1, with cos Ω the cosine between the two
tensors flattened (norms at or below 1e-8 taken as 1). Where |cos Ω| > `dot_threshold` the
tensors are (anti)parallel and sin Ω is too small to divide by: the tensor is interpolated
linearly, (1 − t)·θ_0 + t·θ_1, instead. Coefficients are computed in fp32 from t rounded to fp32,
in the same order of operations as mergekit 0.1.5's slerp, so a converted config merges to the
same bytes (checked in tests/test_mergekit_parity.py).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import RecipeError
from .base import MergeContext, MergeMethod, MethodParams, TensorGroup, register

NORM_FLOOR = 1e-8
# Norms and the dot product are summed over chunks of this many entries, which bounds the scratch
# memory and rounds the sums as mergekit 0.1.5 does (it chunks the same way).
CHUNK = 1 << 20


def _norm_of_chunks(x: torch.Tensor, chunks: range) -> torch.Tensor:
    """‖x‖ as the norm of the chunks' norms, floored: at or below 1e-8 it counts as 1."""
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(x[:, s:s + CHUNK], dim=1, keepdim=True) for s in chunks]), dim=0)
    return torch.where(norm > NORM_FLOOR, norm, 1)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two same-shaped fp32 tensors, linear where nearly parallel."""
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t_ = torch.tensor([[t]], dtype=torch.float32, device=v0.device)
    if a.shape[1] == 0:
        return v0.clone()
    chunks = range(0, a.shape[1], CHUNK)
    norm_a = _norm_of_chunks(a, chunks)
    norm_b = _norm_of_chunks(b, chunks)
    dot = torch.stack([((a[:, s:s + CHUNK] / norm_a) * (b[:, s:s + CHUNK] / norm_b)).sum(dim=1, keepdim=True)
                       for s in chunks]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    omega = torch.acos(torch.where(linear, 0, dot))
    sin_omega = torch.sin(omega)
    coef_a = torch.where(linear, 1 - t_, torch.sin((1 - t_) * omega) / sin_omega)
    coef_b = torch.where(linear, t_, torch.sin(t_ * omega) / sin_omega)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


class SlerpParams(MethodParams):
    t: float = Field(0.5, description="Position between the base (t = 0) and the model (t = 1); per tensor "
                     "with {gradient: [...]} or {filter, value} lists, as in mergekit.")
    dot_threshold: float = Field(0.9995, gt=0, le=1, description="Above this |cos Ω| the two tensors count as "
                                 "parallel and are interpolated linearly (sin Ω would be too small to divide by).")


@register
class Slerp(MergeMethod):
    """θ = slerp(t, θ_0, θ_1): the base and exactly one model."""

    name = "slerp"
    description = "Spherical interpolation between the base and one model (linear where nearly parallel)."
    Params = SlerpParams
    version = 1

    def validate(self, params: SlerpParams, ctx: MergeContext) -> None:
        if ctx.n != 1:
            raise RecipeError(f"slerp interpolates the base and exactly one model; got {ctx.n} models "
                              f"({', '.join(ctx.model_names)}). Use nuslerp for two models, or merge in stages.")

    def merge(self, group: TensorGroup, params: SlerpParams, ctx: MergeContext, state=None) -> torch.Tensor:
        return slerp(params.t, group.base, group.models[0], params.dot_threshold)
