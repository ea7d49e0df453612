"""TIES merging (Yadav et al. 2023): trim each task vector, elect a sign, merge disjointly.

Two rules, chosen by the parameter `rule`.

rule: exact (the default)
- Trim keeps exactly k = ⌈density·numel⌉ entries per tensor (with trim: global, per model over the
  whole model), k computed on the decimal value of density (0.07 × 100 is 7, not the float
  product's 8). Kept: every entry with |τ| above the k-th largest magnitude, then, of the entries
  equal to it, those with the lowest flat (row-major) index until k are kept; with trim: global,
  flat order is that of the model's tensors concatenated in the merge's tensor order. Never up to
  torch.topk's unspecified choice among equal values: the same bytes on CPU and GPU. (Version 1
  kept every entry equal to the k-th magnitude: 27.6–32.5% of the entries at density 0.2 on
  LLM-like bf16 task vectors, where many magnitudes are equal.)
- The k-th largest magnitude is found by an exact two-pass radix select on the fp32 bit patterns
  (two histograms), never by sorting: linear time, memory of one int32 copy of the tensor, and
  the same on CPU and GPU. The histograms also tell how many entries equal it and how many of
  those fit; only when not all fit are their flat indices listed (8 bytes per equal entry) to
  zero the ones past the first.
- Per-model λ_i and weights w_i scale the trimmed τ_i *before* the sign election, so a model that
  weighs more also counts more in the vote; a model with λ = 0 takes no part. The disjoint mean
  divides the sum of agreeing entries by the sum of the agreeing models' weights (by their count
  when all weights are 1, the paper; mergekit's `weight` with `normalize: true`).
- A coordinate whose elected sign is 0 (the trimmed, scaled task vectors sum to exactly 0 there)
  gets merged value 0, i.e. keeps the base value. Entries equal to 0 never count as agreeing.

rule: mergekit (set automatically for configs converted from mergekit): mergekit 0.1.5's TIES.
- Trim keeps k = max(1, int(density·numel)) entries, the float product floored (0.29 × 100 keeps
  28): the first k of a descending torch.argsort of the fp32 magnitudes on the CPU. That argsort
  is not stable (among equal magnitudes its order is not the lowest index first, and depends on
  the whole tensor), so fmerge finds the cut by radix select and, only
  when entries equal to the k-th magnitude straddle it, runs the same argsort on the CPU (also for
  CUDA tensors; O(n log n), 8 bytes per entry of indices).
- Weights scale the trimmed τ_i before the vote, λ the merged result after the mean (mergekit's
  order; λ is one value per tensor here). The divisor is always Σ w of the agreeing models.
- A coordinate whose weighted task vectors sum to exactly 0 (or −0) elects +: its positive entries
  are merged. Entries equal to 0 never count as agreeing.
- Guaranteed: the kept set is mergekit's on the CPU for the same fp32 task vector with the same
  torch build (argsort's order among ties is unspecified and may change between torch versions;
  mergekit on CUDA sorts on the GPU and may keep other tied entries). With `dtype: float32` the
  merged tensor equals mergekit-yaml's (checked bit for bit on random and heavily tied Llama-shaped
  inputs with torch 2.13.0, signs of zero included). mergekit computes in the config's dtype
  where fmerge computes in fp32: with `dtype: bfloat16` mergekit rounds task vectors, sums and
  means to bf16 at every step (which can also change which entries its trim keeps), so the
  outputs are close, not bit-identical.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Annotated, Iterable, Literal

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
from .task_arithmetic import scaling_factors

Rule = Literal["exact", "mergekit"]
RULE_DESCRIPTION = (
    "exact: keep exactly k = ⌈density·n⌉ entries per tensor (per model with trim: global), ties at "
    "the k-th magnitude broken by "
    "lowest flat index (the same on CPU and GPU); a coordinate whose sign sum is exactly 0 keeps the "
    "base value. mergekit: mergekit 0.1.5's bytes: k = ⌊density·n⌋ (at least 1) chosen by its CPU "
    "argsort, weights before the vote and λ after, + elected where the sign sum is exactly 0 (set "
    "for configs converted from mergekit)."
)


def top_k_count(density: float, numel: int, rule: Rule = "exact") -> int:
    """k of a trim. exact: ⌈density·numel⌉ on the decimal density the user wrote (no float round-up
    to k+1). mergekit: max(1, int(density·numel)) on the float product, numel at density ≥ 1."""
    if rule == "mergekit":
        return numel if density >= 1 else min(numel, max(1, int(density * numel)))
    return min(numel, math.ceil(Fraction(repr(float(density))) * numel))


def _largest_bin_with_rank(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The highest bin b such that at least `rank` entries lie in bins ≥ b, and the rank left in b."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    b = int((at_or_above >= rank).nonzero().max())
    return b, rank - int(at_or_above[b] - counts[b])


def kth_largest_with_ties(magnitudes: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The exact k-th largest v of non-negative values (1 ≤ k ≤ numel) as a 0-d fp32 tensor, the
    number of entries equal to v among the top k (k minus those above v), and the number equal to v.

    Non-negative floats order like their int32 bit patterns, so a histogram of the high 16 bits
    finds the bucket holding the k-th largest and a histogram of the low 16 bits of that bucket's
    entries finds the value itself. No sort, no top-k buffer of k values and indices.
    """
    bits = magnitudes.reshape(-1).to(torch.float32).view(torch.int32)
    high = bits >> 16  # sign bit is 0: 0 … 32767
    b, rank = _largest_bin_with_rank(torch.bincount(high, minlength=1 << 15), k)
    low = bits[high == b] & 0xFFFF
    del high
    low_counts = torch.bincount(low, minlength=1 << 16)
    lo, take = _largest_bin_with_rank(low_counts, rank)
    value_bits = torch.tensor([(b << 16) | lo], dtype=torch.int32, device=magnitudes.device)
    return value_bits.view(torch.float32)[0], take, int(low_counts[lo])


def kth_largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest of non-negative values (1 ≤ k ≤ numel), as a 0-d fp32 tensor."""
    return kth_largest_with_ties(magnitudes, k)[0]


def keep_magnitude_at_least(delta: torch.Tensor, threshold: torch.Tensor | float, magnitudes=None) -> torch.Tensor:
    """Zero, in place, the entries of `delta` whose magnitude is below `threshold`."""
    mag = delta.abs() if magnitudes is None else magnitudes
    return delta.masked_fill_(mag < threshold, 0.0)


def keep_above_and_first_equal(
    delta: torch.Tensor, threshold: torch.Tensor | float, take: int, magnitudes=None
) -> torch.Tensor:
    """Zero, in place, all of `delta` but the entries with |δ| > threshold and the first `take`
    entries (lowest flat index, row-major) with |δ| == threshold."""
    mag = delta.abs() if magnitudes is None else magnitudes
    delta.masked_fill_(mag < threshold, 0.0)
    drop = (mag == threshold).reshape(-1).nonzero().squeeze(1)[take:]  # equal to the cut, past the first `take`
    if drop.numel():
        if delta.is_contiguous():
            delta.view(-1)[drop] = 0.0
        else:
            delta[torch.unravel_index(drop, delta.shape)] = 0.0
    return delta


def _keep_mergekit_top_k(delta: torch.Tensor, k: int, mag: torch.Tensor) -> torch.Tensor:
    """Zero, in place, all but the first k of mergekit's descending CPU argsort of |δ| (fp32)."""
    threshold, take, equal = kth_largest_with_ties(mag, k)
    if take == equal:  # every entry equal to the cut fits: the kept set does not depend on the sort
        keep = mag >= threshold
    else:
        order = torch.argsort(mag.reshape(-1).to("cpu", torch.float32), descending=True)[:k]
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        keep[order] = True
        del order
        keep = keep.to(delta.device).reshape(delta.shape)
    return delta.mul_(keep)  # as mergekit: a dropped negative entry becomes −0


def trim_to_top_k(delta: torch.Tensor, density: float, rule: Rule = "exact") -> torch.Tensor:
    """Zero, in place, all but k entries of one tensor, largest magnitudes first (see the module
    docstring for k and the order among equal magnitudes under each rule)."""
    k = top_k_count(density, delta.numel(), rule)
    if k >= delta.numel():
        return delta
    mag = delta.abs()
    if rule == "mergekit":
        return _keep_mergekit_top_k(delta, k, mag)
    threshold, take, equal = kth_largest_with_ties(mag, k)
    if take == equal:
        return keep_magnitude_at_least(delta, threshold, mag)
    return keep_above_and_first_equal(delta, threshold, take, mag)


def disjoint_merge(
    deltas: list[torch.Tensor], merge: str, weights: list[float] | None = None, rule: Rule = "exact"
) -> torch.Tensor:
    """Elect the sign of Σ deltas per coordinate; combine the agreeing entries by (weighted) mean or sum.

    Consumes `deltas` (disagreeing entries are zeroed in place; the first becomes the result).
    With `weights`, the mean divides by the agreeing models' summed weight. At an exactly zero sum
    rule exact elects no sign (the coordinate gets 0), rule mergekit elects +. Masks are bool, so
    the working memory beyond the deltas is about one fp32 tensor.
    """
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    if rule == "mergekit":
        positive = total >= 0  # mergekit: + where the sum is exactly 0
        negative = positive.logical_not()
    else:
        positive, negative = total > 0, total < 0  # neither where the sum is exactly 0
    del total
    divisor = None
    if merge == "mean":
        equal = rule != "mergekit" and (weights is None or len(set(weights)) == 1)
        divisor = torch.zeros(deltas[0].shape, dtype=torch.uint8 if equal and len(deltas) < 256 else deltas[0].dtype,
                              device=deltas[0].device)
    for i, delta in enumerate(deltas):
        agrees = ((delta > 0) & positive).logical_or_((delta < 0) & negative)
        if rule == "mergekit":
            delta.mul_(agrees)  # as mergekit: a disagreeing negative entry becomes −0
        else:
            delta.masked_fill_(agrees.logical_not_(), 0.0)
            agrees.logical_not_()
        if divisor is not None:
            if divisor.dtype == torch.uint8:
                divisor.add_(agrees)
            else:
                divisor.add_(agrees, alpha=1.0 if weights is None else weights[i])
    merged = deltas[0]
    if rule == "mergekit":
        merged.add_(0.0)  # mergekit's sum starts from +0: an all −0 coordinate sums to +0
    for delta in deltas[1:]:
        merged.add_(delta)
    if divisor is not None:
        if divisor.dtype == torch.uint8 and weights is not None:
            merged.div_(weights[0])  # equal weights: Σ w·δ / (count·w)
        merged.div_(divisor.masked_fill_(divisor == 0, 1))  # coordinates with no agreeing entry stay 0
    return merged


def one_lambda(lambdas: list[float], rule_name: str = "rule: mergekit") -> float:
    """The one λ that mergekit applies after the merge; per-model λ has no mergekit meaning."""
    if len(set(lambdas)) != 1:
        raise RecipeError(f"{rule_name} applies one λ to the merged task vector (mergekit's order); "
                          f"got different λ per model: {lambdas}.")
    return lambdas[0]


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
    rule: Rule = Field("exact", description=RULE_DESCRIPTION)


@register
class Ties(MergeMethod):
    """θ = θ_0 + disjoint_merge(λ_i · w_i · trim(τ_i)); rule mergekit: θ_0 + λ · disjoint_merge(w_i · trim(τ_i))."""

    name = "ties"
    description = "TIES: trim task vectors by magnitude, elect signs, disjoint mean (or sum)."
    Params = TiesParams
    version = 2  # 2: exactly k kept (lowest flat index among ties at the cut); rule: mergekit

    def validate(self, params: TiesParams, ctx: MergeContext) -> None:
        lambdas = scaling_factors(params.lambda_, ctx)
        weights = per_model(params.weight, ctx, "weight")
        per_model(params.density, ctx, "density")
        if all(lam * w == 0 for lam, w in zip(lambdas, weights)):
            raise RecipeError("Parameters 'lambda' × 'weight' are zero for every model: the merge would equal the base.")
        if params.trim == "global" and not isinstance(params.density, (int, float)):
            raise RecipeError("trim: global takes one 'density' for the whole model, not one per model.")
        if params.rule == "mergekit":
            if params.trim == "global":
                raise RecipeError("rule: mergekit trims per tensor (mergekit has no global trim); use trim: tensor.")
            one_lambda(lambdas)

    def needs_prepare(self, params: TiesParams) -> bool:
        return params.trim == "global" and isinstance(params.density, (int, float)) and params.density < 1

    def prepare(
        self, params: TiesParams, groups: Iterable[TensorGroup], ctx: MergeContext
    ) -> list[tuple[float, dict[str, int] | None]]:
        """Each model's cut over all its tensors (global trim): (threshold, quota), where quota maps
        each tensor to how many of its entries equal to the threshold are kept (None: all of them),
        the first ones in the flat order of the tensors concatenated in `groups` order.

        Collects |τ_i| of every tensor on the CPU (4·N·P bytes) whatever the tensors' device, so
        that GPU memory stays bounded; the cuts are exact, not sampled.
        """
        names: list[str] = []
        magnitudes: list[list[torch.Tensor]] = [[] for _ in ctx.model_names]
        for group in groups:
            names.append(group.name)
            for parts, theta in zip(magnitudes, group.models):
                parts.append((theta - group.base).abs_().flatten().cpu())
        cuts = []
        while magnitudes:  # pop so that one model's concatenation is freed before the next
            parts = magnitudes.pop(0)
            sizes = [p.numel() for p in parts]
            flat = torch.cat(parts)
            del parts
            threshold, take, equal = kth_largest_with_ties(flat, top_k_count(params.density, flat.numel()))
            quota = None
            if take < equal:
                quota = {}
                for name, part in zip(names, flat.split(sizes)):
                    quota[name] = min(take, int((part == threshold).sum()))
                    take -= quota[name]
            cuts.append((threshold.item(), quota))
            del flat
        return cuts

    def merge(
        self, group: TensorGroup, params: TiesParams, ctx: MergeContext, state=None
    ) -> torch.Tensor:
        global_trim = self.needs_prepare(params)
        if global_trim and state is None:
            raise RuntimeError("ties with trim: global needs the cuts from prepare()")
        mergekit = params.rule == "mergekit"
        lambdas = per_model(params.lambda_, ctx, "lambda")
        weights = per_model(params.weight, ctx, "weight")
        densities = per_model(params.density, ctx, "density")

        def delta(i: int, theta: torch.Tensor) -> torch.Tensor:
            tau = theta.sub_(group.base) if group.models_owned else theta - group.base
            if global_trim:
                threshold, quota = state[i]
                if quota is None:
                    trimmed = keep_magnitude_at_least(tau, threshold)
                elif group.name not in quota:
                    raise RuntimeError(f"ties with trim: global: tensor '{group.name}' was not seen by prepare()")
                else:
                    trimmed = keep_above_and_first_equal(tau, threshold, quota[group.name])
            else:
                trimmed = trim_to_top_k(tau, densities[i], params.rule)
            return trimmed.mul_(weights[i] if mergekit else lambdas[i] * weights[i])

        if mergekit and not global_trim and len(group.models) > 1 and group.models[0].numel() >= 1 << 20:
            # mergekit's order needs a full argsort per model, which torch runs on one core: two
            # models at a time (each sort holds ~13 bytes per entry: keep it to two).
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fmerge-ties") as pool:
                deltas = list(pool.map(delta, range(len(group.models)), group.models))
        else:
            deltas = [delta(i, theta) for i, theta in enumerate(group.models)]
        merged = disjoint_merge(deltas, params.merge, weights, params.rule)
        if mergekit and lambdas[0] != 1:
            merged.mul_(one_lambda(lambdas))
        return merged.add_(group.base)
