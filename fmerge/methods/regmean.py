"""RegMean (Jin et al. 2023): merge each linear layer so that it best reproduces every model's
outputs on that model's own inputs; average everything else.

For a layer y = x Wᵀ, minimising Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² gives (Σ_i G_i) Wᵀ = Σ_i G_i W_iᵀ with
G_i = X_iᵀX_i, the Gram of the layer's inputs on model i's data. Each G_i first has its
off-diagonal entries scaled by α (G̃ = α G + (1 − α) diag G): α = 1 is the exact least-squares
merge, α = 0 keeps only the diagonal, which makes every input column of W an average of the
models' columns weighted by that input feature's energy Σ_t x_t². Tensors without Grams (biases,
LayerNorm, embeddings) get the plain mean.

The system is solved in float64 by Cholesky, never with an inverse. A relative ridge toward the
plain average, λ = jitter · mean(diag Σ G̃), i.e. (Σ G̃ + λI) Wᵀ = Σ G̃ W_iᵀ + λ W̄ᵀ, keeps the
solve defined when Σ G̃ is singular: input directions no data reached take the plain average
rather than 0 (a ridge toward 0 would zero those weights). If the factorisation still fails, the
ridge is raised to 1e-6, 1e-4 and 1e-2 in turn with a `RegMeanJitterWarning` naming the tensor;
if none works (non-finite Grams) the merge stops with an FmergeError naming the tensor. A layer
whose Grams are all 0 (no data reached it in any model) takes the plain average.
"""

from __future__ import annotations

import warnings

import torch
from pydantic import Field

from ..errors import ModelError, RecipeError
from .base import MergeContext, MergeMethod, MethodParams, TensorGroup, register

# Statistics served by the `gram` step, by how the merged weight stores its input dimension.
GRAM_OUT_IN, GRAM_IN_OUT, GRAM_ROWS = "gram", "gram_in_out", "gram_rows"
JITTER_LADDER = (1e-6, 1e-4, 1e-2)


class RegMeanJitterWarning(UserWarning):
    """Σ G̃ was not positive definite at the configured jitter; a larger one was used."""


class RegMeanParams(MethodParams):
    alpha: float = Field(
        0.6,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Scale of the Grams' off-diagonal entries (1: exact least squares, 0: diagonal "
        "only). 0.6 is the setting of FusionBench's published RegMean figures.",
    )
    normalize: bool = Field(
        False,
        description="Divide each model's Gram by its number of input rows (tokens), so a task with "
        "longer texts or more examples does not weigh more.",
    )
    jitter: float = Field(
        1e-8,
        ge=0,
        allow_inf_nan=False,
        description="Relative ridge toward the plain average: λ = jitter × mean diagonal of Σ G̃.",
    )


@register
class RegMean(MergeMethod):
    name = "regmean"
    description = "RegMean: per linear layer, the least-squares merge on each model's input Grams."
    Params = RegMeanParams
    needs_base = False
    needs_stats = ("gram",)
    version = 1

    def merge(self, group: TensorGroup, params: RegMeanParams, ctx: MergeContext, state=None) -> torch.Tensor:
        if GRAM_OUT_IN in group.stats:
            weights = [w.T for w in group.models]  # nn.Linear stores out × in
            grams, transposed = group.stats[GRAM_OUT_IN], True
        elif GRAM_IN_OUT in group.stats:
            weights, grams, transposed = group.models, group.stats[GRAM_IN_OUT], False
        else:
            return torch.stack(group.models).mean(0)
        if params.normalize:
            rows = group.stats.get(GRAM_ROWS)
            if rows is None:
                raise ModelError(f"Tensor '{group.name}': normalize needs each Gram's row count "
                                  f"('{GRAM_ROWS}'), which the statistics do not provide.")
            grams = [g / r.reshape(()) if float(r.reshape(())) > 0 else g for g, r in zip(grams, rows)]
        merged = regmean_solve(weights, grams, params.alpha, params.jitter, group.name)
        return (merged.T if transposed else merged).to(group.models[0].dtype)


def regmean_solve(
    weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float, jitter: float, name: str
) -> torch.Tensor:
    """W minimising Σ_i ‖X_i W − X_i W_i‖² with shrunk Grams; weights are in × out."""
    if len(weights) != len(grams):
        raise ModelError(f"Tensor '{name}': {len(grams)} Gram matrices for {len(weights)} models.")
    n_in = weights[0].shape[0]
    lhs = torch.zeros(n_in, n_in, dtype=torch.float64, device=weights[0].device)
    rhs = torch.zeros(weights[0].shape, dtype=torch.float64, device=weights[0].device)
    for w, g in zip(weights, grams):
        if g.shape != (n_in, n_in):
            raise ModelError(f"Tensor '{name}': its Gram is {list(g.shape)} but the weight has {n_in} "
                              f"inputs; the Grams were computed on another architecture.")
        g = g.double()
        shrunk = g * alpha
        shrunk.diagonal().copy_(g.diagonal())
        lhs += shrunk
        rhs += shrunk @ w.double()
    average = torch.stack(weights).double().mean(0)
    if not bool(torch.isfinite(lhs).all() and torch.isfinite(rhs).all()):
        raise ModelError(f"Tensor '{name}': the Gram matrices or weights hold NaN or Inf; recompute "
                          f"the gram step (and check the models with `fmerge verify`).")
    if float(lhs.diagonal().min()) < 0:
        raise ModelError(f"Tensor '{name}': its Gram matrices have negative diagonal entries, so they "
                          f"are not Grams of any inputs; recompute the gram step.")
    scale = float(lhs.diagonal().mean())
    if scale == 0:
        return average  # no data reached this layer in any model: nothing to weigh by
    eye = torch.eye(n_in, dtype=torch.float64, device=lhs.device)
    for attempt, eps in enumerate((jitter,) + tuple(j for j in JITTER_LADDER if j > jitter)):
        factor, info = torch.linalg.cholesky_ex(lhs + eps * scale * eye)
        if int(info) == 0:
            solution = torch.cholesky_solve(rhs + eps * scale * average, factor)
            if bool(torch.isfinite(solution).all()):
                if attempt:
                    warnings.warn(f"RegMean: tensor '{name}': Σ G̃ is not positive definite with jitter "
                                  f"{jitter:g}; solved with relative jitter {eps:g}.", RegMeanJitterWarning,
                                  stacklevel=2)
                return solution
    raise RecipeError(f"Tensor '{name}': RegMean's system is not solvable even with relative jitter "
                      f"{JITTER_LADDER[-1]:g}; lower 'alpha' or raise 'jitter', or check the Grams.")
