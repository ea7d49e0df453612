"""MaTS (Tam et al. 2024, "Merging by Matching Models in Task Parameter Subspaces").

Merging as one linear system per tensor: θ solves Σ_i C_i θ = Σ_i C_i θ_i, C_i model i's
curvature estimate. The curvature chooses the merge:

- `diagonal`: C_i = diag(F̃_i), the cached diagonal Fisher of every tensor: Fisher merging;
- `gram`: per linear layer C_i = Ã_i ⊗ I, Ã_i the input Gram with off-diagonals scaled by α:
  RegMean, i.e. W Σ Ã_i = Σ W_i Ã_i for a weight W (out × in);
- `kfac`: per linear layer C_i = Ã_i ⊗ G̃_i (the kfac statistic): Σ_i G̃_i W Ã_i = Σ_i G̃_i W_i Ã_i,
  a Sylvester-type system with no closed form for N > 1.

Every system is built and solved in float64 from positive definite parts. Each factor K of each
model is symmetrised, its off-diagonals scaled by α, and damped, K + δ·mean(diag K)·I (a diagonal
Fisher: F + δ·mean(F)); a factor that is still not positive definite then (stored in fp32 from few
examples, so with negative eigenvalues) is projected onto the positive semi-definite cone first,
its negative eigenvalues set to 0. The default δ for K-FAC, 1e-2, was chosen by measurement
(KFAC_DAMPING below): 1e-6 leaves the K-FAC systems of a tiny BERT with condition numbers up to
~1e13, where a small residual says nothing about the error.

The solver is conjugate gradient preconditioned by the system's own closed form where it has one:
diag(Σ F̃_i) for `diagonal`, Σ Ã_i for `gram`, and (Σ G̃_i) ⊗ (Σ Ã_i) / N for `kfac`, inverted in
the eigenbases of the summed factors. That preconditioner is the operator itself for diagonal and
Gram curvature, for one model, and where every model shares one K-FAC factor (then the first step
is the exact solution); otherwise it runs at most `iterations` steps from the `init` merge
(task arithmetic by default, which the paper finds matters) and returns the iterate with the
smallest TRUE relative residual ‖Σ_i C_i(θ − θ_i)‖ / ‖Σ_i C_i θ_i‖ (recomputed from the iterate
every 10 steps: CG's running residual drifts from it). Directions no model's damped curvature reaches
(only with δ = 0) keep the initial merge's value. Recorded per tensor in the artifact's metadata
(`diagnostics.mats`): the curvature, the steps run, the true relative residual at the start and at
the weights returned (after rounding to the model's dtype), and the factors projected onto the
PSD cone. A residual above `max_residual` warns (MatsResidualWarning), naming the tensor and the fix.

Tensors without the chosen curvature (biases, LayerNorms, embeddings for gram/kfac) take the
`fallback` merge. By default (`auto`) that is the same system with damped diagonal Fisher
curvature where diagonal Fishers are given (so `damping` applies to it; it is recorded like the
others), else the `init` merge.
"""

from __future__ import annotations

import dataclasses
import warnings
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
# Default δ by curvature. K-FAC: chosen on rank-deficient factors of tiny BERTs (bench/mats_damping.py,
# README): at 1e-6 condition numbers reach 1e13, at 1e-2 they stay below 1e6 and preconditioned CG
# reaches a float64 residual of 1e-10 in under 200 steps. Diagonal and Gram systems are solved
# exactly by their preconditioner, so δ only guards a singular curvature there.
KFAC_DAMPING, EXACT_DAMPING = 1e-2, 1e-6


class MatsResidualWarning(UserWarning):
    """A tensor's merge is not the solution of its system to within `max_residual`."""


class MatsParams(MethodParams):
    curvature: Literal["diagonal", "gram", "kfac"] = Field(
        "kfac", description="C_i: diagonal (the fisher statistic), gram (input Grams, RegMean) or kfac "
                            "(A ⊗ G per linear layer, the kfac statistic)")
    iterations: int = Field(300, ge=0, description="most preconditioned conjugate-gradient steps per tensor")
    tolerance: float = Field(1e-10, ge=0, allow_inf_nan=False,
                             description="stop early once the true relative residual ‖b − Mθ‖/‖b‖ (float64) is at "
                                         "most this")
    damping: float | None = Field(None, ge=0, allow_inf_nan=False,
                                  description="δ: each curvature factor K becomes K + δ·mean(diag K)·I (a diagonal "
                                              f"Fisher F + δ·mean(F)); default {KFAC_DAMPING:g} for kfac (it makes "
                                              f"the system well-conditioned), {EXACT_DAMPING:g} for diagonal and gram "
                                              "(solved exactly)")
    max_residual: float = Field(1e-6, ge=0, allow_inf_nan=False,
                                description="warn where a tensor's true relative residual ends above this")
    alpha: float = Field(1.0, ge=0, le=1, allow_inf_nan=False,
                         description="scale of the Gram / K-FAC factors' off-diagonal entries (RegMean's α; "
                                     "1: as estimated)")
    init: str = Field("task_arithmetic", description="merge method of the starting point")
    init_params: dict[str, Any] = Field({}, description="its parameters")
    fallback: str = Field("auto", description="merge of tensors without curvature (auto: the damped diagonal "
                                              "Fisher system where Fishers are given, else the init merge)")
    fallback_params: dict[str, Any] = Field({}, description="its parameters")


def damping(params: MatsParams) -> float:
    """δ as given, else the default of the chosen curvature (the fallback's diagonal system shares it)."""
    if params.damping is not None:
        return params.damping
    return KFAC_DAMPING if params.curvature == "kfac" else EXACT_DAMPING


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


@dataclasses.dataclass
class System:
    """Σ_i C_i x = b in float64: `apply` x ↦ Σ_i C_i x, `precondition` an approximate inverse of it
    (exact where the docstring above says), and the maps between x and the weight's layout."""

    apply: Callable[[torch.Tensor], torch.Tensor]
    precondition: Callable[[torch.Tensor], torch.Tensor]
    b: torch.Tensor
    to_weight: Callable[[torch.Tensor], torch.Tensor]
    from_weight: Callable[[torch.Tensor], torch.Tensor]
    clipped: int = 0  # factors projected onto the PSD cone

    def residual(self, x: torch.Tensor) -> float:
        """‖b − Σ C_i x‖ / ‖b‖ (‖b‖ taken as 1 where b = 0)."""
        return float((self.b - self.apply(x)).norm()) / (float(self.b.norm()) or 1.0)


def preconditioned_cg(system: System, x0: torch.Tensor, iterations: int, tolerance: float,
                      check_every: int = 10) -> tuple[torch.Tensor, dict]:
    """CG on `system` from x0, preconditioned by `system.precondition`; the iterate with the smallest
    true relative residual, and {iterations, residual_init, residual} (that iterate's residual).

    CG's running residual drifts from the true one b − Mx in finite precision, and on an
    ill-conditioned system can look converged where the iterate is not: every `check_every` steps,
    at the last and where the running residual reaches `tolerance`, the true residual is computed
    from the iterate (one more product), replaces the running one, and decides which iterate is
    best and whether to stop. Stops after `iterations` steps, at a true residual ≤ `tolerance`, or
    when the search direction has no curvature left (pᵀMp ≤ 0, or a preconditioned residual of 0).
    """
    b_norm = float(system.b.norm()) or 1.0
    x = x0.clone()
    r = system.b - system.apply(x)
    initial = float(r.norm()) / b_norm
    best, best_residual, checked = x.clone(), initial, 0
    z = system.precondition(r)
    p = z.clone()
    rz = float((r * z).sum())
    done = 0
    while done < iterations and best_residual > tolerance and rz > 0:
        mp = system.apply(p)
        curvature = float((p * mp).sum())
        if curvature <= 0:
            break
        x.add_(p, alpha=rz / curvature)
        r.sub_(mp, alpha=rz / curvature)
        done += 1
        if done % check_every == 0 or done == iterations or float(r.norm()) <= tolerance * b_norm:
            r = system.b - system.apply(x)
            residual, checked = float(r.norm()) / b_norm, done
            if residual < best_residual:
                best, best_residual = x.clone(), residual
        z = system.precondition(r)
        rz_next = float((r * z).sum())
        p = z + p * (rz_next / rz)
        rz = rz_next
    if checked != done:  # stopped between checks
        residual = system.residual(x)
        if residual < best_residual:
            best, best_residual = x, residual
    return best, {"iterations": done, "residual_init": initial, "residual": best_residual}


def damped_diagonal(f: torch.Tensor, delta: float) -> torch.Tensor:
    """A diagonal Fisher (the weight's shape) in float64, plus δ·mean(F); negative entries (not a
    Fisher's) are refused by the caller."""
    f = f.double()
    return f + delta * float(f.mean())


def damped_factor(k: torch.Tensor, delta: float, alpha: float) -> tuple[torch.Tensor, bool]:
    """A Kronecker factor in float64: symmetrised, off-diagonals scaled by α, plus δ·mean(diag K)·I;
    and whether it had to be projected onto the PSD cone first (its negative eigenvalues set to 0)
    because the damped factor was not positive definite."""
    k = k.double()
    k = (k + k.T) / 2
    shrunk = k * alpha
    shrunk.diagonal().copy_(k.diagonal())
    eye = torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    lift = delta * float(k.diagonal().mean())
    damped = shrunk + lift * eye
    if int(torch.linalg.cholesky_ex(damped)[1]) == 0:
        return damped, False
    values, vectors = torch.linalg.eigh(shrunk)
    lifted = values.clamp_min(0) + lift
    return (vectors * lifted) @ vectors.T, True


def _pseudo_inverse(values: torch.Tensor) -> torch.Tensor:
    """1/λ where λ is above float64's noise relative to the largest, 0 elsewhere (no direction)."""
    cutoff = float(values.abs().max()) * values.numel() * torch.finfo(torch.float64).eps if values.numel() else 0.0
    return torch.where(values > cutoff, 1 / values, torch.zeros_like(values))


def kronecker_preconditioner(inputs: list[torch.Tensor], outputs: list[torch.Tensor] | None):
    """X ↦ N·(Σ G̃)⁺ X (Σ Ã)⁺, the inverse of X ↦ (Σ G̃) X (Σ Ã) / N in the eigenbases of the sums
    (G̃ = I where outputs is None). It equals the operator Σ G̃_i X Ã_i for one model or where all
    G̃_i or all Ã_i are equal."""
    count = len(inputs)
    a_values, a_vectors = torch.linalg.eigh(torch.stack(inputs).sum(0))
    if outputs is None:
        a_inverse = _pseudo_inverse(a_values)
        return lambda r: ((r @ a_vectors) * a_inverse) @ a_vectors.T
    g_values, g_vectors = torch.linalg.eigh(torch.stack(outputs).sum(0))
    inverse = count * _pseudo_inverse(torch.outer(g_values, a_values))
    return lambda r: g_vectors @ ((g_vectors.T @ r @ a_vectors) * inverse) @ a_vectors.T


@register
class Mats(MergeMethod):
    name = "mats"
    description = ("MaTS: per tensor, solve Σ C_i θ = Σ C_i θ_i by preconditioned conjugate gradient from a named "
                   "merge, C_i the diagonal Fisher, input Gram or K-FAC of model i.")
    Params = MatsParams
    needs_base = False
    version = 2

    def _inners(self, params: MatsParams) -> list[tuple[MergeMethod, MethodParams]]:
        inners = [_inner(params.init, params.init_params, "init")]
        if params.fallback != "auto":
            inners.append(_inner(params.fallback, params.fallback_params, "fallback"))
        return inners

    def base_needed(self, params: MatsParams) -> bool:
        return any(m.base_needed(p) for m, p in self._inners(params))

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
        curvature = params.curvature
        system = _system(group, params, curvature)
        if system is None and params.fallback == "auto" and curvature != "diagonal":
            curvature = "diagonal"
            system = _system(group, params, curvature)
        if system is None:
            return self._fallback(shared, params, ctx)
        init_method, init_params = _inner(params.init, params.init_params, "init")
        x0 = system.from_weight(init_method.merge(shared, init_params, ctx).double())
        x, record = preconditioned_cg(system, x0, params.iterations, params.tolerance)
        merged = system.to_weight(x).to(group.models[0].dtype)
        if not bool(torch.isfinite(merged).all()):
            raise ModelError(f"Tensor '{group.name}': MaTS' solution holds NaN or Inf (beyond the model's dtype?); "
                             f"raise 'damping' or check the statistics.")
        # the residual of what is returned, after rounding to the model's dtype
        record = {"curvature": curvature, **record, "residual": system.residual(system.from_weight(merged.double())),
                  "clipped_factors": system.clipped}
        ctx.diagnostics.setdefault("mats", {})[group.name] = record
        if record["residual"] > params.max_residual:
            warnings.warn(
                f"MaTS: tensor '{group.name}': relative residual {record['residual']:.3g} after {record['iterations']} "
                f"steps (from {record['residual_init']:.3g}) is above max_residual {params.max_residual:g}, so this "
                f"merge is not the solution of its {curvature} system. Raise 'iterations' (now {params.iterations}) "
                f"or 'damping' (now {damping(params):g}; it makes the system better conditioned), or raise "
                f"'max_residual' to accept it.", MatsResidualWarning, stacklevel=2)
        return merged

    def _fallback(self, group: TensorGroup, params: MatsParams, ctx: MergeContext) -> torch.Tensor:
        if params.fallback == "auto":
            method, p = _inner(params.init, params.init_params, "init")
        else:
            method, p = _inner(params.fallback, params.fallback_params, "fallback")
        if method.base_needed(p) and group.base is None:
            raise ModelError(f"Tensor '{group.name}': fallback '{method.name}' needs the base model.")
        return method.merge(group, p, ctx)


def _system(group: TensorGroup, params: MatsParams, curvature: str) -> System | None:
    """The float64 system of this tensor under `curvature`, or None where it has no such statistic.
    x is the weight itself for diagonal curvature, out × in for linear layers."""
    delta, alpha, stats = damping(params), params.alpha, group.stats
    if curvature == "diagonal":
        if "fisher" not in stats:
            return None
        for f in _checked(stats["fisher"], group, "Fisher"):
            if float(f.min()) < 0:
                raise ModelError(f"Tensor '{group.name}': a diagonal Fisher has negative entries, so it is not "
                                 f"a Fisher; recompute the fisher step.")
        fishers = [damped_diagonal(f, delta) for f in stats["fisher"]]
        total = torch.stack(fishers).sum(0)
        b = sum(f * w.double() for f, w in zip(fishers, group.models))
        inverse = torch.where(total > 0, 1 / total, torch.zeros_like(total))
        return System(lambda x: total * x, lambda r: r * inverse, b, lambda x: x, lambda w: w)
    if curvature == "gram":
        key = GRAM_OUT_IN if GRAM_OUT_IN in stats else GRAM_IN_OUT if GRAM_IN_OUT in stats else None
        if key is None:
            return None
        inputs, clipped = _factors(_checked(stats[key], group, "Gram"), delta, alpha)
        outputs = None
    else:
        key = KFAC_A if KFAC_A in stats else KFAC_A_IN_OUT if KFAC_A_IN_OUT in stats else None
        if key is None:
            return None
        g_key = KFAC_G if key == KFAC_A else KFAC_G_IN_OUT
        if g_key not in stats:
            raise ModelError(f"Tensor '{group.name}' has K-FAC input factors but no output factors; "
                             f"recompute the kfac step.")
        inputs, clipped = _factors(_checked(stats[key], group, "K-FAC input factor"), delta, alpha)
        outputs, clipped_g = _factors(_checked(stats[g_key], group, "K-FAC output factor"), delta, alpha)
        clipped += clipped_g
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
        apply = lambda x: x @ total  # noqa: E731
    else:
        b = sum(g @ w @ a for g, w, a in zip(outputs, weights, inputs))
        apply = lambda x: sum(g @ x @ a for g, a in zip(outputs, inputs))  # noqa: E731
    precondition = kronecker_preconditioner(inputs, outputs)
    flip = (lambda x: x.T) if transposed else (lambda x: x)
    return System(apply, precondition, b, flip, flip, clipped)


def _factors(stats: list[torch.Tensor], delta: float, alpha: float) -> tuple[list[torch.Tensor], int]:
    """The damped factors and how many were projected onto the PSD cone."""
    damped = [damped_factor(k, delta, alpha) for k in stats]
    return [k for k, _ in damped], sum(c for _, c in damped)


def _checked(stats: list[torch.Tensor], group: TensorGroup, what: str) -> list[torch.Tensor]:
    if len(stats) != len(group.models):
        raise ModelError(f"Tensor '{group.name}': {len(stats)} {what}s for {len(group.models)} models.")
    for s in stats:
        if not bool(torch.isfinite(s).all()):
            raise ModelError(f"Tensor '{group.name}': a {what} holds NaN or Inf; recompute that statistic.")
    return stats
