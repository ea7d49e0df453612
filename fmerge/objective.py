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


def correct_and_labelled(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many examples' argmax class equals their label, and how many have a label: class labels
    outside [0, classes) (e.g. −1 on an unlabelled test split) are not counted."""
    labelled = (labels >= 0) & (labels < logits.shape[-1])
    hits = (logits.detach().argmax(dim=-1) == labels) & labelled
    return int(hits.sum()), int(labelled.sum())


def accumulate_task_gradient(task: TaskModel, leaves: Body, draw: int, loss: str) -> tuple[float, float | None]:
    """Add ∂(mean loss over the draw's examples)/∂body to the `.grad` of the leaves the net uses,
    and return that mean loss (a causal LM's: over its predicted tokens) and the accuracy of the
    classifier's argmax on the examples with a class label (None: a causal LM, or no labels).

    Autograd adds each tensor's gradient into its `.grad` as the backward pass makes it, so the
    gradient costs one body however many chunks and tasks add into it."""
    batches = task.batches(draw)
    n = sum(predicted_tokens(b) if task.causal_lm else batch_len(b) for b in batches)
    used = {b: leaves[b] for b in task.params}
    device = next(iter(used.values())).device
    accepted = set(inspect.signature(task.net.forward).parameters) if task.causal_lm else set()
    total, correct, labelled = 0.0, 0, 0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "example_ids")}
        if task.causal_lm:
            inputs.update(causal_lm_extras(inputs, accepted))
        substituted = {task.params[b]: t for b, t in used.items()}
        logits = functional_call(task.net, substituted, args=(), kwargs=inputs).logits
        if task.causal_lm:  # the next token is the label; prompt and padding positions do not count
            chunk = token_loss_sum(logits, {k: v.to(device) for k, v in batch.items()}, loss)[0] / n
        else:
            labels = batch["labels"].to(device) if "labels" in batch else None
            if labels is not None and not labels.is_floating_point():  # class labels, whatever the loss
                hits, count = correct_and_labelled(logits, labels)
                correct, labelled = correct + hits, labelled + count
            chunk = per_example_loss(logits, labels, loss).sum() / n  # entropy ignores the labels
        chunk.backward(inputs=list(used.values()))
        total += float(chunk.detach())
    return total, (correct / labelled if labelled else None)


def gradient_leaves(body: Body, names: Sequence[str]) -> Body:
    """The body's tensors as autograd leaves sharing their storage (no copy), gradients empty."""
    return {n: body[n].detach().requires_grad_(True) for n in names}


def leaf_gradients(leaves: Body, scale: float = 1.0) -> Body:
    """The gradients accumulated in the leaves (zeros where no loss used a tensor), times `scale`."""
    out = {}
    for n, leaf in leaves.items():
        g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        out[n] = g.mul_(scale) if scale != 1.0 else g
    return out


def task_loss_and_grad(task: TaskModel, body: Body, draw: int, loss: str) -> tuple[float, Body]:
    """Mean loss over the draw's examples (a causal LM's: over its predicted tokens) and its
    gradient w.r.t. the body tensors the net uses."""
    leaves = gradient_leaves(body, task.params)
    value, _ = accumulate_task_gradient(task, leaves, draw, loss)
    return value, leaf_gradients(leaves)


class Objective:
    """The mean over tasks of each task's mean loss, and its gradient (a GradientFn).

    After each call, `accuracy()` gives each classifier task's accuracy on the examples that call
    drew (argmax of the logits the loss computed, against the data's labels when it has them,
    whatever the loss), for the traces."""

    def __init__(self, tasks: dict[str, TaskModel], loss: str, names: Sequence[str]):
        self.tasks, self.loss, self.names = tasks, loss, list(names)
        self._accuracy: dict[str, float] = {}

    def __call__(self, body: Body, draw: int, tasks: Sequence[str]) -> tuple[float, Body]:
        leaves = gradient_leaves(body, self.names)
        total, self._accuracy = 0.0, {}
        for task in tasks:
            loss, accuracy = accumulate_task_gradient(self.tasks[task], leaves, draw, self.loss)
            total += loss / len(tasks)
            if accuracy is not None:
                self._accuracy[task] = accuracy
        return total, leaf_gradients(leaves, 1.0 / len(tasks))

    def accuracy(self) -> dict[str, float]:
        """Task -> accuracy on the examples of the last call (tasks without class labels absent)."""
        return dict(self._accuracy)
