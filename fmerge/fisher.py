"""Diagonal Fisher information of a torch model, from per-example gradients.

The Fisher squares the gradient of log p(y|x) *per example* (per sequence for a causal LM), so a
plain batch backward pass cannot give it. We get every example's gradient in one batched backward
pass instead: forward hooks remember each layer's input, a hook on the layer's output receives
the backpropagated signal, and from the two we form each example's weight gradient directly
(Linear: Σ_t g_t a_tᵀ over the example's tokens; LayerNorm: Σ_t g_t·x̂_t; embeddings: the sum of
g_t over the example's tokens of each id, kept sparse), square it and add it to the running sums.
Parameters are frozen during the pass, so autograd computes only activation gradients; the weight
gradients it would otherwise compute are replaced by the per-example ones, which costs about the
same. Measured on all-MiniLM-L6-v2 this is faster than torch.func vmap (bench/fisher.py).

Estimators (what the store records): `exact` Σ_c p_c g_c² (C − 1 backward passes),
`sampled` y ~ p(y|x) (k draws, seeded per example), `empirical` y = data label, and `fusionbench`
(FusionBench's batch-squared shortcut, for A/B comparison only: it is not a Fisher).

Model kinds: sequence classification (C = num_labels), regression heads (Gaussian Fisher with unit
variance, J_fᵀJ_f), causal LM. For a causal LM the "example" is a predicted token: the square is
taken per token of ∇ log p(y_t | x_<t) and the count is in tokens. Attention mixes positions, so a
token's gradient reaches every layer's rows at positions ≤ t and cannot be read off one backward
pass of the whole sequence; each chunk runs one forward pass and then one backward pass per
predicted column t (per draw), whose cotangent is non-zero at column t only, and the hooks square
each sequence's gradient as for a classifier. A module that says `fisher_kind = "classification"`
(CLIP's zero-shot classifier, fmerge/clip.py, whose batches carry `pixel_values`) is a classifier too.
"""

from __future__ import annotations

import hashlib
import inspect
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError, ModelError, RecipeError

ESTIMATORS = ("exact", "sampled", "empirical", "fusionbench")
KINDS = ("classification", "regression", "causal_lm")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
# `exact` for a causal LM costs vocabulary − 1 backward passes per predicted column.
EXACT_MAX_VOCAB = 256


@dataclass
class FisherSums:
    """Per-parameter sums over examples of squared per-example gradients, kept as sums (not means)
    so that a later run can extend the estimate with more examples.

    `count` is the normaliser in `count_unit`: "examples" for classifiers and regression heads,
    "tokens" (predicted, non-padding, non-prompt positions) for causal LMs, each of which adds one
    squared per-token gradient. `examples` counts distinct example ids (rows of the data): the
    windows of a long text, or a question's choices, share their example's id.
    """

    sums: dict[str, torch.Tensor]
    count: int
    count_unit: str
    examples: int
    estimator: str
    samples: int = 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The Fisher estimate: sums divided by count."""
        if self.count == 0:
            raise DataError("The Fisher sums hold no examples; there is no mean to take.")
        return {name: s / self.count for name, s in self.sums.items()}

    def extend(self, other: FisherSums) -> FisherSums:
        """Combine two estimates of the same model, estimator and parameters into one."""
        same = (self.estimator, self.samples, self.count_unit) == (other.estimator, other.samples, other.count_unit)
        if not same or self.sums.keys() != other.sums.keys():
            raise ModelError(
                f"Cannot extend a '{self.estimator}' Fisher (samples={self.samples}, per "
                f"{self.count_unit}) with a '{other.estimator}' one (samples={other.samples}, per "
                f"{other.count_unit}) or one over different parameters; recompute one of them."
            )
        return FisherSums(
            sums={name: s + other.sums[name].to(s.device) for name, s in self.sums.items()},
            count=self.count + other.count,
            count_unit=self.count_unit,
            examples=self.examples + other.examples,
            estimator=self.estimator,
            samples=self.samples,
        )


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model is one of transformers' causal-LM classes (a body with an LM head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def model_kind(model: nn.Module) -> str:
    """'classification', 'regression' or 'causal_lm', from the model class and its config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    cls = type(model).__name__
    if getattr(model, "fisher_kind", None) in KINDS:  # e.g. fmerge.clip.ClipClassifier
        return model.fisher_kind
    if is_causal_lm(model):
        return "causal_lm"
    if cls in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        config = model.config
        if config.problem_type == "regression" or config.num_labels == 1:
            return "regression"
        if config.problem_type == "multi_label_classification":
            raise ModelError(
                f"Model class {cls} is configured for multi-label classification, for which fmerge "
                "computes no Fisher yet; use a single-label classifier or a regression head."
            )
        return "classification"
    raise ModelError(
        f"fmerge computes the Fisher of sequence classifiers, regression heads and causal LMs; "
        f"model class {cls} is none of these (of images, only CLIP zero-shot classifiers)."
    )


def check_exact_vocabulary(vocab: int | None) -> None:
    """Refuse the exact Fisher of a causal LM whose vocabulary makes it impractical."""
    if vocab is None or vocab > EXACT_MAX_VOCAB:
        raise RecipeError(
            f"The exact Fisher of a causal LM sums over the vocabulary at every token: "
            f"{vocab if vocab is not None else 'an unknown number of'} entries here, so one backward pass per "
            f"entry and token (fmerge allows 'exact' up to {EXACT_MAX_VOCAB}). Use estimator 'sampled' "
            "(unbiased, k draws per token from the model) or 'empirical' (the next token) instead."
        )


def example_generator(seed: int, example_id: int) -> torch.Generator:
    """The CPU generator of one example's label draws: depends on the run seed and the example's
    id only, so the draws do not change with batching, chunking, padding or sharding."""
    digest = hashlib.blake2b(f"fmerge-fisher:{seed}:{example_id}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    estimator: str,
    *,
    samples: int = 1,
    seed: int = 0,
    chunk_size: int = 32,
    param_filter: Callable[[str], bool] | None = None,
    kind: str | None = None,
) -> FisherSums:
    """Sum over examples of the squared per-example gradient of log p(y|x), per parameter.

    `batches` yield `input_ids`, `attention_mask`, optional `token_type_ids`, `labels` (needed by
    a classifier's `empirical`; for a causal LM optional, shaped like `input_ids`, -100 on prompt
    tokens) and `example_ids` (seed each example's draws; default: position in the stream),
    padded on the right (a causal LM's also on the left). Each batch is processed `chunk_size`
    examples at a time: per-example gradients of one layer for one chunk are the largest temporary (chunk_size × layer size).
    `param_filter(name)` selects parameters (default: all); `kind` overrides `model_kind(model)`.
    The model runs in eval mode and its training mode and requires_grad flags are restored after.
    """
    if estimator not in ESTIMATORS:
        raise RecipeError(f"Unknown Fisher estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)}.")
    if samples < 1:
        raise RecipeError(f"The sampled Fisher needs at least one draw per example; got samples={samples}.")
    if chunk_size < 1:
        raise RecipeError(f"Fisher chunk_size must be at least 1; got {chunk_size}.")
    kind = kind or model_kind(model)
    if kind not in KINDS:
        raise RecipeError(f"Unknown model kind '{kind}'; choose one of {', '.join(KINDS)}.")
    if kind == "causal_lm" and estimator == "exact":
        check_exact_vocabulary(getattr(getattr(model, "config", None), "vocab_size", None))
    if estimator == "fusionbench" and kind != "classification":
        raise RecipeError(
            f"The fusionbench estimator is defined for classifiers only; this model is a {kind} model. "
            "Use 'sampled' or 'empirical'."
        )
    selected = {
        name: p
        for name, p in model.named_parameters()
        if p.is_floating_point() and (param_filter is None or param_filter(name))
    }
    if not selected:
        raise RecipeError("The parameter filter selects no floating-point parameter of the model.")
    sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in selected.items()}
    result = FisherSums(
        sums=sums,
        count=0,
        count_unit="tokens" if kind == "causal_lm" else "examples",
        examples=0,
        estimator=estimator,
        samples=samples if estimator == "sampled" else 1,
    )
    accepted = set(inspect.signature(model.forward).parameters)
    device = next(iter(selected.values())).device
    with gradients_in_eval_mode(model):
        if estimator == "fusionbench":
            _fusionbench(model, batches, selected, accepted, device, result)
        else:
            with _PerExampleSquares(model, selected, sums, live_span_only=kind == "causal_lm") as squares:
                _per_example(model, batches, kind, estimator, samples, seed, chunk_size, accepted, device, squares, result)
    return result


@contextmanager
def gradients_in_eval_mode(model: nn.Module):
    """Autograd on and the model in eval mode (no dropout noise in the gradients); its training
    mode and every parameter's requires_grad flag are restored afterwards, whatever the body set."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def example_chunks(batches: Iterable[dict], chunk_size: int, device) -> Iterable[tuple[dict, list[int]]]:
    """(chunk, its examples' ids) for every run of at most `chunk_size` examples of `batches`, moved
    to `device` with the attention mask defaulting to all ones; an example's id is its
    `example_ids` entry, else its position in the stream (the id seeds its label draws)."""
    position = 0
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if "input_ids" in batch:
            batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
        n = _batch_size(batch)
        ids = batch.get("example_ids")
        ids = ids.tolist() if ids is not None else list(range(position, position + n))
        position += n
        for start in range(0, n, chunk_size):
            yield ({k: v[start : start + chunk_size] for k, v in batch.items() if torch.is_tensor(v)},
                   ids[start : start + chunk_size])


def _per_example(model, batches, kind, estimator, samples, seed, chunk_size, accepted, device, squares, result):
    """Forward each chunk once, then one backward pass per cotangent (C − 1 for exact, k for
    sampled; for a causal LM, that many per predicted column)."""
    seen: set[int] = set()  # example ids: an LM text cut into windows is one example, not several
    for chunk, chunk_ids in example_chunks(batches, chunk_size, device):
        squares.begin(len(chunk_ids))
        logits = model_logits(model, chunk, accepted, kind)
        cotangents, units = output_cotangents(kind, logits, chunk, estimator, samples, seed, chunk_ids)
        for cotangent in cotangents:
            squares.backward(logits, cotangent)
        result.count += units
        result.examples += len(set(chunk_ids) - seen)
        seen.update(chunk_ids)


def model_logits(model, batch, accepted, kind) -> torch.Tensor:
    """The model's logits for `batch`, given only the inputs its forward `accepted` (a causal LM
    also its position ids for padding, causal_lm_extras)."""
    inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch and k in accepted}
    if kind == "causal_lm":
        inputs.update(causal_lm_extras(batch, accepted))
    return model(**inputs).logits


def causal_lm_extras(batch, accepted) -> dict:
    """Forward arguments that make a padded causal LM see each sequence as if unpadded: positions
    counted from its first real token (left padding would otherwise shift them) and no KV cache."""
    extras = {"use_cache": False} if "use_cache" in accepted else {}
    mask = batch.get("attention_mask")
    if mask is not None and "position_ids" in accepted:
        extras["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    return extras


def next_token_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, valid), both (n, T − 1): the token predicted at each position and whether it
    counts: context and target are real tokens (attention_mask 1, either padding side) and, when
    the batch carries `labels` shaped like `input_ids` (the transformers convention, unshifted),
    the target's label is not -100 (prompt tokens) and gives the target."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    valid = mask[:, :-1] & mask[:, 1:]
    targets = input_ids[:, 1:]
    labels = batch.get("labels")
    if labels is not None and labels.shape == input_ids.shape:
        targets = labels[:, 1:]
        valid = valid & (targets != -100)
    return targets.masked_fill(~valid, 0), valid


def _batch_size(batch) -> int:
    return batch["input_ids" if "input_ids" in batch else "pixel_values"].shape[0]


def _classification_labels(batch, num_classes: int) -> torch.Tensor:
    if "labels" not in batch:
        raise RecipeError(
            "The empirical Fisher needs the data's labels, but the batches carry none; set the "
            "dataset's label_column, or use estimator 'exact' or 'sampled', which need no labels."
        )
    labels = batch["labels"]
    if labels.is_floating_point():
        raise DataError("The classifier's empirical Fisher needs integer class labels; the batch labels are floats.")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise DataError(
            f"Label {labels[bad][0].item()} is outside the classifier head's range 0..{num_classes - 1}; "
            "check the dataset's label column and the model's num_labels."
        )
    return labels


def output_cotangents(kind, logits, batch, estimator, samples, seed, ids):
    """The cotangents of the logits whose backward passes give the per-example (for a causal LM,
    per-token) gradients of log p(y|x) of a model of this kind, and how many units they cover."""
    cotangents = {"causal_lm": _causal_lm_cotangents, "regression": _regression_cotangents}
    return cotangents.get(kind, _classification_cotangents)(logits, batch, estimator, samples, seed, ids)


def _classification_cotangents(logits, batch, estimator, samples, seed, ids):
    """Gradients of log p_y with respect to the logits, e_y − p, scaled so that squaring each
    backward pass's per-example gradient gives the estimator's weight for it."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    n, num_classes = probs.shape
    eye = torch.eye(num_classes, device=probs.device)
    if estimator == "exact":
        factors = _exact_factors(probs)
        cots = [factors[:, :, k].contiguous() for k in range(num_classes - 1)]
    elif estimator == "empirical":
        cots = [eye[_classification_labels(batch, num_classes)] - probs]
    else:
        uniforms = torch.stack([torch.rand(samples, generator=example_generator(seed, i)) for i in ids])
        draws = _inverse_cdf(probs, uniforms.to(probs.device))
        cots = [(eye[draws[:, j]] - probs) / samples**0.5 for j in range(samples)]
    return [c.to(logits.dtype) for c in cots], n


def _outer(p: torch.Tensor) -> torch.Tensor:
    return p.unsqueeze(-1) * p.unsqueeze(-2)


def _regression_cotangents(logits, batch, estimator, samples, seed, ids):
    """Gaussian likelihood with unit variance: ∂ log p / ∂f = y − f, Fisher J_fᵀJ_f."""
    out = logits.detach().float()
    n, outputs = out.shape
    if estimator == "exact":
        eye = torch.eye(outputs, device=out.device)
        cots = [eye[k].expand(n, outputs) for k in range(outputs)]
    elif estimator == "empirical":
        if "labels" not in batch:
            raise RecipeError(
                "The empirical Fisher of a regression head needs the data's target values; set the "
                "dataset's label_column, or use estimator 'exact' or 'sampled'."
            )
        cots = [batch["labels"].float().reshape(n, outputs) - out]
    else:
        noise = torch.stack([torch.randn(samples, outputs, generator=example_generator(seed, i)) for i in ids])
        noise = noise.to(out.device) / samples**0.5
        cots = [noise[:, j] for j in range(samples)]
    return [c.to(logits.dtype) for c in cots], n


def _causal_lm_cotangents(logits, batch, estimator, samples, seed, ids):
    """Per predicted column t and draw, the cotangent e_y − p_t at column t (zero elsewhere and on
    tokens that do not count), so each backward pass gives every sequence's gradient of one token's
    log-likelihood; `exact` gives the V − 1 scaled eigenvectors of diag(p_t) − p_t p_tᵀ instead."""
    targets, valid = next_token_targets(batch)
    vocab = logits.shape[-1]
    draws = None  # `exact` weighs eigenvectors of each column's distribution, no drawn tokens
    if estimator == "empirical":
        bad = valid & ((targets < 0) | (targets >= vocab))
        if bad.any():
            raise DataError(f"Target token id {targets[bad][0].item()} is outside the model's vocabulary "
                            f"0..{vocab - 1}; the data was tokenized for another model.")
        draws = [targets]
    elif estimator == "sampled":
        draws = list(_sampled_tokens(logits, batch, valid, samples, seed, ids))
    columns = [t for t in range(valid.shape[1]) if valid[:, t].any()]
    return _column_cotangents(logits, valid, columns, estimator, draws), int(valid.sum())


def _column_cotangents(logits, valid, columns, estimator, draws):
    """One cotangent at a time, in a reused buffer: the caller's backward pass uses it before the next."""
    cot = torch.zeros_like(logits, dtype=torch.float32)
    for t in columns:
        probs = torch.softmax(logits.detach()[:, t].float(), dim=-1)
        keep = valid[:, t, None].float()
        if estimator == "exact":
            factors = _exact_factors(probs)
            cotangents = [factors[:, :, k] for k in range(factors.shape[-1])]
        else:
            scale = 1.0 / len(draws) ** 0.5
            cotangents = [(-probs).scatter_add_(-1, y[:, t, None], torch.ones_like(probs[:, :1])) * scale
                          for y in draws]
        for column in cotangents:
            cot[:, t] = column * keep
            yield cot.to(logits.dtype)
        cot[:, t] = 0


def _exact_factors(probs: torch.Tensor) -> torch.Tensor:
    """(n, C, C − 1): Σ_c p_c (e_c − p)(e_c − p)ᵀ = diag(p) − ppᵀ has rank C − 1 (the ones vector
    spans its null space); its non-null eigenvectors scaled by sqrt(eigenvalue) give the same
    Σ_c p_c g_c² with one backward pass fewer than one per class."""
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.diag_embed(probs.double()) - _outer(probs.double()))
    return (eigenvectors[:, :, 1:] * eigenvalues[:, None, 1:].clamp_min(0).sqrt()).float()


def _sampled_tokens(logits, batch, valid, samples, seed, ids):
    """`samples` tensors (n, T − 1) of tokens drawn from the model at each counted position. A
    sequence's uniforms come from its example's generator as a (real tokens × samples) table read
    by the target's index among the sequence's real tokens: the same draws whatever the batch,
    chunk, padding side or padding width."""
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
    real_index = mask.long().cumsum(-1)[:, 1:] - 1  # of each target among its sequence's real tokens
    drawn = torch.zeros(samples, *valid.shape, dtype=torch.long, device=logits.device)
    for row, example_id in enumerate(ids):
        positions = valid[row].nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        table = torch.rand(int(mask[row].sum()), samples, generator=example_generator(seed, example_id))
        uniforms = table[real_index[row, positions].cpu()].to(logits.device)
        probs = torch.softmax(logits.detach()[row, positions].float(), dim=-1)
        drawn[:, row, positions] = _inverse_cdf(probs, uniforms).T
    return drawn


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Class index per uniform draw: rows of `probs` (..., C), draws (..., k) -> (..., k)."""
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, uniforms * cdf[..., -1:])
    return picked.clamp_(max=probs.shape[-1] - 1)


def _fusionbench(model, batches, selected, accepted, device, result):
    """FusionBench's estimator, kept for A/B comparison: per batch, backpropagate
    Σ_n Σ_c sqrt(p_nc)·log p_nc with p held constant and square the *batch* gradient."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(selected.values())
    for p in params:
        p.requires_grad_(True)
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        log_probs = torch.log_softmax(model_logits(model, batch, accepted, "classification").float(), dim=-1)
        objective = (log_probs.detach().exp().sqrt() * log_probs).sum()
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        for (name, _), grad in zip(selected.items(), grads):
            if grad is not None:
                result.sums[name] += grad.float().square()
        n = _batch_size(batch)
        result.count += n
        result.examples += n


@dataclass
class _Rows:
    """Sparse per-example gradient of an embedding: `values[i]` is example `example[i]`'s
    gradient of row `row[i]`; each (example, row) pair appears once."""

    example: torch.Tensor
    row: torch.Tensor
    values: torch.Tensor


def _flat(t: torch.Tensor, n: int) -> torch.Tensor:
    """(n, ..., d) -> (n, tokens, d) in fp32."""
    return t.reshape(n, -1, t.shape[-1]).float()


def _linear_grads(module, args, kwargs, g, wanted, ctx, in_by_out: bool = False):
    """Per-example Σ_t g_t a_tᵀ over each example's tokens (out × in, or in × out)."""
    n = g.shape[0]
    a, g = _flat(args[0], n), _flat(g, n)
    if ctx.live_span_only:
        a, g = _live_span(a, g)
    grads = {}
    if "weight" in wanted:
        left, right = (a.transpose(1, 2), g) if in_by_out else (g.transpose(1, 2), a)
        grads["weight"] = torch.bmm(left, right, out=ctx.scratch(module.weight))
    if "bias" in wanted:
        grads["bias"] = g.sum(1)
    return grads


def _live_span(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions from the first to the last where some example's g is non-zero. A causal LM's
    backward pass for column t reaches positions ≤ t only (the LM head: t alone), and the other
    positions would add exact zeros to Σ_t g_t a_tᵀ at the full cost of the product."""
    live = (g != 0).any(dim=2).any(dim=0).nonzero()
    if live.numel() == 0:
        return a[:, :0], g[:, :0]
    first, last = int(live[0]), int(live[-1]) + 1
    return a[:, first:last], g[:, first:last]


def _conv1d_grads(module, args, kwargs, g, wanted, ctx):
    """transformers' Conv1D (GPT-2) is a linear layer with the weight stored as in × out."""
    return _linear_grads(module, args, kwargs, g, wanted, ctx, in_by_out=True)


def _layer_norm_grads(module, args, kwargs, g, wanted, ctx):
    n = g.shape[0]
    g = g.float().reshape(n, -1, *module.normalized_shape)
    grads = {}
    if "weight" in wanted:
        normalized = F.layer_norm(args[0].float(), module.normalized_shape, eps=module.eps)
        grads["weight"] = (g * normalized.reshape(g.shape)).sum(1)
    if "bias" in wanted:
        grads["bias"] = g.sum(1)
    return grads


def _embedding_grads(module, args, kwargs, g, wanted, ctx):
    """Per example, the gradient of row v is the sum of g_t over that example's tokens with id v:
    a handful of rows, never a dense vocab × dim tensor."""
    ids = args[0]
    n, vocab = g.shape[0], module.num_embeddings
    g = _flat(g, n)
    ids = ids.reshape(n, -1)
    keys = (torch.arange(n, device=ids.device).unsqueeze(1) * vocab + ids).reshape(-1)
    values = g.reshape(-1, g.shape[-1])
    if module.padding_idx is not None:
        keep = ids.reshape(-1) != module.padding_idx
        keys, values = keys[keep], values[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.zeros(unique.numel(), values.shape[1], device=values.device).index_add_(0, inverse, values)
    return {"weight": _Rows(example=unique // vocab, row=unique % vocab, values=rows)}


def _generic_grads(module, args, kwargs, g, wanted, ctx):
    """Any other leaf module (RMSNorm, ...): per-example vector-Jacobian products via torch.func."""
    n = g.shape[0]
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False) if name in wanted}
    dims = tuple(0 if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n else None for a in args)

    def one_example(params, g_one, *xs):
        xs = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(xs, dims))
        _, pullback = torch.func.vjp(lambda q: torch.func.functional_call(module, q, xs, kwargs, strict=False), params)
        return pullback(g_one.unsqueeze(0))[0]

    grads = torch.func.vmap(one_example, in_dims=(None, 0, *dims))(params, g, *args)
    return {name: t.float() for name, t in grads.items()}


def _class_token_grads(module, args, kwargs, g, wanted, ctx):
    """CLIP's vision embeddings put `class_embedding` at position 0 of their output, unchanged
    but for the position embedding added to every position: its gradient is g at position 0."""
    return {"class_embedding": g[:, 0].to(torch.float32, copy=True)}  # a copy: sums square in place


def _rule_for(module: nn.Module):
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, CLIPVisionEmbeddings):
        return _class_token_grads
    if isinstance(module, nn.Linear):
        return _linear_grads
    if isinstance(module, Conv1D):
        return _conv1d_grads
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return _layer_norm_grads
    if isinstance(module, nn.Embedding) and not module.scale_grad_by_freq:
        return _embedding_grads
    return _generic_grads


class _PerExampleSquares:
    """Hooks that square each example's parameter gradient as the backward pass produces it.

    All parameters are frozen while installed, so autograd computes activation gradients only;
    the outputs of parameter-owning modules that would then carry no gradient (embeddings) become
    fresh leaves from which `backward` differentiates. A parameter reached more than once per
    example (tied input/output embeddings, a module called twice) has its contributions summed
    per example before squaring.
    """

    def __init__(self, model: nn.Module, selected: dict[str, nn.Parameter], sums: dict[str, torch.Tensor],
                 live_span_only: bool = False):
        self.model = model
        self.live_span_only = live_span_only  # linear layers skip positions the cotangent does not reach
        self.sums = sums
        self.name_of = {p: name for name, p in selected.items()}
        owners: dict[nn.Parameter, int] = defaultdict(int)
        self.wanted: dict[nn.Module, dict[str, nn.Parameter]] = {}
        self.owns_params: list[nn.Module] = []
        for module_name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            self.owns_params.append(module)
            for p in own.values():
                owners[p] += 1
            wanted = {local: p for local, p in own.items() if p in self.name_of}
            if not wanted:
                continue
            if any(True for _ in module.children()) and _rule_for(module) is _generic_grads:
                raise ModelError(
                    f"Parameter(s) {', '.join(self.name_of[p] for p in wanted.values())} belong to module "
                    f"'{module_name}' ({type(module).__name__}), which also has submodules; fmerge cannot "
                    "form per-example gradients there. Exclude them with the parameter filter."
                )
            self.wanted[module] = wanted
        self.tied = {p for p, k in owners.items() if k > 1}
        self.handles: list = []
        self.buffers: dict[tuple, torch.Tensor] = {}

    def __enter__(self):
        for p in self.model.parameters():
            p.requires_grad_(False)
        for module in self.owns_params:
            if isinstance(module, nn.Embedding):
                self.handles.append(module.register_forward_pre_hook(self._expand_broadcast_ids))
            self.handles.append(module.register_forward_hook(self._after_forward, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def begin(self, n: int) -> None:
        """Start a chunk of n examples."""
        self.n = n
        self.leaves: list[torch.Tensor] = []
        self.calls: dict[nn.Module, int] = defaultdict(int)
        self.pending: dict[str, torch.Tensor] = {}
        self.replaying = False

    def scratch(self, param: torch.Tensor) -> torch.Tensor:
        """A reused fp32 buffer for this chunk's per-example gradients of one weight shape: fresh
        allocations of this size cost page faults that rival the matrix products."""
        key = (*param.shape, str(param.device))
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape[0] < self.n:
            buffer = self.buffers[key] = torch.empty(self.n, *param.shape, device=param.device)
        return buffer[: self.n]

    def backward(self, output: torch.Tensor, cotangent: torch.Tensor) -> None:
        """One backward pass; each example's gradient is squared and summed by the hooks."""
        torch.autograd.grad(output, self.leaves, cotangent, retain_graph=True, allow_unused=True)
        for name, per_example in self.pending.items():
            self.sums[name] += per_example.square().sum(0)
        self.pending.clear()

    def _expand_broadcast_ids(self, module, args):
        """Position ids often come as (1, T) and are broadcast after the embedding, which would
        sum the examples' gradients; give each example its own copy."""
        ids = args[0]
        if ids.dim() >= 1 and ids.shape[0] == 1 and self.n > 1:
            return (ids.expand(self.n, *ids.shape[1:]), *args[1:])
        return None

    def _after_forward(self, module, args, kwargs, out):
        if self.replaying:
            return None
        if not torch.is_tensor(out):
            raise ModelError(
                f"Module {type(module).__name__} returns {type(out).__name__}, not a tensor; fmerge "
                "cannot form per-example gradients of its parameters. Exclude them with the parameter filter."
            )
        replaced = None
        if not out.requires_grad:
            leaf = out.detach().requires_grad_()
            self.leaves.append(leaf)
            out = replaced = leaf.clone()  # model code may modify the output in place
        if module in self.wanted:
            if out.shape[0] != self.n:
                raise ModelError(
                    f"Module {type(module).__name__} (parameters "
                    f"{', '.join(self.name_of[p] for p in self.wanted[module].values())}) produced an "
                    f"output whose first dimension is {out.shape[0]}, not the batch size {self.n}; its "
                    "per-example gradients are undefined. Exclude it with the parameter filter."
                )
            self.calls[module] += 1
            saved = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            out.register_hook(lambda g, module=module, saved=saved, kwargs=kwargs: self._on_grad(module, saved, kwargs, g))
        return replaced

    def _on_grad(self, module, args, kwargs, g) -> None:
        wanted = self.wanted[module]
        self.replaying = True
        try:
            grads = _rule_for(module)(module, args, kwargs, g, wanted, self)
        finally:
            self.replaying = False
        for local, grad in grads.items():
            param = wanted[local]
            name = self.name_of[param]
            if param in self.tied or self.calls[module] > 1:
                self._add_pending(name, param, grad)
            elif isinstance(grad, _Rows):
                self.sums[name].index_add_(0, grad.row, grad.values.square_())
            else:
                self.sums[name] += grad.square_().sum(0)

    def _add_pending(self, name: str, param: nn.Parameter, grad) -> None:
        if name not in self.pending:
            self.pending[name] = torch.zeros(self.n, *param.shape, dtype=torch.float32, device=param.device)
        if isinstance(grad, _Rows):
            self.pending[name].index_put_((grad.example, grad.row), grad.values, accumulate=True)
        else:
            self.pending[name] += grad


def allreduce_sums(fs: FisherSums) -> FisherSums:
    """Sum every rank's Fisher sums and counts in place (no-op without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return fs
    device = next(iter(fs.sums.values())).device
    for name in sorted(fs.sums):
        dist.all_reduce(fs.sums[name])
    counts = torch.tensor([fs.count, fs.examples], dtype=torch.int64, device=device)
    dist.all_reduce(counts)
    fs.count, fs.examples = (int(c) for c in counts.tolist())
    return fs


__all__ = [
    "ESTIMATORS",
    "FisherSums",
    "allreduce_sums",
    "example_generator",
    "causal_lm_extras",
    "check_exact_vocabulary",
    "example_chunks",
    "fisher_diagonal",
    "gradients_in_eval_mode",
    "is_causal_lm",
    "model_kind",
    "model_logits",
    "next_token_targets",
    "output_cotangents",
]
