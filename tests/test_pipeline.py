"""A tiny version of the demo recipe: finetune -> fisher -> merge -> eval, all offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from fmerge import executor
from fmerge.api import load_recipe
from fmerge.runtime import Runtime
from fmerge.store import Store

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "cat", "dog", "fish", "red", "blue", "green"]


def tiny_base(root):
    """A 2-layer BERT with a word-level vocabulary, saved with its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertModel, PreTrainedTokenizerFast

    from conftest import tiny_bert_config

    root.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(root)
    torch.manual_seed(0)
    BertModel(tiny_bert_config(vocab_size=len(vocab))).save_pretrained(root)


def write_task(root, name, classes, seed):
    """Sentences whose label is decided by which word group they contain."""
    rng = random.Random(seed)
    d = root / name
    d.mkdir(parents=True)
    for split, n in (("train", 96), ("validation", 24), ("test", 40)):
        rows = []
        for _ in range(n):
            label = rng.randrange(len(classes))
            words = [rng.choice(classes[label]) for _ in range(3)] + [rng.choice(WORDS) for _ in range(2)]
            rng.shuffle(words)
            rows.append(json.dumps({"text": " ".join(words), "label": label}))
        (d / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def two_task_project(root: Path) -> None:
    """A tiny base in root/base and the sentiment (2 classes) and animal (3) data in root/data."""
    tiny_base(root / "base")
    write_task(root / "data", "sentiment", [["good", "great", "fine"], ["bad", "awful", "poor"]], 1)
    write_task(root / "data", "animal", [["cat"], ["dog"], ["fish"]], 2)


def two_task_recipe(source: str, steps: str) -> str:
    """The recipe of a project made by tiny_base and write_task (base, store, the sentiment and
    animal data): each task's model from `source` ('from_step: ft_{}' or 'path: <dir>/{}', the
    task's name filled in), then the `steps:` lines given."""
    models = "".join(f"  {t}: {{{source.format(t)}, data: {t}}}\n" for t in ("sentiment", "animal"))
    return f"""
base: base
store: store
data:
  sentiment: {{path: data/sentiment, label_names: [pos, neg]}}
  animal: {{path: data/animal, label_names: [cat, dog, fish]}}
models:
{models}steps:
{steps}"""


def finetune_steps(settings: str) -> str:
    """`steps:` lines fine-tuning both tasks' models (ft_sentiment, ft_animal) with these settings."""
    return "".join(f"  ft_{t}: {{kind: finetune, data: {t}, {settings}}}\n" for t in ("sentiment", "animal"))


RECIPE = two_task_recipe("from_step: ft_{}", finetune_steps("steps: 60, batch_size: 16, lr: 3.0e-3, max_length: 16") + """\
  fisher_exact: {kind: fisher, estimator: exact, examples: 32, max_length: 16}
  avg: {kind: merge, method: simple_average}
  fisher: {kind: merge, method: fisher, fisher: fisher_exact, params: {lambda: LAMBDA}}
  eval: {kind: eval, merges: [avg, fisher], max_length: 16, output: results}
""")


@pytest.fixture
def project(tmp_path):
    two_task_project(tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.replace("LAMBDA", "1.0"))
    return recipe


def run(recipe):
    r = load_recipe(recipe)
    rt = Runtime(r, Store(r.resolve(r.spec.store)))
    return rt, {rep.step: rep.state for rep in executor.run(rt)}


def test_tiny_pipeline_end_to_end_and_lambda_change_reuses_every_fisher(project):
    rt, states = run(project)
    assert set(states.values()) == {"computed"}
    results = json.loads((project.parent / "results" / "results.json").read_text())
    by = {(r["variant"], r["task"]): r for r in results}
    assert set(v for v, _ in by) == {"base", "avg", "fisher", "individual"}
    # the fine-tuned models learned their easy tasks
    assert by[("individual", "sentiment")]["accuracy"] > 0.7 and by[("individual", "animal")]["accuracy"] > 0.7

    # accuracy counted by hand for the individual sentiment model on the test split
    from fmerge.tasks import build_classifier, load_tokenizer

    model = build_classifier(rt, "sentiment")
    tok = load_tokenizer(rt, "sentiment")
    rows = [json.loads(l) for l in (project.parent / "data" / "sentiment" / "test.jsonl").read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for row in rows:
            enc = tok(row["text"], return_tensors="pt", truncation=True, max_length=16)
            correct += int(model(**enc).logits.argmax(-1).item() == row["label"])
    assert by[("individual", "sentiment")]["accuracy"] == pytest.approx(correct / len(rows))
    assert by[("individual", "sentiment")]["n"] == len(rows)

    # a λ-only change recomputes the Fisher merge and its evaluation, nothing else
    project.write_text(RECIPE.replace("LAMBDA", "[1.0, 2.0]"))
    _, states = run(project)
    assert states == {"ft_sentiment": "cached", "ft_animal": "cached", "fisher_exact": "cached",
                      "avg": "cached", "fisher": "computed", "eval": "computed"}


def test_base_prior_merge_equals_daheim_formula(project):
    """θ_0 + Σ λ_i F_i τ_i / (Σ λ_i F_i + F_0), with F_0 from a fisher step of one model."""
    text = RECIPE.replace("LAMBDA", "[1.0, 2.0]") + """
  prior_fisher: {kind: fisher, estimator: empirical, examples: 16, max_length: 16, models: [animal]}
  prior: {kind: merge, method: fisher, fisher: fisher_exact, base_fisher: prior_fisher,
          params: {lambda: [1.0, 2.0], base_prior: true, floor: 0}}
"""
    project.write_text(text)
    rt, states = run(project)
    assert states["prior"] == "computed"
    merged = rt.store.open(rt.planned["prior"][0].key)
    fisher = {p.label: rt.store.open(p.key) for p in rt.planned["fisher_exact"]}
    f0 = rt.store.open(rt.planned["prior_fisher"][0].key)
    name = "encoder.layer.1.output.dense.weight"
    theta0 = rt.source("__base__").get(name)
    num = torch.zeros_like(theta0)
    den = f0.get("fisher/bert." + name).clone()
    for lam, m in ((1.0, "sentiment"), (2.0, "animal")):
        f = fisher[m].get("fisher/bert." + name)
        num += lam * f * (rt.source(m).get("bert." + name) - theta0)
        den += lam * f
    torch.testing.assert_close(merged.get("weights/" + name), theta0 + num / den, rtol=1e-5, atol=1e-7)
