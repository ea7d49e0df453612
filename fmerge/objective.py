"""The loss of a merged body on tasks, each through its own model, and its gradient.

One module per task (a classifier with its head, or a causal LM); the body's tensors are substituted with
`torch.func.functional_call`, so a chunk of examples costs one forward and one backward pass
(FusionBench backpropagates one example at a time). The network runs in eval mode (no dropout),
so the gradient is deterministic and the same however the examples are chunked.

For causal LMs the loss is token-level (`next_token_losses`, `token_loss_sum`): the next token's
cross-entropy or the entropy of the next-token distribution, over the positions that count,
normalised per token rather than per sequence: a causal-LM task's loss is the mean over the
predicted tokens of its draw, whatever their split into sequences and chunks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .fisher import causal_lm_extras, next_token_targets

Body = dict[str, torch.Tensor]
LOSSES = ("cross_entropy", "entropy")


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Cross-entropy with the labels, or the entropy of the prediction (needs no labels)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if loss == "cross_entropy":
        return F.nll_loss(logp, labels, reduction="none")
    return -(logp.exp() * logp).sum(dim=-1)


def next_token_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor], loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's loss at each predicted position, (n, T − 1), and which positions count
    (`fisher.next_token_targets`: real context and target tokens, not prompt tokens labelled -100):
    the next token's cross-entropy, or the entropy of the next-token distribution (needs no
    target, but counts the same positions). Positions that do not count hold 0."""
    targets, valid = next_token_targets(batch)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    if loss == "cross_entropy":
        per_token = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    else:
        per_token = -(logp.exp() * logp).sum(dim=-1)
    return per_token * valid, valid


def token_loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor], loss: str) -> tuple[torch.Tensor, int]:
    """The summed per-token loss of a batch and its number of counted tokens: a mean over tokens
    is the sum over chunks divided by the total count (`predicted_tokens` gives it up front)."""
    per_token, valid = next_token_losses(logits, batch, loss)
    return per_token.sum(), int(valid.sum())


def predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many positions of a causal-LM batch a token-level loss counts."""
    return int(next_token_targets(batch)[1].sum())


@dataclass
class TaskModel:
    """A task's model (eval mode, its own weights frozen) and where its examples come from.

    A causal LM (`causal_lm`) is scored per predicted token (`token_loss_sum`), a classifier per example."""

    net: torch.nn.Module
    params: dict[str, str]                            # body tensor name -> the net's parameter name
    batches: Callable[[int], list[dict[str, torch.Tensor]]]  # draw -> chunks of that draw's examples
    causal_lm: bool = False


def batch_len(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a batch, whatever its inputs (token ids, pixel values): its labels' or first tensor's length."""
    return len(batch["labels"]) if "labels" in batch else len(next(iter(batch.values())))


def task_loss_and_grad(task: TaskModel, body: Body, draw: int, loss: str) -> tuple[float, Body]:
    """Mean loss over the draw's examples (a causal LM's: over its predicted tokens) and its
    gradient w.r.t. the body tensors the net uses."""
    batches = task.batches(draw)
    n = sum(predicted_tokens(b) if task.causal_lm else batch_len(b) for b in batches)
    leaves = {b: body[b].detach().requires_grad_(True) for b in task.params}
    grads = {b: torch.zeros_like(t) for b, t in leaves.items()}
    device = next(iter(leaves.values())).device
    accepted = set(inspect.signature(task.net.forward).parameters) if task.causal_lm else set()
    total = 0.0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "example_ids")}
        if task.causal_lm:
            inputs.update(causal_lm_extras(inputs, accepted))
        substituted = {task.params[b]: t for b, t in leaves.items()}
        logits = functional_call(task.net, substituted, args=(), kwargs=inputs).logits
        if task.causal_lm:  # the next token is the label; prompt and padding positions do not count
            chunk = token_loss_sum(logits, {k: v.to(device) for k, v in batch.items()}, loss)[0] / n
        else:
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
