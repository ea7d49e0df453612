"""The loss of a merged body on tasks, each through its own classifier head, and its gradient.

One classifier module per task; the body's tensors are substituted with
`torch.func.functional_call`, so a chunk of examples costs one forward and one backward pass
(FusionBench backpropagates one example at a time). The network runs in eval mode (no dropout),
so the gradient is deterministic and the same however the examples are chunked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

Body = dict[str, torch.Tensor]
LOSSES = ("cross_entropy", "entropy")


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Cross-entropy with the labels, or the entropy of the prediction (needs no labels)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if loss == "cross_entropy":
        return F.nll_loss(logp, labels, reduction="none")
    return -(logp.exp() * logp).sum(dim=-1)


@dataclass
class TaskModel:
    """A task's classifier (eval mode, its own weights frozen) and where its examples come from."""

    net: torch.nn.Module
    params: dict[str, str]                            # body tensor name -> the net's parameter name
    batches: Callable[[int], list[dict[str, torch.Tensor]]]  # draw -> chunks of that draw's examples


def batch_len(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a batch, whatever its inputs (token ids, pixel values): its labels' or first tensor's length."""
    return len(batch["labels"]) if "labels" in batch else len(next(iter(batch.values())))


def task_loss_and_grad(task: TaskModel, body: Body, draw: int, loss: str) -> tuple[float, Body]:
    """Mean loss over the draw's examples and its gradient w.r.t. the body tensors the net uses."""
    batches = task.batches(draw)
    n = sum(batch_len(b) for b in batches)
    leaves = {b: body[b].detach().requires_grad_(True) for b in task.params}
    grads = {b: torch.zeros_like(t) for b, t in leaves.items()}
    device = next(iter(leaves.values())).device
    total = 0.0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "example_ids")}
        substituted = {task.params[b]: t for b, t in leaves.items()}
        logits = functional_call(task.net, substituted, args=(), kwargs=inputs).logits
        labels = batch["labels"].to(device) if loss == "cross_entropy" else None
        chunk = per_example_loss(logits, labels, loss).sum() / n
        for b, g in zip(leaves, torch.autograd.grad(chunk, list(leaves.values()), allow_unused=True)):
            if g is not None:
                grads[b].add_(g)
        total += float(chunk.detach())
    return total, grads


class Objective:
    """The mean over tasks of each task's mean loss, and its gradient (a GradientFn)."""

    def __init__(self, tasks: dict[str, TaskModel], loss: str, names: Sequence[str]):
        self.tasks, self.loss, self.names = tasks, loss, list(names)

    def __call__(self, body: Body, draw: int, tasks: Sequence[str]) -> tuple[float, Body]:
        grad = {n: torch.zeros_like(body[n]) for n in self.names}
        total = 0.0
        for task in tasks:
            loss, g = task_loss_and_grad(self.tasks[task], body, draw, self.loss)
            total += loss / len(tasks)
            for n, t in g.items():
                grad[n].add_(t, alpha=1.0 / len(tasks))
        return total, grad
