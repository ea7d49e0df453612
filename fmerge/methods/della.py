"""DELLA (Deep et al. 2024): drop task-vector entries at random with magnitude-ranked probabilities
(MagPrune), rescale the survivors, then combine (TIES's sign election, or a sum for della_linear).

Within each row (a 1-D tensor is one row), entries are ranked by magnitude, r = 0 for the smallest
to n − 1 for the largest; entry j is kept with probability p_j = (density − ε) + 2ε·r_j/(n − 1)
(a one-entry row: density − ε), so the mean keep rate is the density and large entries survive
more often. density ± ε must lie in (0, 1). The keep mask of model i on tensor `name` is
torch.rand(shape) < p from a CPU generator seeded with tensor_seed(seed, name, i): the same bytes
on any device and in any tensor order. Two rules, chosen by `rule`:
- exact (the default): ranks from a stable sort (equal magnitudes: lower flat index ranks lower);
  a kept entry is divided by its own keep probability p_j (the paper's rescale: each entry is
  unbiased); the TIES combination follows ties' exact rule.
- mergekit: ranks from mergekit 0.1.5's torch.argsort (not stable), the survivors rescaled together
  to the task vector's L1 norm (rescale: true), weights before and λ after the combination. Its
  mask comes from the global torch RNG in mergekit's tensor order, which fmerge does not
  reproduce: outputs match mergekit's given the same mask (checked in tests/test_mergekit_parity.py),
  and the keep rates agree in distribution.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ..errors import RecipeError
from .base import MergeContext, MergeMethod, MethodParams, PerModel, TensorGroup, per_model, register, tensor_seed
from .sparse_task_vectors import check_combination, combine, rescale_to_l1
from .ties import Rule

Density = Annotated[float, Field(gt=0, le=1)]
Epsilon = Annotated[float, Field(ge=0, lt=0.5)]


def as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float, rule: Rule = "exact") -> torch.Tensor:
    """MagPrune's keep probability of every entry (fp32, delta's shape); see the module docstring."""
    magnitudes = as_rows(delta).abs()
    if rule == "mergekit":
        ranks = torch.argsort(torch.argsort(magnitudes, dim=1, descending=False), dim=1).float()
    else:
        order = torch.sort(magnitudes, dim=1, stable=True).indices
        ranks = torch.empty_like(magnitudes)
        ranks.scatter_(1, order, torch.arange(magnitudes.shape[1], dtype=torch.float32,
                                             device=delta.device).expand_as(magnitudes).contiguous())
    n = magnitudes.shape[1]
    normalised = (ranks / (n - 1)).clamp(0, 1) if n > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + normalised * 2 * epsilon).reshape(delta.shape)


def draw_keep(probabilities: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = torch.rand(probabilities.shape, generator=generator)
    return (draws.to(probabilities.device) < probabilities).to(probabilities.dtype)


def magprune(delta: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool,
             rule: Rule = "exact") -> torch.Tensor:
    """delta with MagPrune's random drop applied and the survivors rescaled (see the module docstring)."""
    if density >= 1:
        return delta
    probabilities = keep_probabilities(delta, density, epsilon, rule)
    keep = draw_keep(probabilities, seed)
    if not rescale:
        return delta * keep
    if rule == "mergekit":
        return rescale_to_l1(delta, keep)
    return delta * keep / probabilities


class DellaParams(MethodParams):
    density: Density | list[Density] | dict[str, Density] = Field(
        0.5, description="Mean fraction of each task vector kept (one number, or per model).")
    epsilon: Epsilon | list[Epsilon] | dict[str, Epsilon] = Field(
        0.15, description="Half-width of the keep probabilities around the density: the smallest entry of a row "
        "is kept with probability density − ε, the largest with density + ε.")
    weight: PerModel = Field(1.0, description="Per-model weight of the sparse task vector (mergekit's `weight`).")
    lambda_: PerModel = Field(1.0, alias="lambda", description="Scale λ of the merged task vector.")
    combine: Literal["ties", "task_arithmetic"] = Field(
        "ties", description="Elect signs then merge the agreeing entries (della), or sum (della_linear).")
    merge: Literal["mean", "sum"] = Field(
        "mean", description="mean: divide by the (agreeing) models' summed weight; sum: do not.")
    rescale: bool = Field(True, description="Rescale the kept entries (exact: each by 1/p_j; mergekit: to the "
                          "task vector's L1 norm).")
    seed: int = Field(0, description="Seed of the keep masks (one stream per tensor and model).")
    rule: Rule = Field("exact", description="exact: stable ranks, 1/p rescale, ties' exact rule; mergekit: "
                       "mergekit 0.1.5's ranks, L1 rescale and order of weights and λ.")


@register
class Della(MergeMethod):
    """θ = θ_0 + combine(λ_i w_i · magprune(τ_i))."""

    name = "della"
    description = "DELLA: drop task-vector entries with magnitude-ranked probabilities, rescale, then combine."
    Params = DellaParams
    version = 1

    def validate(self, params: DellaParams, ctx: MergeContext) -> None:
        check_combination(params, ctx)
        for d, e, name in zip(per_model(params.density, ctx, "density"), per_model(params.epsilon, ctx, "epsilon"),
                              ctx.model_names):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise RecipeError(f"Model '{name}': density {d:g} ± epsilon {e:g} must lie strictly between 0 and 1 "
                                  f"(they are the smallest and largest keep probabilities); lower epsilon.")

    def merge(self, group: TensorGroup, params: DellaParams, ctx: MergeContext, state=None) -> torch.Tensor:
        densities, epsilons = per_model(params.density, ctx, "density"), per_model(params.epsilon, ctx, "epsilon")
        deltas = [magprune(theta - group.base, d, e, tensor_seed(params.seed, group.name, i), params.rescale, params.rule)
                  for i, (theta, d, e) in enumerate(zip(group.models, densities, epsilons))]
        return combine(group.base, deltas, params, ctx)
