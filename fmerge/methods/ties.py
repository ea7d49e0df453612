"""TIES merging (Yadav et al. 2023): trim each task vector, elect a sign, merge disjointly.

Choices, stated because peers differ:
- Trim keeps every entry with |τ| ≥ the k-th largest magnitude, k = ⌈density·numel⌉, computed on
  the decimal value of density (0.07 × 100 is 7, not the float product's 8). Entries tied with
  the k-th magnitude are all kept: the result is deterministic and the same on every device,
  where picking exactly k indices would leave the choice among ties to torch.topk. (mergekit keeps
  exactly ⌊density·numel⌋ entries chosen by a full argsort: at most one entry per tensor differs.)
- The k-th largest magnitude is found by an exact two-pass radix select on the fp32 bit patterns
  (two histograms), never by sorting: linear time, memory of one int32 copy of the tensor, and
  the same on CPU and GPU.
- Per-model λ_i and weights w_i scale the trimmed τ_i *before* the sign election, so a model that
  weighs more also counts more in the vote; a model with λ = 0 takes no part. The disjoint mean
  divides the sum of agreeing entries by the sum of the agreeing models' weights (by their count
  when all weights are 1, the paper; mergekit's `weight` with `normalize: true`).
- A coordinate whose elected sign is 0 (the trimmed, scaled task vectors sum to exactly 0 there)
  gets merged value 0, i.e. keeps the base value. Entries equal to 0 never count as agreeing.
  (mergekit elects + at an exact zero sum.)
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated, Iterable, Literal

import torch
from pydantic import Field

from ..errors import FmergeError
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
    return min(numel, math.ceil(Fraction(repr(float(density))) * numel))


def _largest_bin_with_rank(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The highest bin b such that at least `rank` entries lie in bins ≥ b, and the rank left in b."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    b = int((at_or_above >= rank).nonzero().max())
    return b, rank - int(at_or_above[b] - counts[b])


def kth_largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest of non-negative values (1 ≤ k ≤ numel), as a 0-d fp32 tensor.

    Non-negative floats order like their int32 bit patterns, so a histogram of the high 16 bits
    finds the bucket holding the k-th largest and a histogram of the low 16 bits of that bucket's
    entries finds the value itself. No sort, no top-k buffer of k values and indices.
    """
    bits = magnitudes.reshape(-1).to(torch.float32).view(torch.int32)
    high = bits >> 16  # sign bit is 0: 0 … 32767
    b, rank = _largest_bin_with_rank(torch.bincount(high, minlength=1 << 15), k)
    low = bits[high == b] & 0xFFFF
    del high
    lo, _ = _largest_bin_with_rank(torch.bincount(low, minlength=1 << 16), rank)
    value_bits = torch.tensor([(b << 16) | lo], dtype=torch.int32, device=magnitudes.device)
    return value_bits.view(torch.float32)[0]


def keep_magnitude_at_least(delta: torch.Tensor, threshold: torch.Tensor | float, magnitudes=None) -> torch.Tensor:
    """Zero, in place, the entries of `delta` whose magnitude is below `threshold`."""
    mag = delta.abs() if magnitudes is None else magnitudes
    return delta.masked_fill_(mag < threshold, 0.0)


def trim_to_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero, in place, all but the top-⌈density·numel⌉ magnitudes of one tensor (ties at the cut kept)."""
    k = top_k_count(density, delta.numel())
    if k >= delta.numel():
        return delta
    mag = delta.abs()
    return keep_magnitude_at_least(delta, kth_largest(mag, k), mag)


def disjoint_merge(deltas: list[torch.Tensor], merge: str, weights: list[float] | None = None) -> torch.Tensor:
    """Elect the sign of Σ deltas per coordinate; combine the agreeing entries by (weighted) mean or sum.

    Consumes `deltas` (disagreeing entries are zeroed in place; the first becomes the result).
    With `weights`, the mean divides by the agreeing models' summed weight. Masks are bool, so
    the working memory beyond the deltas is about one fp32 tensor.
    """
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    positive, negative = total > 0, total < 0  # neither where the sum is exactly 0
    del total
    divisor = None
    if merge == "mean":
        equal = weights is None or len(set(weights)) == 1
        divisor = torch.zeros(deltas[0].shape, dtype=torch.uint8 if equal and len(deltas) < 256 else deltas[0].dtype,
                              device=deltas[0].device)
    for i, delta in enumerate(deltas):
        agrees = ((delta > 0) & positive).logical_or_((delta < 0) & negative)
        delta.masked_fill_(agrees.logical_not_(), 0.0)
        if divisor is not None:
            agrees.logical_not_()
            divisor.add_(agrees) if divisor.dtype == torch.uint8 else divisor.add_(agrees, alpha=weights[i])
    merged = deltas[0]
    for delta in deltas[1:]:
        merged.add_(delta)
    if divisor is not None:
        if divisor.dtype == torch.uint8 and weights is not None:
            merged.div_(weights[0])  # equal weights: Σ w·δ / (count·w)
        merged.div_(divisor.masked_fill_(divisor == 0, 1))  # coordinates with no agreeing entry stay 0
    return merged


Density = Annotated[float, Field(gt=0, le=1)]


class TiesParams(MethodParams):
    density: Density | list[Density] | dict[str, Density] = Field(
        0.2, description="Fraction of each task vector kept, by magnitude (0 < d ≤ 1): one number, "
        "or per model (list in model order or {model: d})."
    )
    lambda_: PerModel = Field(
        1.0,
        alias="lambda",
        description="Scale λ of the merged task vector: one number, or per model (list in model "
        "order or {model: λ}), applied to each trimmed task vector before the sign election.",
    )
    weight: PerModel = Field(
        1.0,
        description="Per-model weight (mergekit's `weight`): scales the trimmed task vector before "
        "the vote, and merge: mean divides by the agreeing models' summed weight.",
    )
    merge: Literal["mean", "sum"] = Field(
        "mean",
        description="Combine agreeing entries by their mean (disjoint mean, the paper; mergekit's "
        "normalize: true) or their sum (FusionBench's default; mergekit's normalize: false).",
    )
    trim: Literal["tensor", "global"] = Field(
        "tensor",
        description="Top-k per tensor (scales to any model size), or over the whole model per "
        "model (FusionBench; holds every model's |τ| in CPU memory, 4·N·P bytes).",
    )


@register
class Ties(MergeMethod):
    """θ = θ_0 + disjoint_merge(λ_i · w_i · trim(τ_i))."""

    name = "ties"
    description = "TIES: trim task vectors by magnitude, elect signs, disjoint mean (or sum)."
    Params = TiesParams
    version = 1

    def validate(self, params: TiesParams, ctx: MergeContext) -> None:
        lambdas = scaling_factors(params.lambda_, ctx)
        weights = per_model(params.weight, ctx, "weight")
        per_model(params.density, ctx, "density")
        if all(lam * w == 0 for lam, w in zip(lambdas, weights)):
            raise FmergeError("Parameters 'lambda' × 'weight' are zero for every model: the merge would equal the base.")
        if params.trim == "global" and not isinstance(params.density, (int, float)):
            raise FmergeError("trim: global takes one 'density' for the whole model, not one per model.")

    def needs_prepare(self, params: TiesParams) -> bool:
        return params.trim == "global" and isinstance(params.density, (int, float)) and params.density < 1

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
        weights = per_model(params.weight, ctx, "weight")
        densities = per_model(params.density, ctx, "density")
        deltas = []
        for i, theta in enumerate(group.models):
            tau = theta.sub_(group.base) if group.models_owned else theta - group.base
            trimmed = keep_magnitude_at_least(tau, state[i]) if global_trim else trim_to_top_k(tau, densities[i])
            deltas.append(trimmed.mul_(lambdas[i] * weights[i]))
        merged = disjoint_merge(deltas, params.merge, weights)
        return merged.add_(group.base)
