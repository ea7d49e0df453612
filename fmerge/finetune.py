"""Fine-tune a sequence classifier: the pure training loop behind the demo's `finetune` step.

Nothing here knows about files, recipes or the store: the caller hands in a model and a factory
of tokenized batches and gets the trained model (in place) and a small log back.

Everything random draws from a `torch.Generator` of its own, never from torch's global generator,
which the threads of a process share: the new head from `seed` (fresh_classifier), the batch order
from the factory's seed (tensor_batches). Dropout has no generator argument in torch, so training
runs without it (the model stays in eval mode). The same seeds thus give the same weights on CPU,
whatever the thread count and however many fine-tunes run at once in one process.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from .errors import DataError, ModelError, RecipeError

Batch = Mapping[str, torch.Tensor]
BatchesFactory = Callable[[int], Iterable[Batch]]
Progress = Callable[[int, int, float], None]


# transformers' from_pretrained swaps class attributes for the length of a load (PreTrainedModel.tie_weights,
# torch's init functions) and puts back what it found: two loads in two threads can leave the
# placeholders in place for the whole process (every later model untied). Models are built one at a time.
MODEL_BUILD_LOCK = threading.RLock()


def fresh_classifier(base_path: str | Path, num_labels: int, seed: int, **config_overrides):
    """Load a local pretrained encoder with a new classification head initialised from `seed`.

    The tensors the encoder's files lack (the head) are drawn again from a generator seeded with
    `seed`, whatever transformers drew for them: matrices from N(0, initializer_range²), biases
    zero, other vectors one (as BERT initialises them). `local_files_only` keeps it off the network
    (a missing path would otherwise be read as a hub id); `config_overrides` go to the config, e.g.
    `num_hidden_layers=2` for a fast test model.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = Path(base_path)
    if not (path / "config.json").is_file():
        raise ModelError(f"Base model folder '{path}' has no config.json.")
    # The "newly initialized: classifier.*" report and the loading bar are expected noise.
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with MODEL_BUILD_LOCK:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, local_files_only=True, output_loading_info=True, **config_overrides
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    tensors = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in sorted(loading["missing_keys"]):
            t = tensors.get(name)
            if t is None or not t.is_floating_point():
                continue
            if name.endswith("bias"):
                t.zero_()
            elif t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)
            else:
                t.fill_(1.0)
    return model


def tensor_batches(
    features: Mapping[str, torch.Tensor], batch_size: int, seed: int
) -> BatchesFactory:
    """A batches factory over pre-tokenized tensors: a fresh seeded shuffle every epoch.

    Each batch is cut to its longest row (features padded on the right, as BERT tokenizers do):
    short texts such as tweets then cost a fraction of the full `max_length`.
    """
    n = len(features["labels"])

    def epoch(index: int) -> Iterable[Batch]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + index))
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            batch = {k: v[rows] for k, v in features.items()}
            if "attention_mask" in batch:
                width = int(batch["attention_mask"].sum(1).max())
                batch = {k: v[:, :width] if v.ndim == 2 else v for k, v in batch.items()}
            yield batch

    return epoch


def finetune_classifier(
    model: torch.nn.Module,
    batches_factory: BatchesFactory,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    warmup: float,
    device: str | torch.device,
    max_grad_norm: float | None = 1.0,
    progress: Progress | None = None,
) -> dict:
    """Train `model` in place for `steps` optimizer steps; return a small log.

    `batches_factory(epoch)` yields dicts of tensors (input_ids, attention_mask, optional
    token_type_ids, labels); it is called again with the next epoch number whenever a pass runs
    out, so short datasets cycle. AdamW (no decay on biases and LayerNorm) with `lr` rising
    linearly over the first `warmup` fraction of steps, then falling linearly to zero.
    `progress(step, steps, loss)` is called after each step. The model trains in eval mode, without
    dropout (module docstring), and is left in it.

    The log: `losses` (one per step), `train_accuracy` (on the batches of the last tenth of the
    steps, from the training forward pass, before each update: a free sanity check, not an
    evaluation), `examples_seen`, `steps`, `seconds`.
    """
    if steps < 1:
        raise RecipeError(f"finetune: steps must be at least 1, got {steps}.")
    if not 0.0 <= warmup < 1.0:
        raise RecipeError(f"finetune: warmup is a fraction of the steps in [0, 1), got {warmup}.")
    device = torch.device(device)
    warmup_steps = int(round(warmup * steps))
    # The last tenth of the steps (at least one) gives the reported train accuracy.
    tail_from = steps - max(1, steps // 10)
    losses: list[float] = []
    correct = seen = examples = epoch = 0
    start = time.perf_counter()

    model.to(device).eval()  # no dropout: it would draw from torch's global generator
    optimizer = torch.optim.AdamW(
        _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _linear(s, warmup_steps, steps)
    )
    batches = iter(batches_factory(epoch))
    for step in range(steps):
        batch = next(batches, None)
        if batch is None:
            epoch += 1
            batches = iter(batches_factory(epoch))
            batch = next(batches, None)
            if batch is None:
                raise DataError("finetune: the batches factory yielded no batches.")
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        labels = batch["labels"].to(device)
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits, labels)
        if not torch.isfinite(loss):
            raise ModelError(f"finetune: loss is {loss.item()} at step {step}; lower lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        examples += len(labels)
        if step >= tail_from:
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
        if progress is not None:
            progress(step + 1, steps, losses[-1])

    return {
        "steps": steps,
        "losses": losses,
        "train_accuracy": correct / seen,
        "examples_seen": examples,
        "seconds": time.perf_counter() - start,
    }


def _linear(step: int, warmup_steps: int, steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (steps - step) / max(1, steps - warmup_steps))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: decaying biases and LayerNorm gains hurts BERT fine-tuning."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
