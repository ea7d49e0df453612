"""Tiny models built from transformers configs (random weights, no hub) for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    cfg = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=32, attn_implementation="eager")
    cfg.update(overrides)
    return BertConfig(**cfg)


def make_zoo(root: Path, n_models: int = 3, seed: int = 0, num_labels=(2, 3, 4), noise: float = 0.05) -> dict[str, Path]:
    """A base BertModel and fine-tuned BertForSequenceClassification models around it."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    base = BertModel(tiny_bert_config(), add_pooling_layer=True)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i in range(n_models):
        labels = num_labels[i % len(num_labels)]
        model = BertForSequenceClassification(tiny_bert_config(num_labels=labels))
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.bert.parameters():
                p.add_(noise * torch.randn_like(p))
        name = f"task{i}"
        paths[name] = root / name
        model.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread, above all on a shared, busy machine; a module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def zoo(tmp_path: Path) -> dict[str, Path]:
    return make_zoo(tmp_path / "zoo")


def write_recipe(dir: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = dir / name
    path.write_text(text)
    return path


ZOO_RECIPE = """
base: zoo/base
models:
  a: zoo/task0
  b: zoo/task1
  c: zoo/task2
store: store
steps:
  avg:
    kind: merge
    method: simple_average
  ta:
    kind: merge
    method: task_arithmetic
    params: {lambda: 0.3}
  ties:
    kind: merge
    method: ties
    params: {density: 0.5, lambda: 1.0}
    export: out/ties
"""


def fmerge_cli(*args: str, cwd: Path | None = None, check: bool = True):
    """Run the real `fmerge` entry point in a subprocess, as a user would."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fmerge", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if check and proc.returncode != 0:
        raise AssertionError(f"fmerge {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc
