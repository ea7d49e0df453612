"""MaTS (Tam et al. 2024, "Merging by Matching Models in Task Parameter Subspaces").

Merging as one linear system per tensor: θ solves Σ_i C_i θ = Σ_i C_i θ_i, C_i model i's
curvature estimate. The curvature chooses the merge:

- `diagonal`: C_i = diag(F_i), the cached diagonal Fisher of every tensor: Fisher merging;
- `gram`: per linear layer C_i = Ã_i ⊗ I, Ã_i the input Gram with off-diagonals scaled by α:
  RegMean, i.e. W Σ Ã_i = Σ W_i Ã_i for a weight W (out × in);
- `kfac`: per linear layer C_i = Ã_i ⊗ G̃_i (the kfac statistic): Σ_i G̃_i W Ã_i = Σ_i G̃_i W_i Ã_i,
  a Sylvester-type system with no closed form for N > 1.

Each system is solved by conjugate gradient (the operator is a sum of symmetric positive
semi-definite terms) in float64, for at most `iterations` steps, from a named merge (`init`,
default task arithmetic, which the paper finds matters), preconditioned by the operator's own
diagonal (Jacobi: Σ_i diag G̃_i diag Ã_iᵀ), which makes the diagonal case exact in one step. Each
factor K of each model is damped, K + δ·mean(diag K)·I, so that a model whose factor is singular
still has a well-posed system; directions no model's curvature reaches keep the initial merge's
value (CG never moves them). The relative residual ‖b − Mθ‖/‖b‖ at the start and the end, and the
iterations run, are recorded per tensor in the artifact's metadata (`diagnostics.mats`).

Tensors without the chosen curvature (biases, LayerNorms, embeddings for gram/kfac) take the
`fallback` merge: by default Fisher merging where diagonal Fishers are given, else task arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from ..errors import ModelError, RecipeError
from .base import REGISTRY, MergeContext, MergeMethod, MethodParams, TensorGroup, register
from .regmean import GRAM_IN_OUT, GRAM_OUT_IN

# Statistics served by the `kfac` step, by how the merged weight stores its input dimension.
KFAC_A, KFAC_G = "kfac_a", "kfac_g"
KFAC_A_IN_OUT, KFAC_G_IN_OUT = "kfac_a_in_out", "kfac_g_in_out"
STATISTIC = {"diagonal": "fisher", "gram": "gram", "kfac": "kfac"}


class MatsParams(MethodParams):
    curvature: Literal["diagonal", "gram", "kfac"] = Field(
        "kfac", description="C_i: diagonal (the fisher statistic), gram (input Grams, RegMean) or kfac "
                            "(A ⊗ G per linear layer, the kfac statistic)")
    iterations: int = Field(100, ge=0, description="most conjugate-gradient steps per tensor")
    tolerance: float = Field(1e-8, ge=0, allow_inf_nan=False,
                             description="stop early once the relative residual ‖b − Mθ‖/‖b‖ is at most this")
    damping: float = Field(1e-6, ge=0, allow_inf_nan=False,
                           description="δ: each curvature factor K becomes K + δ·mean(diag K)·I")
    alpha: float = Field(1.0, ge=0, le=1, allow_inf_nan=False,
                         description="scale of the Gram / K-FAC factors' off-diagonal entries (RegMean's α; "
                                     "1: as estimated)")
    init: str = Field("task_arithmetic", description="merge method of the starting point")
    init_params: dict[str, Any] = Field({}, description="its parameters")
    fallback: str = Field("auto", description="merge method of tensors without curvature (auto: fisher "
                                              "where diagonal Fishers are given, else task_arithmetic)")
    fallback_params: dict[str, Any] = Field({}, description="its parameters")


def _inner(method: str, raw: dict, key: str) -> tuple[MergeMethod, MethodParams]:
    if method == "mats":
        raise RecipeError(f"Parameter '{key}' cannot be 'mats' itself; name another merge method.")
    if method not in REGISTRY:
        raise RecipeError(f"Parameter '{key}' names unknown merge method '{method}'; known: "
                          f"{', '.join(sorted(REGISTRY))}.")
    inner = REGISTRY[method]
    try:
        return inner, inner.Params.model_validate(raw)
    except ValueError as exc:
        raise RecipeError(f"Parameter '{key}_params' is not valid for method '{method}': {exc}") from None


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor,
                       diagonal: torch.Tensor, iterations: int, tolerance: float) -> tuple[torch.Tensor, dict]:
    """Jacobi-preconditioned CG for M x = b (M symmetric PSD, given as `apply`) from x0.

    The preconditioner divides by M's diagonal where positive (1 elsewhere). Stops after
    `iterations` steps, at relative residual ≤ `tolerance`, or when a search direction has no
    curvature (pᵀMp ≤ 0: it lies in M's null space). Returns x and {iterations, residual_init,
    residual} (relative to ‖b‖, recomputed from x at the end).
    """
    scale = diagonal.where(diagonal > 0, torch.ones_like(diagonal))
    b_norm = float(b.norm()) or 1.0
    x = x0.clone()
    r = b - apply(x)
    initial = float(r.norm()) / b_norm
    z = r / scale
    p = z.clone()
    rz = float((r * z).sum())
    done = 0
    for _ in range(iterations):
        if float(r.norm()) <= tolerance * b_norm:
            break
        mp = apply(p)
        curvature = float((p * mp).sum())
        if curvature <= 0:
            break
        step = rz / curvature
        x.add_(p, alpha=step)
        r.sub_(mp, alpha=step)
        z = r / scale
        rz_next = float((r * z).sum())
        p = z + p * (rz_next / rz) if rz != 0 else z
        rz = rz_next
        done += 1
    final = float((b - apply(x)).norm()) / b_norm
    return x, {"iterations": done, "residual_init": initial, "residual": final}


def damped_diagonal(f: torch.Tensor, delta: float) -> torch.Tensor:
    """A diagonal Fisher (the weight's shape) in float64, plus δ·mean(F)."""
    f = f.double()
    return f + delta * float(f.mean())


def damped_factor(k: torch.Tensor, delta: float, alpha: float) -> torch.Tensor:
    """A Kronecker factor (square) in float64, off-diagonals scaled by α, plus δ·mean(diag K)·I."""
    k = k.double()
    out = k * alpha
    out.diagonal().copy_(k.diagonal() + delta * float(k.diagonal().mean()))
    return out


@register
class Mats(MergeMethod):
    name = "mats"
    description = ("MaTS: per tensor, solve Σ C_i θ = Σ C_i θ_i by conjugate gradient from a named merge, "
                   "C_i the diagonal Fisher, input Gram or K-FAC of model i.")
    Params = MatsParams
    needs_base = False
    version = 1

    def _inners(self, params: MatsParams) -> list[tuple[MergeMethod, MethodParams]]:
        inners = [_inner(params.init, params.init_params, "init")]
        if params.fallback != "auto":
            inners.append(_inner(params.fallback, params.fallback_params, "fallback"))
        return inners

    def base_needed(self, params: MatsParams) -> bool:
        return params.fallback == "auto" or any(m.base_needed(p) for m, p in self._inners(params))

    def stats_needed(self, params: MatsParams) -> tuple[str, ...]:
        needed = [STATISTIC[params.curvature]]
        for method, p in self._inners(params):
            needed += [s for s in method.stats_needed(p) if s not in needed]
        return tuple(needed)

    def validate(self, params: MatsParams, ctx: MergeContext) -> None:
        if params.fallback == "auto" and params.fallback_params:
            raise RecipeError("Parameter 'fallback_params' needs a named 'fallback' method (not auto).")
        for method, p in self._inners(params):
            method.validate(p, ctx)

    def merge(self, group: TensorGroup, params: MatsParams, ctx: MergeContext, state=None) -> torch.Tensor:
        shared = dataclasses.replace(group, models_owned=False)  # inner methods must not reuse our inputs
        system = self._system(group, params)
        if system is None:
            return self._fallback(shared, params, ctx)
        apply, b, diagonal, to_weight, from_weight = system
        init_method, init_params = _inner(params.init, params.init_params, "init")
        x0 = from_weight(init_method.merge(shared, init_params, ctx).double())
        x, record = conjugate_gradient(apply, b, x0, diagonal, params.iterations, params.tolerance)
        ctx.diagnostics.setdefault("mats", {})[group.name] = record
        return to_weight(x).to(group.models[0].dtype)

    def _fallback(self, group: TensorGroup, params: MatsParams, ctx: MergeContext) -> torch.Tensor:
        if params.fallback != "auto":
            method, p = _inner(params.fallback, params.fallback_params, "fallback")
        elif "fisher" in group.stats:
            method, p = _inner("fisher", {}, "fallback")
        else:
            method, p = _inner("task_arithmetic", {}, "fallback")
        if method.base_needed(p) and group.base is None:
            raise ModelError(f"Tensor '{group.name}': fallback '{method.name}' needs the base model.")
        return method.merge(group, p, ctx)

    @staticmethod
    def _system(group: TensorGroup, params: MatsParams):
        """(apply, b, diag of the operator, x -> weight, weight -> x) in float64, or None where this
        tensor has no curvature of the chosen kind. x is out × in for linear layers."""
        delta, alpha, stats = params.damping, params.alpha, group.stats
        if params.curvature == "diagonal":
            if "fisher" not in stats:
                return None
            fishers = [damped_diagonal(f, delta) for f in _checked(stats["fisher"], group, "Fisher")]
            total = torch.stack(fishers).sum(0)
            b = sum(f * w.double() for f, w in zip(fishers, group.models))
            return (lambda x: total * x), b, total, (lambda x: x), (lambda w: w)
        if params.curvature == "gram":
            key = GRAM_OUT_IN if GRAM_OUT_IN in stats else GRAM_IN_OUT if GRAM_IN_OUT in stats else None
            if key is None:
                return None
            inputs = [damped_factor(a, delta, alpha) for a in _checked(stats[key], group, "Gram")]
            outputs = None
        else:
            key = KFAC_A if KFAC_A in stats else KFAC_A_IN_OUT if KFAC_A_IN_OUT in stats else None
            if key is None:
                return None
            g_key = KFAC_G if key == KFAC_A else KFAC_G_IN_OUT
            if g_key not in stats:
                raise ModelError(f"Tensor '{group.name}' has K-FAC input factors but no output factors; "
                                 f"recompute the kfac step.")
            inputs = [damped_factor(a, delta, alpha) for a in _checked(stats[key], group, "K-FAC input factor")]
            outputs = [damped_factor(g, delta, alpha) for g in _checked(stats[g_key], group, "K-FAC output factor")]
        transposed = key in (GRAM_IN_OUT, KFAC_A_IN_OUT)  # weight stored in × out: solve on its transpose
        weights = [(w.T if transposed else w).double() for w in group.models]
        out_dim, in_dim = weights[0].shape
        for a in inputs:
            if a.shape != (in_dim, in_dim):
                raise ModelError(f"Tensor '{group.name}': its input factor is {list(a.shape)} but the weight "
                                 f"has {in_dim} inputs; the statistics come from another architecture.")
        for g in outputs or []:
            if g.shape != (out_dim, out_dim):
                raise ModelError(f"Tensor '{group.name}': its output factor is {list(g.shape)} but the weight "
                                 f"has {out_dim} outputs; the statistics come from another architecture.")
        if outputs is None:
            total = torch.stack(inputs).sum(0)
            b = sum(w @ a for w, a in zip(weights, inputs))
            diagonal = total.diagonal().expand(out_dim, in_dim)
            apply = lambda x: x @ total  # noqa: E731
        else:
            b = sum(g @ w @ a for g, w, a in zip(outputs, weights, inputs))
            diagonal = sum(torch.outer(g.diagonal(), a.diagonal()) for g, a in zip(outputs, inputs))
            apply = lambda x: sum(g @ x @ a for g, a in zip(outputs, inputs))  # noqa: E731
        if transposed:
            return apply, b, diagonal, (lambda x: x.T), (lambda w: w.T)
        return apply, b, diagonal, (lambda x: x), (lambda w: w)


def _checked(stats: list[torch.Tensor], group: TensorGroup, what: str) -> list[torch.Tensor]:
    if len(stats) != len(group.models):
        raise ModelError(f"Tensor '{group.name}': {len(stats)} {what}s for {len(group.models)} models.")
    for s in stats:
        if not bool(torch.isfinite(s).all()):
            raise ModelError(f"Tensor '{group.name}': a {what} holds NaN or Inf; recompute that statistic.")
    return stats
