"""Model Breadcrumbs (Davari & Belilovsky 2023): drop each task vector's largest entries (outliers)
and its smallest, keep the band between, then combine (sum, or TIES's sign election).

Per tensor of n entries, ordered by magnitude from the largest down: the first ⌊γ·n⌋ are dropped,
the next k are kept, the rest are dropped; where k + ⌊γ·n⌋ > n fewer outliers are dropped so that
k remain. Two rules, chosen by `rule`:
- exact (the default): k = ⌈density·n⌉ (on the decimal density, as ties' exact rule), and among
  equal magnitudes the lower flat index counts as the larger (a stable sort): the same bytes on
  every device.
- mergekit: mergekit 0.1.5's magnitude_outliers: k = ⌊density·n⌋ (possibly 0), ⌊γ·n⌋ on the float
  products, the band taken from its ascending torch.sort of the fp32 magnitudes on the CPU (not
  stable: its order among equal magnitudes is torch's), weights before and λ after the
  combination, + elected at a zero sign sum. Bit-identical to mergekit-yaml with dtype: float32.
`rescale: true` scales each sparse task vector back to its L1 norm (mergekit's rescale).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated, Literal

import torch
from pydantic import Field

from .base import MergeContext, MergeMethod, MethodParams, PerModel, TensorGroup, per_model, register
from .sparse_task_vectors import check_combination, combine, rescale_to_l1
from .ties import Rule, top_k_count

Fraction01 = Annotated[float, Field(ge=0, le=1)]


def band_sizes(density: float, gamma: float, n: int, rule: Rule) -> tuple[int, int]:
    """(outliers dropped from the top, entries kept) for a tensor of n entries."""
    if rule == "mergekit":
        keep, top = int(density * n), int(gamma * n)
    else:
        keep, top = top_k_count(density, n), math.floor(Fraction(repr(float(gamma))) * n)
    return min(top, n - keep), keep


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float, rule: Rule = "exact") -> torch.Tensor:
    """1 on the kept band of |delta| (see the module docstring), 0 elsewhere, in delta's dtype and shape."""
    n = delta.numel()
    top, keep = band_sizes(density, gamma, n, rule)
    magnitudes = delta.abs().reshape(-1).float().cpu()
    if rule == "mergekit":
        ascending = torch.sort(magnitudes, descending=False).indices
        chosen = ascending[n - keep - top:n - top]
    else:
        descending = torch.sort(magnitudes, descending=True, stable=True).indices
        chosen = descending[top:top + keep]
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[chosen] = 1
    return mask.to(delta.device).reshape(delta.shape)


class BreadcrumbsParams(MethodParams):
    density: Fraction01 | list[Fraction01] | dict[str, Fraction01] = Field(
        0.9, description="Fraction of each task vector kept (one number, or per model).")
    gamma: Fraction01 | list[Fraction01] | dict[str, Fraction01] = Field(
        0.01, description="Fraction of the largest-magnitude entries dropped as outliers (one number, or per model).")
    weight: PerModel = Field(1.0, description="Per-model weight of the sparse task vector (mergekit's `weight`).")
    lambda_: PerModel = Field(1.0, alias="lambda", description="Scale λ of the merged task vector.")
    combine: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="Sum the sparse task vectors (breadcrumbs) or elect signs first "
        "(breadcrumbs_ties).")
    merge: Literal["mean", "sum"] = Field(
        "sum", description="sum, or mean: divide by the (agreeing) models' summed weight (mergekit's normalize).")
    rescale: bool = Field(False, description="Scale each sparse task vector back to its L1 norm.")
    rule: Rule = Field("exact", description="exact: k = ⌈density·n⌉, ties in magnitude by lowest index; "
                       "mergekit: mergekit 0.1.5's bytes (see the module docstring).")


@register
class Breadcrumbs(MergeMethod):
    """θ = θ_0 + combine(λ_i w_i · band(τ_i))."""

    name = "breadcrumbs"
    description = "Model Breadcrumbs: drop the largest (outliers) and smallest task-vector entries, then combine."
    Params = BreadcrumbsParams
    version = 1

    def validate(self, params: BreadcrumbsParams, ctx: MergeContext) -> None:
        check_combination(params, ctx)
        per_model(params.density, ctx, "density")
        per_model(params.gamma, ctx, "gamma")

    def merge(self, group: TensorGroup, params: BreadcrumbsParams, ctx: MergeContext, state=None) -> torch.Tensor:
        densities, gammas = per_model(params.density, ctx, "density"), per_model(params.gamma, ctx, "gamma")
        deltas = []
        for theta, d, g in zip(group.models, densities, gammas):
            tau = theta - group.base
            if d >= 1:
                deltas.append(tau)
                continue
            mask = breadcrumbs_mask(tau, d, g, params.rule)
            deltas.append(rescale_to_l1(tau, mask) if params.rescale else tau * mask)
        return combine(group.base, deltas, params, ctx)
