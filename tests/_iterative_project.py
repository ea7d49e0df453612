"""A tiny offline project for the iterative steps: a word-level BERT base, three classifier models
around it (each with its own head and labelled jsonl task), and a runner."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from rich.console import Console

from fmerge import executor
from fmerge.api import load_recipe
from fmerge.runtime import Runtime
from fmerge.store import Store
from test_pipeline import WORDS, tiny_base, write_task

TASKS = {
    "sentiment": [["good", "great", "fine"], ["bad", "awful", "poor"]],
    "animal": [["cat"], ["dog"], ["fish"]],
    "color": [["red"], ["blue", "green"]],
}

HEADER = """
base: base
store: store
seed: 0
data:
  sentiment: {path: data/sentiment}
  animal: {path: data/animal}
  color: {path: data/color}
models:
  sentiment: {path: models/sentiment, data: sentiment}
  animal: {path: models/animal, data: animal}
  color: {path: models/color, data: color}
steps:
"""


def build(root: Path) -> Path:
    """Write base, models and data under root; return root."""
    from transformers import BertForSequenceClassification, BertModel

    from conftest import tiny_bert_config

    tiny_base(root / "base")
    base = BertModel.from_pretrained(root / "base")
    for seed, (name, classes) in enumerate(TASKS.items()):
        write_task(root / "data", name, classes, seed + 1)
        torch.manual_seed(10 + seed)
        model = BertForSequenceClassification(tiny_bert_config(vocab_size=5 + len(WORDS), num_labels=len(classes)))
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.bert.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / "models" / name)
    return root


def run(recipe: Path, only=None):
    """(runtime, {step: state}, console text) of one executor run."""
    r = load_recipe(recipe)
    buf = io.StringIO()
    rt = Runtime(r, Store(r.resolve(r.spec.store)), Console(file=buf, width=200))
    states = {rep.step: rep.state for rep in executor.run(rt, only)}
    return rt, states, buf.getvalue()
