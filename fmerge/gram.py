"""Gram matrices of every linear layer's inputs: the statistics RegMean merges with.

For a layer y = x Wᵀ + b, RegMean needs G = Σ_t x_t x_tᵀ over the input rows x_t the layer sees
on a task's data. Forward pre-hooks add each batch's XᵀX in fp32 as the model runs (eval mode,
no autograd), so one batched forward pass per batch gives every layer's Gram.

Padding never counts: inputs shaped (batch, tokens, in), or flattened to (batch·tokens, in), keep
the rows whose attention_mask is 1; inputs shaped (batch, in) (a pooler or a classification head
reading one vector per example) give one row per example. A layer fed any other shape is an
error, because which of its rows are padding is then unknown. A layer called several times per
forward pass (shared weights) adds all its inputs, as RegMean's objective sums over them.

A causal LM runs with positions counted from each sequence's first real token (left padding
then changes nothing) and without a KV cache. A layer whose weight is tied to another module's
(an LM head sharing the input embeddings) gets no Gram: RegMean would fit the shared matrix to
the head's inputs alone, so it takes the plain mean like the embeddings it is.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import ModelError
from .fisher import causal_lm_extras, is_causal_lm

# How a layer stores its weight: nn.Linear is out × in; transformers' Conv1D (GPT-2) is in × out.
OUT_IN, IN_OUT = "out_in", "in_out"
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


@dataclass
class GramSums:
    """Per layer, keyed by the name of its weight: Σ x xᵀ over its input rows ([in, in], fp32),
    the number of rows summed, and the weight's layout (OUT_IN or IN_OUT)."""

    grams: dict[str, torch.Tensor]
    rows: dict[str, int]
    layouts: dict[str, str]
    examples: int


def linear_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Weight name -> (module, layout) for every nn.Linear and transformers Conv1D whose weight
    no other module shares."""
    from transformers.pytorch_utils import Conv1D

    owners = Counter(id(p) for _, module in model.named_modules() for p in module.parameters(recurse=False))
    layers = {}
    for name, module in model.named_modules():
        prefix = f"{name}.weight" if name else "weight"
        if isinstance(module, (nn.Linear, Conv1D)) and owners[id(module.weight)] > 1:
            continue
        if isinstance(module, nn.Linear):
            layers[prefix] = (module, OUT_IN)
        elif isinstance(module, Conv1D):
            layers[prefix] = (module, IN_OUT)
    return layers


def gram_matrices(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    layer_filter: Callable[[str], bool] | None = None,
) -> GramSums:
    """Σ x xᵀ of each linear layer's non-padding input rows over all `batches`.

    `batches` yield `input_ids`, optional `attention_mask` (default: no padding) and
    `token_type_ids`, or images as `pixel_values` (no padding); other keys (labels, example ids)
    are ignored. `layer_filter(weight name)`
    selects layers (default: all). The model's training mode is restored afterwards.
    """
    layers = {n: ml for n, ml in linear_layers(model).items() if layer_filter is None or layer_filter(n)}
    if not layers:
        raise ModelError(f"Model {type(model).__name__} has no linear layer (nn.Linear or Conv1D) to "
                          "compute Gram matrices for.")
    device = next(model.parameters()).device
    result = GramSums(
        grams={n: torch.zeros(input_features(m, layout), input_features(m, layout), device=device)
               for n, (m, layout) in layers.items()},
        rows={n: 0 for n in layers},
        layouts={n: layout for n, (_, layout) in layers.items()},
        examples=0,
    )
    accepted = set(inspect.signature(model.forward).parameters)
    causal_lm = is_causal_lm(model)
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def add_rows(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            rows = real_token_rows(x, current["mask"], name)
            result.grams[name].addmm_(rows.T, rows)
            result.rows[name] += rows.shape[0]
        return add_rows

    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, (m, _) in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items() if k in _MODEL_INPUTS}
                mask = batch.get("attention_mask")
                current["mask"] = mask.bool() if mask is not None else None
                inputs = {k: v for k, v in batch.items() if k in accepted}
                model(**inputs, **(causal_lm_extras(batch, accepted) if causal_lm else {}))
                result.examples += next(iter(batch.values())).shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return result


def input_features(module: nn.Module, layout: str) -> int:
    """A linear layer's input width, whichever way its weight is laid out."""
    return module.weight.shape[1] if layout == OUT_IN else module.weight.shape[0]


def real_token_rows(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """The layer input's rows that belong to real tokens, in fp32."""
    if mask is None:
        return x.reshape(-1, x.shape[-1]).float()
    batch, tokens = mask.shape
    flat = x.reshape(-1, x.shape[-1]).float()
    if x.shape[:-1] == (batch, tokens) or (x.dim() == 2 and x.shape[0] == batch * tokens):
        return flat[mask.reshape(-1)]
    if x.dim() == 2 and x.shape[0] == batch:
        return flat
    raise ModelError(
        f"Layer '{name}' received an input of shape {list(x.shape)} for a batch of {batch} examples "
        f"of {tokens} tokens; fmerge cannot tell which of its rows are padding, so it cannot compute "
        "this layer's Gram matrix (RegMean does not support this architecture yet)."
    )


__all__ = ["IN_OUT", "OUT_IN", "GramSums", "gram_matrices", "input_features", "linear_layers", "real_token_rows"]
