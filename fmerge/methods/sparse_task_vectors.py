"""What DELLA and Model Breadcrumbs share once each task vector is sparsified: rescaling to the
original L1 norm, and the combination of the sparse task vectors (a sum, or TIES's sign election).

combine: task_arithmetic   θ = θ_0 + Σ λ_i w_i δ_i      (merge: mean divides by Σ w_i)
combine: ties              θ = θ_0 + disjoint_merge(λ_i w_i δ_i)   (sign election, see ties)
rule: mergekit applies the weights before and one λ after the combination, as mergekit 0.1.5's
generalized task arithmetic does (a summed-weight divisor below 1e-8 in magnitude counts as 1).
"""

from __future__ import annotations

import torch

from ..errors import RecipeError
from .base import MergeContext, MethodParams, per_model
from .task_arithmetic import scaling_factors
from .ties import disjoint_merge, one_lambda

L1_FLOOR = 1e-7


def rescale_to_l1(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """delta·keep scaled back to delta's L1 norm (left unscaled when either norm is below 1e-7)."""
    masked = delta * keep
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < L1_FLOOR or after < L1_FLOOR:
        return masked
    return masked * (before / after)


def check_combination(params: MethodParams, ctx: MergeContext) -> None:
    """Check the settings of the combination (`weight`, `lambda`, `combine`, `merge`, `rule`) that
    DELLA and Breadcrumbs share: per-model values that fit the models, a nonzero divisor for
    merge: mean, and one λ under rule: mergekit."""
    weights = per_model(params.weight, ctx, "weight")
    lambdas = scaling_factors(params.lambda_, ctx)
    if params.combine == "task_arithmetic" and params.merge == "mean" and sum(weights) == 0:
        raise RecipeError(f"merge: mean divides by the sum of the weights, which is 0 ({weights}); change the "
                          f"weights or use merge: sum.")
    if params.rule == "mergekit":
        one_lambda(lambdas)


def combine(base: torch.Tensor, deltas: list[torch.Tensor], params: MethodParams, ctx: MergeContext) -> torch.Tensor:
    """θ_0 plus the combined sparse task vectors (consumes `deltas`), by the combination settings
    of `params` (check_combination); see the module docstring."""
    weights, lambdas = per_model(params.weight, ctx, "weight"), per_model(params.lambda_, ctx, "lambda")
    how, merge, rule = params.combine, params.merge, params.rule
    if rule == "mergekit":
        deltas = [d.mul_(w) for d, w in zip(deltas, weights)]
        if how == "ties":
            mixed = disjoint_merge(deltas, merge, weights, "mergekit")
        else:
            mixed = deltas[0]
            for d in deltas[1:]:
                mixed.add_(d)
            if merge == "mean":  # the summed weights in fp32, as mergekit sums its weight tensor
                total = torch.tensor(weights, dtype=mixed.dtype, device=mixed.device).sum()
                mixed /= torch.where(total.abs() < 1e-8, 1, total)
        lam = one_lambda(lambdas)
        if lam != 1:
            mixed *= lam
        return base + mixed
    if how == "ties":
        scaled = [d.mul_(lam * w) for d, lam, w in zip(deltas, lambdas, weights)]
        return base + disjoint_merge(scaled, merge, weights)
    merged = torch.zeros_like(base)
    for d, lam, w in zip(deltas, lambdas, weights):
        merged.add_(d, alpha=lam * w)
    if merge == "mean":
        merged.div_(sum(weights))
    return merged.add_(base)
