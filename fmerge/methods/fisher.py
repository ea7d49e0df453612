"""Fisher merging (Matena & Raffel 2022): a per-coordinate average weighted by diagonal Fisher.

θ = Σ λ_i F_i θ_i / Σ λ_i F_i. Where peers add ε = 1e-6 to every Fisher entry (which quietly
turns every low-Fisher coordinate into a plain average, and depends on the Fisher's units), the
floor here is relative to each model's mean Fisher, and coordinates where the weights still sum
to 0 take an explicit fallback.

`normalize` divides each F_i by its mean over the model, so a model whose Fisher is 100× larger
(more confident, or just a different loss scale) does not dominate everywhere. FusionBench
normalises by the global L2 norm instead, which a few tensors with huge entries (embeddings,
final layers) dominate; the mean weighs every coordinate alike.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from ..errors import ModelError, RecipeError
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


class FisherParams(MethodParams):
    lambda_: PerModel = Field(
        1.0,
        alias="lambda",
        description="Weight λ_i ≥ 0 of each model's Fisher: one number, a list in model order, "
        "or {model: λ}.",
    )
    floor: float = Field(
        1e-6,
        ge=0,
        allow_inf_nan=False,
        description="Relative floor: each model's Fisher is raised to at least floor × its mean "
        "Fisher (0 disables).",
    )
    fallback: str = Field(
        "average",
        description="Where Σ λ_i F_i is 0 after the floor: 'average' (λ-weighted mean of the "
        "models) or the name of a model whose weights to take.",
    )
    normalize: bool = Field(
        False,
        description="Divide each model's Fisher by its mean, so models with different Fisher "
        "scales count alike.",
    )
    base_prior: bool = Field(
        False,
        description="Merge task vectors with the base model's Fisher F_0 as a prior (Daheim et "
        "al. 2024): θ = θ_0 + Σ λ_i F_i τ_i / (Σ λ_i F_i + F_0).",
    )


@register
class Fisher(MergeMethod):
    """Fisher-weighted average; with `base_prior`, a Fisher-weighted sum of task vectors.

    The fallback 'average' is the λ-weighted mean Σ λ_i θ_i / Σ λ_i, which is what Fisher merging
    gives when all Fishers are equal (the plain mean for the default λ = 1).
    """

    name = "fisher"
    description = "Fisher merging: per-coordinate average weighted by each model's diagonal Fisher."
    Params = FisherParams
    needs_base = False
    needs_stats = ("fisher",)
    version = 1
    model_params = {"fallback": ("average",)}  # or a model's name

    def base_needed(self, params: FisherParams) -> bool:
        return params.base_prior

    def stats_needed(self, params: FisherParams) -> tuple[str, ...]:
        return ("fisher", "fisher_base") if params.base_prior else ("fisher",)

    def validate(self, params: FisherParams, ctx: MergeContext) -> None:
        lambdas = scaling_factors(params.lambda_, ctx)
        negative = [f"{n}={lam:g}" for n, lam in zip(ctx.model_names, lambdas) if lam < 0]
        if negative:
            raise RecipeError(
                f"Parameter 'lambda' must be ≥ 0 for Fisher merging (it weighs an average); "
                f"got {', '.join(negative)}."
            )
        if params.fallback != "average" and params.fallback not in ctx.model_names:
            raise RecipeError(
                f"Parameter 'fallback' is '{params.fallback}', which is neither 'average' nor a "
                f"model of this merge ({', '.join(ctx.model_names)})."
            )
        if params.normalize and params.base_prior:
            raise RecipeError(
                "Parameters 'normalize' and 'base_prior' cannot be combined: normalising gives "
                "each model's Fisher mean 1 while the base Fisher F_0 keeps its raw scale."
            )
        # At recipe load the statistics do not exist yet; the merge step validates again with them.
        if (params.floor > 0 or params.normalize) and "fisher_mean" in ctx.summaries:
            self._check_means(params, ctx)

    @staticmethod
    def _check_means(params: FisherParams, ctx: MergeContext) -> None:
        means = ctx.summaries["fisher_mean"]
        if len(means) != ctx.n:
            raise ModelError(f"Got {len(means)} mean Fishers for {ctx.n} models.")
        for name, mean in zip(ctx.model_names, means):
            if not math.isfinite(mean) or mean < 0:
                raise ModelError(f"Model '{name}' has an invalid mean Fisher {mean}.")
            if params.normalize and mean == 0:
                raise RecipeError(
                    f"Model '{name}' has a Fisher of 0 everywhere, so normalize cannot divide by "
                    "its mean; recompute its Fisher or drop normalize."
                )

    def merge(
        self, group: TensorGroup, params: FisherParams, ctx: MergeContext, state=None
    ) -> torch.Tensor:
        fishers = group.stats.get("fisher")
        if fishers is None or len(fishers) != len(group.models):
            raise ModelError(f"Tensor '{group.name}' lacks a Fisher for every model.")
        lambdas = per_model(params.lambda_, ctx, "lambda")
        means = ctx.summaries.get("fisher_mean")
        if means is None and (params.floor > 0 or params.normalize):
            raise ModelError(
                "Fisher merging with a floor or normalize needs each model's mean Fisher "
                "(summary 'fisher_mean'), which the statistics store did not provide."
            )

        if params.base_prior:
            prior = group.stats.get("fisher_base")
            if group.base is None or not prior:
                raise RecipeError(
                    f"Tensor '{group.name}': base_prior needs the base model and its Fisher."
                )
            values = [theta - group.base for theta in group.models]
        else:
            values = group.models
        # One new tensor per model (its weight λ_i·F_i, made in place after the first op that
        # copies), and the first model's terms start the sums: no zero-filled buffers. The same
        # operations in the same order as Σ over zeros, so the same bits.
        numerator = denominator = None
        for i, (lam, fisher, value) in enumerate(zip(lambdas, fishers, values)):
            weight = fisher.clamp_min(params.floor * means[i]) if params.floor > 0 else None
            if params.normalize:
                weight = weight.div_(means[i]) if weight is not None else fisher / means[i]
            weight = weight.mul_(lam) if weight is not None else fisher * lam
            if numerator is None:
                numerator = weight * value
                denominator = prior[0].clone().add_(weight) if params.base_prior else weight
            else:
                numerator.addcmul_(weight, value)
                denominator.add_(weight)

        merged = numerator.div_(denominator)
        uninformed = denominator == 0
        if uninformed.any():
            merged = torch.where(uninformed, self._fallback(params, ctx, lambdas, values), merged)
        return merged + group.base if params.base_prior else merged

    @staticmethod
    def _fallback(
        params: FisherParams, ctx: MergeContext, lambdas: list[float], values: list[torch.Tensor]
    ) -> torch.Tensor:
        if params.fallback != "average":
            return values[ctx.model_names.index(params.fallback)]
        total = torch.zeros_like(values[0])
        for lam, value in zip(lambdas, values):
            total.add_(value, alpha=lam)
        return total.div_(sum(lambdas))
