"""Kronecker-factored Fisher (K-FAC) of every linear layer: F ≈ A ⊗ G, the curvature MaTS merges with.

For a layer y = x Wᵀ the per-example gradient of log p(y|x) is Σ_t g_t a_tᵀ over the example's
tokens (a_t the layer's input row, g_t the gradient at its output row). K-FAC keeps two small
factors instead of the (out·in)² Fisher:

- A = Σ_t a_t a_tᵀ / (rows): the layer-input covariance, the same Gram RegMean uses (gram.py),
  divided by the number of rows it sums;
- G = Σ_n E_y[Σ_t g_t g_tᵀ] / N: the output-gradient covariance, per token (no cross-token
  terms), summed within an example, averaged over the N examples.

This is the "expand" form of K-FAC for weight sharing across positions (Eschenhagen et al. 2023):
E_n[Σ_t (g_t g_tᵀ) ⊗ (a_t a_tᵀ)] ≈ E_t[a aᵀ] ⊗ E_n[Σ_t g_t g_tᵀ], so A ⊗ G has the scale of the
diagonal Fisher fisher.py estimates. The labels y come from the same estimators as the Fisher
(`exact` Σ_c p_c, `sampled` from the model, `empirical` the data label), through the same
cotangents, so the two statistics agree on what "the Fisher" is. Classifiers and regression heads
only, for now. Padding rows never count, in A or G. Both are accumulated in float64: in fp32 the
sums of few examples' outer products, rank-deficient, pick up negative eigenvalues (about −1e-6
against a largest of 19 on a tiny BERT) and A ⊗ G is then no longer positive semi-definite, which
MaTS' solver needs (docs: shared spec, "K-FAC curvature must be a positive semi-definite system"). One forward pass per chunk gives A (forward hooks) and the outputs; one backward pass per
cotangent gives every layer's output gradients (autograd is asked for those only, so no weight
gradient is formed).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import RecipeError
from .fisher import example_chunks, gradients_in_eval_mode, model_kind, model_logits, output_cotangents
from .gram import OUT_IN, input_features, linear_layers, real_token_rows

ESTIMATORS = ("exact", "sampled", "empirical")
KINDS = ("classification", "regression")


@dataclass
class KfacSums:
    """Per layer (keyed by its weight's name): Σ a aᵀ ([in, in]) over `rows[name]` input rows,
    Σ g gᵀ ([out, out]) over `count` examples, both float64, and the weight's layout."""

    input_sums: dict[str, torch.Tensor]
    output_sums: dict[str, torch.Tensor]
    rows: dict[str, int]
    layouts: dict[str, str]
    count: int
    examples: int
    estimator: str

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (A, G): the sums divided by their row count and by `count`."""
        if self.count == 0:
            raise RecipeError("The K-FAC sums hold no examples; there are no factors to take.")
        return {n: (self.input_sums[n] / max(self.rows[n], 1), self.output_sums[n] / self.count)
                for n in self.input_sums}


def kfac_factors(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    estimator: str,
    *,
    samples: int = 1,
    seed: int = 0,
    chunk_size: int = 32,
    layer_filter: Callable[[str], bool] | None = None,
    kind: str | None = None,
) -> KfacSums:
    """K-FAC sums of every linear layer (nn.Linear, Conv1D) over `batches` (as `fisher_diagonal`
    takes them: `input_ids`, `attention_mask`, optional `labels` and `example_ids`).

    The model runs in eval mode; its training mode and requires_grad flags are restored after.
    """
    if estimator not in ESTIMATORS:
        raise RecipeError(f"Unknown K-FAC estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)} "
                          f"(the fisher step's 'fusionbench' is not a Fisher and has no K-FAC form).")
    if samples < 1 or chunk_size < 1:
        raise RecipeError(f"K-FAC needs samples ≥ 1 and chunk_size ≥ 1; got samples={samples}, "
                          f"chunk_size={chunk_size}.")
    kind = kind or model_kind(model)
    if kind not in KINDS:
        raise RecipeError(f"fmerge computes K-FAC factors of classifiers and regression heads; this is a {kind} "
                          f"model. A causal LM's per-token output-gradient covariance needs one backward pass per "
                          f"predicted position, which is not implemented yet: merge it with MaTS curvature "
                          f"'diagonal' (the fisher step) or 'gram' instead.")
    layers = {n: ml for n, ml in linear_layers(model).items() if layer_filter is None or layer_filter(n)}
    if not layers:
        raise RecipeError(f"Model {type(model).__name__} has no linear layer (nn.Linear or Conv1D) "
                          "selected for K-FAC.")
    device = next(model.parameters()).device
    out_features = {n: (m.weight.shape[0] if layout == OUT_IN else m.weight.shape[1]) for n, (m, layout) in layers.items()}
    result = KfacSums(
        input_sums={n: torch.zeros(input_features(m, lay), input_features(m, lay), dtype=torch.float64, device=device)
                    for n, (m, lay) in layers.items()},
        output_sums={n: torch.zeros(out_features[n], out_features[n], dtype=torch.float64, device=device)
                     for n in layers},
        rows={n: 0 for n in layers}, layouts={n: lay for n, (_, lay) in layers.items()},
        count=0, examples=0, estimator=estimator)
    accepted = set(inspect.signature(model.forward).parameters)
    current: dict = {}

    def hook_for(name: str):
        def capture(module, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            rows = real_token_rows(x.detach(), current["mask"], name).double()
            result.input_sums[name].addmm_(rows.T, rows)
            result.rows[name] += rows.shape[0]
            current["outputs"].append((name, out))
        return capture

    handles = [m.register_forward_hook(hook_for(n), with_kwargs=True) for n, (m, _) in layers.items()]
    try:
        with gradients_in_eval_mode(model):
            for p in model.parameters():
                p.requires_grad_(p.is_floating_point())  # so every layer output is in the graph
            _accumulate(model, batches, kind, estimator, samples, seed, chunk_size, accepted, device, current, result)
    finally:
        for handle in handles:
            handle.remove()
    return result


def _accumulate(model, batches, kind, estimator, samples, seed, chunk_size, accepted, device, current, result):
    """Forward each chunk once, then one backward pass per cotangent, adding Σ_t g gᵀ per layer."""
    for chunk, chunk_ids in example_chunks(batches, chunk_size, device):
        mask = chunk.get("attention_mask")
        current["mask"] = mask.bool() if mask is not None else None
        current["outputs"] = []
        logits = model_logits(model, chunk, accepted, kind)
        cotangents, units = output_cotangents(kind, logits, chunk, estimator, samples, seed, chunk_ids)
        outputs = [out for _, out in current["outputs"]]
        for cotangent in cotangents:
            grads = torch.autograd.grad(logits, outputs, cotangent, retain_graph=True, allow_unused=True)
            for (name, out), g in zip(current["outputs"], grads):
                if g is None:
                    continue  # this call of the layer does not reach the logits
                rows = real_token_rows(g, current["mask"], name).double()
                result.output_sums[name].addmm_(rows.T, rows)
        result.count += units
        result.examples += len(chunk_ids)
        current["outputs"] = []


__all__ = ["ESTIMATORS", "KfacSums", "kfac_factors"]
