"""Language-model evaluation: per-token loss and perplexity, and multiple choice by log-likelihood,
each against a plain loop that runs the model once per scored token (tiny Llama and GPT-2 models
and a word-level tokenizer, all built here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fmerge import api
from fmerge.lm_scoring import IGNORE_INDEX, choice_accuracy, perplexity, target_logprobs

WORDS = ("the a cat dog sat on mat ran to park red blue big small is was and it saw bird tree sky green "
         "house car fast slow what where who paris rome city capital of france italy yes no").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer (split on whitespace and punctuation) with BOS, EOS and padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(directory)


def make_tiny_lm(directory: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A randomly initialised causal LM (hidden 16, 2 layers, tied embeddings) and its tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    vocab = len(SPECIALS) + len(WORDS)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True, **ids)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64, **ids)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_model(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(directory)


def next_token_logprob(model, context: list[int], token: int) -> float:
    """log p(token | context), from one forward pass over the context alone."""
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1]
    return float(torch.log_softmax(logits.double(), -1)[token])


def words(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eval_recipe(tmp_path: Path, model: Path, data: dict, step: dict | None = None):
    recipe = {"base": str(model), "models": {"m": {"path": str(model), "data": "d"}}, "store": str(tmp_path / "store"),
              "data": {"d": data}, "steps": {"ev": {"kind": "eval", "base": False, **(step or {})}}}
    import yaml

    return api.parse_recipe(yaml.safe_dump(recipe), tmp_path / "recipe.yaml")


def run_eval(recipe) -> dict:
    rt = api.runtime(recipe)
    from fmerge import executor

    executor.run(rt)
    (row,) = rt.results["ev"]
    return row


# -- the pure functions ---------------------------------------------------------------------------


def test_target_logprobs_equal_a_loop_over_positions():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    got = target_logprobs(logits, labels)
    for b in range(3):
        for t in range(1, 7):
            want = 0.0 if labels[b, t] == IGNORE_INDEX else float(torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]])
            assert got[b, t - 1].item() == pytest.approx(want, abs=1e-6)
    assert perplexity(6.0, 3) == pytest.approx(math.exp(2.0))


def test_choice_accuracy_by_sum_and_per_character():
    # Row 0: the long right answer wins only per character; row 1: both pick choice 0; row 2: a tie goes first.
    logliks = [[-2.0, -3.0], [-1.0, -4.0], [-1.0, -1.0]]
    choices = [["ab", "abcdef"], ["x", "y"], ["p", "q"]]
    result = choice_accuracy(logliks, choices, [1, 0, 1])
    assert result == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}


def test_config_decides_causal_lm():
    from fmerge.tasks import config_is_causal_lm

    assert config_is_causal_lm({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    assert config_is_causal_lm({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    assert config_is_causal_lm({"model_type": "mistral"})
    assert config_is_causal_lm({"architectures": ["Qwen2Model"], "model_type": "qwen2"})
    assert not config_is_causal_lm({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"})
    assert not config_is_causal_lm({"architectures": ["BertModel"], "model_type": "bert"})
    assert not config_is_causal_lm({"model_type": "bert"})


# -- through the eval step, against a loop over tokens --------------------------------------------

# A prompt is followed directly by its text: the separating space or newline is the data's.
TEXTS = [{"prompt": "what is red ", "text": "the big red car ran to the park"},
         {"prompt": "who\n", "text": "a cat sat"},
         {"prompt": "where is the dog", "text": " it ran to the tree and the dog saw a bird in the sky"}]


def hand_perplexity(model, tokenizer, rows: list[dict], max_length: int, prompt: bool) -> tuple[float, int]:
    """(mean NLL per scored token, tokens) by one forward pass per token: text tokens after
    <s> + prompt are scored, each given the tokens of its window (windows of max_length tokens,
    each starting at the last token of the one before)."""
    total, count = 0.0, 0
    for r in rows:
        context = words(tokenizer, r["prompt"]) if prompt else []
        ids = [tokenizer.bos_token_id, *context, *words(tokenizer, r["text"])]
        for p in range(1 + len(context), len(ids)):
            start = (p - 1) // (max_length - 1) * (max_length - 1)
            total -= next_token_logprob(model, ids[start:p], ids[p])
            count += 1
    return total / count, count


@pytest.mark.parametrize("arch,max_length,prompt", [("llama", 64, True), ("llama", 5, False), ("gpt2", 4, True)])
def test_perplexity_equals_a_loop_over_tokens(tmp_path, arch, max_length, prompt):
    model_dir = make_tiny_lm(tmp_path / arch, arch)
    data = write_jsonl(tmp_path / "lm.jsonl", TEXTS)
    spec = {"splits": {"test": str(data)}, **({"prompt": "prompt"} if prompt else {})}
    row = run_eval(eval_recipe(tmp_path, model_dir, spec, {"max_length": max_length, "batch_size": 2}))
    loss, tokens = hand_perplexity(*reference_model(model_dir), TEXTS, max_length, prompt)
    assert row["tokens"] == tokens and row["n"] == len(TEXTS) and row["metric"] == "perplexity"
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


CHOICES = [{"question": "the capital of france is", "options": ["paris", "rome city", "the big blue house"], "answer": 0},
           {"question": "the sky is", "options": ["blue", "green and red"], "answer": 1},
           {"question": "a cat sat on the", "options": ["mat", "dog", "big red car"], "answer": 2},
           {"question": "what ran to the park", "options": ["the dog", "a tree"], "answer": 0}]


@pytest.mark.parametrize("arch,answers", [("llama", "int"), ("gpt2", "int"), ("llama", "digit strings")])
def test_multiple_choice_equals_a_loop_over_tokens(tmp_path, arch, answers):
    """Answers are indices, or strings of digits as HellaSwag stores them ("2")."""
    model_dir = make_tiny_lm(tmp_path / arch, arch, seed=3)
    rows = CHOICES if answers == "int" else [{**r, "answer": str(r["answer"])} for r in CHOICES]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    spec = {"splits": {"test": str(data)}, "text": "question", "choices": "options", "label": "answer"}
    row = run_eval(eval_recipe(tmp_path, model_dir, spec, {"batch_size": 3}))
    model, tokenizer = reference_model(model_dir)
    acc, acc_norm = [], []
    for r in CHOICES:
        context = words(tokenizer, r["question"])
        sums = []
        for choice in r["options"]:
            ids = context + words(tokenizer, " " + choice)
            sums.append(sum(next_token_logprob(model, ids[:p], ids[p]) for p in range(len(context), len(ids))))
        acc.append(int(np.argmax(sums)) == r["answer"])
        acc_norm.append(int(np.argmax(np.array(sums) / [len(c) for c in r["options"]])) == r["answer"])
    assert row["metric"] == "accuracy" and row["n"] == len(CHOICES)
    assert row["acc"] == pytest.approx(np.mean(acc)) and row["accuracy"] == row["acc"]
    assert row["acc_norm"] == pytest.approx(np.mean(acc_norm))


def test_tied_lm_head_comes_from_the_embeddings(tmp_path):
    from fmerge.tasks import build_task_model, model_kind
    from safetensors import safe_open

    model_dir = make_tiny_lm(tmp_path / "llama")
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # saved once, as the embeddings
    rt = api.runtime(eval_recipe(tmp_path, model_dir, {"splits": {"test": str(write_jsonl(tmp_path / "d.jsonl", TEXTS))}}))
    assert model_kind(rt, "m") == "causal_lm"
    net = build_task_model(rt, "m")
    reference, _ = reference_model(model_dir)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(net(ids).logits, reference(ids).logits)


# -- sweeps over language models: chosen by the lowest mean per-token loss ------------------------


def lm_sweep_recipe(tmp_path: Path, second_task: str = "causal_lm") -> Path:
    """Base and two fine-tunes (tiny Llamas of different seeds), task arithmetic swept over λ,
    chosen on each model's validation texts; `second_task: multiple_choice` scores the second
    model by accuracy instead."""
    import yaml

    base, one, two = (make_tiny_lm(tmp_path / f"llama{seed}", seed=seed) for seed in (0, 1, 2))
    texts = {"validation": str(write_jsonl(tmp_path / "val.jsonl", TEXTS[:2])),
             "test": str(write_jsonl(tmp_path / "test.jsonl", TEXTS[2:]))}
    data = {"d1": {"splits": texts, "task": "causal_lm", "prompt": "prompt"}}
    if second_task == "causal_lm":
        data["d2"] = {"splits": {"validation": str(write_jsonl(tmp_path / "val2.jsonl", TEXTS[2:])),
                                 "test": str(write_jsonl(tmp_path / "test2.jsonl", TEXTS[:1]))}, "task": "causal_lm"}
    else:
        data["d2"] = {"splits": {"validation": str(write_jsonl(tmp_path / "mc_val.jsonl", CHOICES[:2])),
                                 "test": str(write_jsonl(tmp_path / "mc_test.jsonl", CHOICES[2:]))},
                      "task": "multiple_choice", "text": "question", "choices": "options", "label": "answer"}
    recipe = {"base": str(base), "store": str(tmp_path / "store"), "data": data,
              "models": {"one": {"path": str(one), "data": "d1"}, "two": {"path": str(two), "data": "d2"}},
              "steps": {"ta": {"kind": "merge", "method": "task_arithmetic"},
                        "ev": {"kind": "eval", "base": False, "individual": False, "merges": ["ta"],
                               "output": str(tmp_path / "out")}},
              "sweep": {"ta.params.lambda": [0.5, 1.0, 2.0]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_lm_sweep_chooses_the_lowest_mean_loss(tmp_path):
    from fmerge import executor

    path = lm_sweep_recipe(tmp_path)
    rt = api.runtime(api.load_recipe(path))
    executor.run(rt)
    select = [p for p in rt.planned["ev"] if p.extra["role"] == "select"]
    loss = {(p.extra["variant"], p.extra["task"]): rt.store.open(p.key).meta["loss"] for p in select}
    variants = [v.name for v in rt.recipe.sweeps["ta"]]
    # λ = 0.5 of two task vectors is the plain average of the two models: its stored validation
    # losses are the loop over tokens of that average
    average, tokenizer = reference_model(tmp_path / "llama1")
    two = reference_model(tmp_path / "llama2")[0].state_dict()
    average.load_state_dict({n: (t + two[n]) / 2 for n, t in average.state_dict().items()})
    assert loss[(variants[0], "one")] == pytest.approx(hand_perplexity(average, tokenizer, TEXTS[:2], 512, True)[0],
                                                      rel=1e-5)
    assert loss[(variants[0], "two")] == pytest.approx(hand_perplexity(average, tokenizer, TEXTS[2:], 512, False)[0],
                                                      rel=1e-5)
    mean = {v: (loss[(v, "one")] + loss[(v, "two")]) / 2 for v in variants}
    assert len(set(mean.values())) == len(variants)  # distinct, so the direction of the choice matters
    winner = min(variants, key=mean.get)
    (sweep,) = json.loads((tmp_path / "out" / "sweeps.json").read_text())
    assert sweep["chosen"] == winner and sweep["metric"] == "loss" and "lowest" in sweep["rule"]
    assert sweep["loss"] == {t: [loss[(v, t)] for v in variants] for t in ("one", "two")}
    assert {r["variant"] for r in rt.results["ev"]} == {winner}
    assert (tmp_path / "out" / "sweep_ta.png").is_file()
    from rich.console import Console

    from fmerge.report import sweep_table

    console = Console(record=True, width=200)
    console.print(sweep_table(sweep))
    text = " ".join(console.export_text().split())
    assert "loss on split 'validation' (chosen by lowest average)" in text and f"{mean[winner]:.3f}" in text


def test_lm_sweep_over_tasks_scored_by_different_metrics_is_refused(tmp_path):
    from hostile import assert_refused, run

    path = lm_sweep_recipe(tmp_path, second_task="multiple_choice")
    assert_refused(run(["status", str(path)]), "ev", "different metrics", "loss: one", "accuracy: two",
                   "separate eval steps")
