"""Frank-Wolfe merging (Chen et al. 2025), hard and soft, as pure functions on dicts of tensors.

The iterate x_t is a merged body (tensor name -> tensor). Each candidate model s has a vertex
v_s = merge_fn(s) (task arithmetic with λ = 1: θ_s itself; TIES: θ_0 + trim(τ_s), a one-model
TIES merge being the trimmed task vector) and raw weights θ_s. At x_t:

1. g = ∂L/∂x from the caller's callback (batched forward/backward on each task's data);
2. a linear minimisation oracle scores every candidate: `cosine` Σ_p cos(g_p, θ_{s,p}) over
   tensors (FusionBench's, on the raw weights), or `linear` Σ_p ⟨g_p, v_{s,p} − x_{t,p}⟩ (the
   textbook FW oracle). A tensor where g or the other operand has zero norm scores 0: it does
   not vote (FusionBench divides by zero there and selects on NaN). Nor does a tensor whose
   gradient norm is at most `grad_noise_rtol` times the largest tensor gradient norm: its
   gradient is rounding noise (attention key biases have a true gradient of exactly 0, since
   softmax ignores a shift shared by a row of scores), and a cosine normalises noise into a full
   ±1 vote. `layer` granularity picks a candidate per tensor; ties go to the first candidate in order;
3. hard: x_{t+1} = x_t + γ_t (v − x_t) with γ_t = 2/(t+2)·step_size and no other factor
   (FusionBench multiplies every step by a hidden 0.3); soft: each task picks a candidate not
   yet picked in this iteration, then layer-wise AdaMerging learns x_{t+1} = x_t +
   Σ_k Λ_{k,p} (v_{k,p} − x_{t,p}) over the picks.

Vertices, raw weights and x_0 may be mappings that make each tensor when asked (the step streams
them from files and cached task vectors): they are read tensor by tensor and never copied whole,
so the memory held is the iterate and its gradient (hard), plus the sum of the tasks' gradients
or the inner AdaMerging's merged body (soft), and what the caller keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Iterable, Literal, Sequence

import torch

from .adamerging import AccuracyFn, Body, GradientFn, accuracy_entry, adamerging

Oracle = Literal["cosine", "linear"]
Granularity = Literal["task", "layer"]

# float32's machine epsilon: a tensor gradient smaller than the rounding unit of the largest
# cannot be told from rounding. Measured on a 2-layer BERT (hidden 32 and 384, fp32): attention
# key biases (true gradient 0) at 1e-12..5e-11 of the largest norm, the smallest genuine
# gradient (query biases) at 5e-6..2e-4, both far from this threshold.
GRAD_NOISE_RTOL = float(torch.finfo(torch.float32).eps)  # 1.19e-7


def step_size_at(t: int, step_size: float) -> float:
    """γ_t = 2/(t+2)·step_size: the standard open-loop FW schedule, scaled once, by the user."""
    return 2.0 / (t + 2) * step_size


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) in float64; 0 where either has zero norm (no direction to compare)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return torch.zeros((), dtype=torch.float64, device=a.device)
    return torch.dot(a, b) / (na * nb)


def voting_tensors(grad: Body, names: Sequence[str], rtol: float) -> list[bool]:
    """Per tensor, whether its gradient norm exceeds `rtol` × the largest: the others are noise."""
    norms = [float(grad[n].double().norm()) for n in names]
    threshold = rtol * max(norms, default=0.0)
    return [norm > threshold for norm in norms]


def oracle_scores(grad: Body, current: Body, vertices: Sequence[Body], raw: Sequence[Body],
                  names: Sequence[str], oracle: Oracle, grad_noise_rtol: float = GRAD_NOISE_RTOL) -> torch.Tensor:
    """Per-candidate, per-tensor scores (C, P) in float64 on the CPU; lower is better.

    Tensors whose gradient is noise (`voting_tensors`) score 0 for every candidate."""
    votes = voting_tensors(grad, names, grad_noise_rtol)
    zero = torch.zeros((), dtype=torch.float64)
    rows = []
    for vertex, weights in zip(vertices, raw):
        if oracle == "cosine":
            row = [cosine(grad[n], weights[n]).cpu() if v else zero for n, v in zip(names, votes)]
        else:
            row = [torch.sum(grad[n].double() * (vertex[n].double() - current[n].double())).cpu() if v else zero
                   for n, v in zip(names, votes)]
        rows.append(torch.stack(row))
    return torch.stack(rows)


def select(scores: torch.Tensor, granularity: Granularity, taken: torch.Tensor | None = None) -> list[int]:
    """The chosen candidate per tensor (P entries; all equal task-wise), skipping `taken` (C, P).

    Task-wise the candidate minimising the sum of its tensor scores; layer-wise per tensor.
    argmin returns the first minimum, so ties go to the earliest candidate.
    """
    masked = scores if taken is None else scores.masked_fill(taken, math.inf)
    if granularity == "task":
        return [int(torch.argmin(masked.sum(dim=1)))] * scores.shape[1]
    return [int(i) for i in torch.argmin(masked, dim=0)]


class Direction(Mapping):
    """v − x, where v is the point whose tensor p is the chosen candidate's vertex at p: made per
    tensor when asked, so that K picks do not hold K differences of whole bodies."""

    def __init__(self, vertices: Sequence[Mapping[str, torch.Tensor]], choice: Sequence[int], x: Body,
                 names: Sequence[str]):
        self.vertices, self.x, self.names = vertices, x, list(names)
        self.choice = dict(zip(self.names, choice))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.vertices[self.choice[name]][name] - self.x[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def chosen_summary(choice: Sequence[int], model_names: Sequence[str], granularity: Granularity) -> str:
    """'b' task-wise; 'a:3 b:9' (tensors per model) layer-wise, for the trace."""
    if granularity == "task":
        return model_names[choice[0]]
    counts = {m: 0 for m in model_names}
    for c in choice:
        counts[model_names[c]] += 1
    return " ".join(f"{m}:{k}" for m, k in counts.items() if k)


def body_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The Euclidean norm of a body given as its tensors (made one at a time if a generator)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def frank_wolfe_hard(
    x0: Body,
    vertices: Sequence[Body],
    raw: Sequence[Body],
    gradient_fn: GradientFn,
    *,
    names: Sequence[str],
    model_names: Sequence[str],
    tasks: Sequence[str],
    max_iters: int,
    step_size: float,
    oracle: Oracle = "cosine",
    granularity: Granularity = "task",
    grad_noise_rtol: float = GRAD_NOISE_RTOL,
    on_iteration: Callable[[], None] | None = None,
    accuracy_fn: AccuracyFn | None = None,
) -> tuple[Body, list[dict]]:
    """Hard FW; iteration t reads draw t of each task's data. Returns (x_T, trace); the trace
    holds each iteration's loss and accuracy (`accuracy_fn`, where it knows any) at x_t."""
    x = {n: x0[n].clone() for n in names}
    trace = []
    for t in range(max_iters):
        loss, grad = gradient_fn(x, t, tasks)
        accuracy = accuracy_entry(accuracy_fn)
        scores = oracle_scores(grad, x, vertices, raw, names, oracle, grad_noise_rtol)
        grad_norm = body_norm(grad.values())
        del grad  # not held while the next one is made
        choice = select(scores, granularity)
        gamma = step_size_at(t, step_size)
        for n, c in zip(names, choice):  # tensor by tensor: a vertex may be made on demand
            x[n].add_(vertices[c][n] - x[n], alpha=gamma)
        trace.append({"iteration": t, "chosen": chosen_summary(choice, model_names, granularity),
                      "loss": loss, **accuracy, "grad_norm": grad_norm, "step": gamma,
                      "score": float(sum(scores[c, j] for j, c in enumerate(choice)))})
        if on_iteration:
            on_iteration()
    return x, trace


def frank_wolfe_soft(
    x0: Body,
    vertices: Sequence[Body],
    raw: Sequence[Body],
    gradient_fn: GradientFn,
    *,
    names: Sequence[str],
    model_names: Sequence[str],
    tasks: Sequence[str],
    max_iters: int,
    oracle: Oracle = "cosine",
    granularity: Granularity = "task",
    ada_iters: int = 50,
    ada_lr: float = 1e-3,
    ada_coeff: float = 0.3,
    simplex: bool = False,
    ada_gradient_fn: GradientFn | None = None,
    grad_noise_rtol: float = GRAD_NOISE_RTOL,
    on_iteration: Callable[[], None] | None = None,
    accuracy_fn: AccuracyFn | None = None,
) -> tuple[Body, list[dict]]:
    """Soft FW: per task a pick among the candidates not yet picked this iteration (at most one
    pick per candidate), then `ada_iters` steps of layer-wise AdaMerging over the picks.

    With no more candidates than tasks every candidate is picked each iteration: the selection
    then does nothing (the caller warns). `ada_gradient_fn` (default `gradient_fn`) gives the
    AdaMerging loss, e.g. entropy where the selection uses cross-entropy. Iteration t reads draw
    t·(ada_iters+1) for the selection and the next `ada_iters` draws for AdaMerging. Row t of the
    trace describes the state x_t: the selection's mean loss, the accuracy (from `accuracy_fn`
    after each task's gradient) and the gradient norm there; and, named as such, the step taken
    from it: the picks, the AdaMerging loss at its first and last measured coefficients
    (`ada_loss_first`, `ada_loss_last`) and `step_coef_mean`, the mean of the coefficients it ended
    at, which make x_{t+1}.
    """
    x = {n: x0[n].clone() for n in names}
    trace = []
    n_picks = min(len(vertices), len(tasks))
    for t in range(max_iters):
        draw = t * (ada_iters + 1)
        taken = torch.zeros(len(vertices), len(names), dtype=torch.bool)
        picks, losses, task_accuracy, grad_sum = [], [], {}, None
        for task in tasks[:n_picks]:
            loss, grad = gradient_fn(x, draw, [task])
            task_accuracy.update(accuracy_fn() if accuracy_fn else {})
            choice = select(oracle_scores(grad, x, vertices, raw, names, oracle, grad_noise_rtol), granularity, taken)
            for j, c in enumerate(choice):
                taken[c, j] = True
            picks.append(choice)
            losses.append(loss)
            if grad_sum is None:  # a copy: the caller's gradient is not written to
                grad_sum = {n: grad[n].clone() for n in names}
            else:
                for n in names:
                    grad_sum[n].add_(grad[n])
            del grad  # not held while the next task's is made
        grad_norm = body_norm(g / len(picks) for g in grad_sum.values())
        del grad_sum  # nor during AdaMerging
        directions = [Direction(vertices, c, x, names) for c in picks]
        result = adamerging(x, directions, ada_gradient_fn or gradient_fn, names=names, tasks=tasks,
                            granularity="layer", steps=ada_iters, lr=ada_lr, init=ada_coeff,
                            simplex=simplex, first_draw=draw + 1)
        x = result.body
        accuracy = accuracy_entry(lambda: task_accuracy)
        trace.append({
            "iteration": t,
            "chosen": ", ".join(f"{task}->{chosen_summary(c, model_names, granularity)}"
                                for task, c in zip(tasks, picks)),
            "loss": sum(losses) / len(losses),
            **accuracy,
            "grad_norm": grad_norm,
            "ada_loss_first": result.trace[0]["loss"] if result.trace else None,
            "ada_loss_last": result.trace[-1]["loss"] if result.trace else None,
            "step_coef_mean": float(result.coefficients.mean()),
        })
        if on_iteration:
            on_iteration()
    return x, trace
