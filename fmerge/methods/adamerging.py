"""AdaMerging (Yang et al. 2024): learn the coefficients Λ of θ(Λ) = θ_0 + Σ_i Λ_{i,p} τ_{i,p}.

Task-wise Λ has one coefficient per model, layer-wise one per model and tensor p. Λ minimises a
loss (prediction entropy on unlabelled data, or cross-entropy with labels) by Adam.

Pure: dicts of tensors in and out, never files or recipes. The loss is reached through a callback
returning the loss at a body θ and its gradient ∂L/∂θ; the chain rule ∂L/∂Λ_{i,p} = ⟨∂L/∂θ_p,
τ_{i,p}⟩ then gives the coefficients' gradient, so no autograd graph spans the N task vectors and
the caller's batched forward/backward through the network is the only backward pass.

Constraints are applied after every Adam step (projected gradient): `clamp` to [0, 1] (the
original paper; FusionBench does not clamp), or `simplex`: each tensor's coefficients over the
models projected on the probability simplex (Euclidean, sort-based).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

Body = dict[str, torch.Tensor]
# (body θ, draw index, task names) -> (mean loss over those tasks, ∂loss/∂θ with θ's names).
GradientFn = Callable[[Body, int, Sequence[str]], tuple[float, Body]]
# () -> task -> accuracy on the examples of the GradientFn's last call ({} where it has no labels).
AccuracyFn = Callable[[], dict[str, float]]
Granularity = Literal["task", "layer"]


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of `v` (last dimension) on {x ≥ 0, Σx = 1}.

    Sort-based (Held et al. 1974; Duchi et al. 2008): with u sorted descending and ρ the largest
    k such that u_k − (Σ_{j≤k} u_j − 1)/k > 0, the projection is max(v − θ, 0) with
    θ = (Σ_{j≤ρ} u_j − 1)/ρ.
    """
    u = torch.sort(v, dim=-1, descending=True).values
    excess = torch.cumsum(u, dim=-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = (u - excess / k > 0).sum(dim=-1, keepdim=True)  # ≥ 1: the largest entry always passes
    theta = torch.gather(excess, -1, rho - 1) / rho.to(v.dtype)
    return torch.clamp(v - theta, min=0)


def init_coefficients(n_models: int, n_tensors: int, granularity: Granularity, value: float,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Λ filled with `value`: shape (N,) task-wise, (N, P) layer-wise (P tensors in `names` order)."""
    shape = (n_models,) if granularity == "task" else (n_models, n_tensors)
    return torch.full(shape, float(value), dtype=torch.float32, device=device)


def _coefficient(coeffs: torch.Tensor, i: int, j: int) -> torch.Tensor:
    return coeffs[i] if coeffs.ndim == 1 else coeffs[i, j]


def merge_body(base: Body, vectors: Sequence[Body], coeffs: torch.Tensor, names: Sequence[str]) -> Body:
    """θ_p = θ_0,p + Σ_i Λ_{i,p} τ_{i,p} for each tensor name p (Λ_{i,p} = Λ_i task-wise)."""
    body = {}
    for j, name in enumerate(names):
        merged = base[name].clone()
        for i, vector in enumerate(vectors):
            merged.add_(vector[name] * _coefficient(coeffs, i, j))
        body[name] = merged
    return body


def coefficient_gradient(grad: Body, vectors: Sequence[Body], names: Sequence[str],
                         granularity: Granularity) -> torch.Tensor:
    """∂L/∂Λ from ∂L/∂θ: ⟨g_p, τ_{i,p}⟩ per (model, tensor), summed over tensors task-wise."""
    columns = []
    for name in names:
        g = grad[name].double()
        columns.append(torch.stack([torch.sum(g * vector[name].double()) for vector in vectors]))
    out = torch.stack(columns, dim=1).cpu()  # (N, P), one transfer from the device
    return (out.sum(dim=1) if granularity == "task" else out).float()


def accuracy_entry(accuracy_fn: AccuracyFn | None) -> dict:
    """The trace keys `task_accuracy` (per task) and `accuracy` (their mean), or none without labels."""
    per_task = accuracy_fn() if accuracy_fn else {}
    if not per_task:
        return {}
    return {"accuracy": sum(per_task.values()) / len(per_task), "task_accuracy": per_task}


def constrain(coeffs: torch.Tensor, clamp: bool, simplex: bool) -> torch.Tensor:
    """Project Λ on its feasible set: per tensor on the simplex over models, or into [0, 1]."""
    if simplex:
        return project_simplex(coeffs.T).T if coeffs.ndim == 2 else project_simplex(coeffs)
    if clamp:
        return coeffs.clamp(0.0, 1.0)
    return coeffs


@dataclass
class AdaMergingResult:
    coefficients: torch.Tensor            # (N,) or (N, P), after the last step
    body: Body                            # θ(Λ) at those coefficients
    trace: list[dict] = field(default_factory=list)


def adamerging(
    base: Body,
    vectors: Sequence[Body],
    gradient_fn: GradientFn,
    *,
    names: Sequence[str],
    tasks: Sequence[str],
    granularity: Granularity = "layer",
    steps: int = 100,
    lr: float = 1e-3,
    init: float = 0.3,
    clamp: bool = False,
    simplex: bool = False,
    first_draw: int = 0,
    on_step: Callable[[], None] | None = None,
    accuracy_fn: AccuracyFn | None = None,
) -> AdaMergingResult:
    """Adam on Λ for `steps` steps; step s reads draw `first_draw + s` of each task's data.

    Row s of the trace describes one state, the coefficients Λ_s before step s: the loss, the
    accuracy (`accuracy_fn`, if it knows any), the gradient norm and the mean coefficient there.
    The coefficients after the last step are the result's.
    Memory: the merged body and its gradient, each dropped before the next is made.
    """
    coeffs = constrain(init_coefficients(len(vectors), len(names), granularity, init), clamp, simplex)
    coeffs.requires_grad_(True)
    optimizer = torch.optim.Adam([coeffs], lr=lr)
    trace = []
    device = base[names[0]].device
    for step in range(steps):
        body = merge_body(base, vectors, coeffs.detach().to(device), names)
        loss, grad = gradient_fn(body, first_draw + step, tasks)
        accuracy = accuracy_entry(accuracy_fn)
        del body
        coeffs.grad = coefficient_gradient(grad, vectors, names, granularity)
        del grad
        trace.append({"iteration": step, "loss": loss, **accuracy, "grad_norm": float(coeffs.grad.norm()),
                      "coef_mean": float(coeffs.detach().mean())})  # all at Λ_s, before its update
        optimizer.step()
        with torch.no_grad():
            coeffs.copy_(constrain(coeffs, clamp, simplex))
        if on_step:
            on_step()
    final = coeffs.detach()
    return AdaMergingResult(final, merge_body(base, vectors, final.to(device), names), trace)
