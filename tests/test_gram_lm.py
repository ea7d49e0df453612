"""Grams of a causal LM's linear layers against a forward-hook loop over unpadded sequences, and
the gram step + RegMean merge of two tiny LMs through a recipe."""

from __future__ import annotations

import pytest
import torch

from fmerge import executor
from fmerge.api import load_recipe
from fmerge.gram import IN_OUT, OUT_IN, gram_matrices, linear_layers
from fmerge.runtime import Runtime
from fmerge.store import Store
from test_fisher_lm import make_sequences, padded_batches, tiny_causal_lm
from test_regmean import closed_form


def hook_loop_grams(model, sequences) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Each sequence alone (no padding), every row a linear layer receives added as an outer product."""
    model.eval()
    layers = {name: m for name, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(args[0].detach()))
             for name, m in layers.items()]
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    try:
        for s in sequences:
            seen.clear()
            seen.update({name: [] for name in layers})
            with torch.no_grad():
                model(input_ids=s["input_ids"][None], use_cache=False)
            for name, xs in seen.items():
                for x in xs:
                    x = x.reshape(-1, x.shape[-1]).double()
                    grams[name + ".weight"] = grams.get(name + ".weight", 0) + x.T @ x
                    rows[name + ".weight"] = rows.get(name + ".weight", 0) + len(x)
    finally:
        for h in hooks:
            h.remove()
    return grams, rows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size,side,extra", [(6, "right", 0), (4, "left", 2), (2, "right", 3)])
def test_lm_grams_equal_hook_loop_and_ignore_padding(arch, batch_size, side, extra):
    model = tiny_causal_lm(arch)
    sequences = make_sequences()
    sums = gram_matrices(model, padded_batches(sequences, batch_size, side, extra))
    ref, ref_rows = hook_loop_grams(model, sequences)
    tokens = sum(len(s["input_ids"]) for s in sequences)
    if arch == "gpt2":  # lm_head shares the input embeddings: it takes the plain mean, no Gram
        ref.pop("lm_head.weight"), ref_rows.pop("lm_head.weight")
        assert sums.layouts["transformer.h.0.attn.c_attn.weight"] == IN_OUT
        assert sums.grams["transformer.h.1.mlp.c_proj.weight"].shape == (128, 128)  # in = 4 × n_embd
    else:
        assert sums.layouts["lm_head.weight"] == OUT_IN  # untied: a linear layer like any other
    assert set(sums.grams) == set(ref)
    for name, gram in ref.items():
        err = float((sums.grams[name].double() - gram).norm() / gram.norm())
        assert err < 1e-5, (name, err)
        assert sums.rows[name] == ref_rows[name] == tokens, name


def test_tied_lm_head_has_no_gram():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in linear_layers(model)
    untied = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False}))
    assert "lm_head.weight" in linear_layers(untied)


RECIPE = """
base: alpha
store: store
data:
  stories: {path: stories.jsonl, text: text}
  questions: {path: questions.jsonl, text: text}
models:
  alpha: {path: alpha, data: stories}
  beta: {path: beta, data: questions}
steps:
  grams: {kind: gram, examples: 6, max_length: 12, batch_size: 4}
  regmean: {kind: merge, method: regmean, gram: grams, params: {alpha: 0.6}}
"""


def test_recipe_gram_step_and_regmean_merge_of_two_lms(tmp_path):
    from test_lm_eval import make_tiny_lm, write_jsonl

    from fmerge.data import encode_lm_batches
    from fmerge.tasks import build_task_model, data_spec, load_subset, load_tokenizer

    make_tiny_lm(tmp_path / "alpha", seed=1)
    make_tiny_lm(tmp_path / "beta", seed=2)
    write_jsonl(tmp_path / "stories.jsonl", [{"text": t} for t in (
        "the cat sat on the mat", "a dog ran to the park and it saw a bird in a tree",
        "the sky is blue", "a red car", "the big house is green", "it was fast")])
    write_jsonl(tmp_path / "questions.jsonl", [{"text": t} for t in (
        "what is the capital of france", "where is rome", "who saw the bird", "is paris a city",
        "what is the capital of italy", "where is the park")])
    (tmp_path / "lm.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "lm.yaml")
    rt = Runtime(recipe, Store(recipe.resolve(recipe.spec.store)))
    assert {r.step: r.state for r in executor.run(rt)} == {"grams": "computed", "regmean": "computed"}
    grams = {p.label: rt.store.open(p.key) for p in rt.planned["grams"]}
    merged = rt.store.open(rt.planned["regmean"][0].key).view("weights/")

    # the stored Gram of one layer = the same data run one sequence at a time
    model = build_task_model(rt, "beta")
    g = next(p for p in rt.planned["grams"] if p.label == "beta")
    rows = load_subset(rt, g.extra["data"], g.params["split"], g.params["examples"], g.params["seed"]).rows
    one_by_one = gram_matrices(model, encode_lm_batches(load_tokenizer(rt, "beta"), rows,
                                                        data_spec(rt, "questions", "train"), 1, 12))
    layer = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(grams["beta"].get("gram/" + layer), one_by_one.grams[layer], rtol=1e-5, atol=1e-5)
    assert "gram/lm_head.weight" not in grams["beta"].names()  # tied to the embeddings

    # the merged layer = the closed form from the stored Grams; the tied embeddings = the mean
    weights = [rt.source(m).get(layer) for m in ("alpha", "beta")]
    stored = [grams[m].get("gram/" + layer) for m in ("alpha", "beta")]
    torch.testing.assert_close(merged.get(layer).double(), closed_form(weights, stored, 0.6, 1e-8),
                               rtol=1e-5, atol=1e-6)
    embed = "model.embed_tokens.weight"
    torch.testing.assert_close(merged.get(embed), (rt.source("alpha").get(embed) + rt.source("beta").get(embed)) / 2)
