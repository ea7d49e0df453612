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

# Entries merged at once on the CPU: a multiple of 64 (whole vector steps) below torch's grain
# size of 32768, so each operation on a block runs in the calling thread; ~1.4 MB of a block's
# inputs and scratch stay in cache between the operations.
BLOCK = 32704


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

        prior = None
        if params.base_prior:
            priors = group.stats.get("fisher_base")
            if group.base is None or not priors:
                raise RecipeError(
                    f"Tensor '{group.name}': base_prior needs the base model and its Fisher."
                )
            prior = priors[0].reshape(-1)
        base = group.base.reshape(-1) if params.base_prior else None
        models = [theta.reshape(-1) for theta in group.models]
        fishers = [fisher.reshape(-1) for fisher in fishers]
        out = torch.empty_like(group.models[0])
        flat, size = out.view(-1), out.numel()
        # On the CPU the tensor is merged block by block, every operation on a block while it is
        # in cache: whole-tensor operations made ~20 passes over memory and a new tensor per model
        # (2.6x the main thread's CPU, 5x the wall time on a busy 2-core machine; BENCHMARKS.md).
        # Each entry goes through the same operations in the same order either way: same bits.
        step = max(1, min(size, BLOCK) if out.device.type == "cpu" else size)
        weight = torch.empty(step, dtype=out.dtype, device=out.device)
        denominator = torch.empty_like(weight)
        value = torch.empty_like(weight) if params.base_prior else None
        for start in range(0, size, step):
            block = slice(start, min(size, start + step))
            self._merge_block(params, lambdas, means, block, models, fishers, base, prior, flat[block],
                              weight[: block.stop - start], denominator[: block.stop - start],
                              value[: block.stop - start] if value is not None else None, ctx)
        return out

    def _merge_block(
        self, params: FisherParams, lambdas: list[float], means, block: slice, models: list[torch.Tensor],
        fishers: list[torch.Tensor], base: torch.Tensor | None, prior: torch.Tensor | None,
        merged: torch.Tensor, weight: torch.Tensor, denominator: torch.Tensor, value: torch.Tensor | None,
        ctx: MergeContext,
    ) -> None:
        """θ = Σ λ_i F_i θ_i / Σ λ_i F_i (task vectors and the prior F_0 with `base_prior`) on the
        entries `block`, into `merged`; `weight`, `denominator` and `value` are scratch of its size.
        The first model's terms start the sums (no zero-filled buffers)."""
        for i, (lam, fisher, theta) in enumerate(zip(lambdas, fishers, models)):
            # the first model's weight is made in the denominator itself (without a prior, the
            # sum starts as that weight), the others' in `weight`
            w = denominator if i == 0 and prior is None else weight
            if params.floor > 0:
                torch.clamp_min(fisher[block], params.floor * means[i], out=w)
                if params.normalize:
                    w.div_(means[i])
                w.mul_(lam)
            elif params.normalize:
                torch.div(fisher[block], means[i], out=w).mul_(lam)
            else:
                torch.mul(fisher[block], lam, out=w)
            v = torch.sub(theta[block], base[block], out=value) if base is not None else theta[block]
            if i == 0:
                torch.mul(w, v, out=merged)
                if prior is not None:
                    torch.add(prior[block], w, out=denominator)
            else:
                merged.addcmul_(w, v)
                denominator.add_(w)
        merged.div_(denominator)
        uninformed = denominator == 0
        if uninformed.any():
            values = [theta[block] - base[block] if base is not None else theta[block] for theta in models]
            merged.copy_(torch.where(uninformed, self._fallback(params, ctx, lambdas, values), merged))
        if base is not None:
            merged.add_(base[block])

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
