"""`fmerge fisher` as a user runs it: export, extension with more examples, torchrun sharding."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import fmerge_cli
from test_pipeline import WORDS, tiny_base


def make_classifier(root, num_labels=3, seed=1):
    """A tiny BERT classifier with its tokenizer, and a jsonl file of labelled sentences."""
    from transformers import BertForSequenceClassification, BertModel

    tiny_base(root / "base")
    model_dir = root / "clf"
    shutil.copytree(root / "base", model_dir)
    base = BertModel.from_pretrained(root / "base")
    torch.manual_seed(seed)
    clf = BertForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": num_labels}))
    clf.bert.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    clf.save_pretrained(model_dir)
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 7))), "label": rng.randrange(num_labels)}
            for _ in range(30)]
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data, rows


def brute_force_exact(model_dir, rows, n, seed=0):
    """Σ_c p_c (∂ log p_c / ∂θ)² averaged over the seeded subset, one example and one class at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    chosen = np.random.default_rng(seed).permutation(len(rows))[:n]
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in chosen:
        enc = tok(rows[int(i)]["text"], return_tensors="pt")
        for c in range(model.config.num_labels):
            model.zero_grad()
            logp = torch.log_softmax(model(**enc).logits[0], -1)
            logp[c].backward()
            p_c = float(logp[c].detach().exp())
            for name, p in model.named_parameters():
                if p.grad is not None:
                    total[name] += p_c * p.grad ** 2
    return {name: t / n for name, t in total.items()}


def fisher_args(model_dir, data, n, export, store, estimator="exact"):
    return ["fisher", "--model", model_dir, "--data", data, "--text-column", "text", "--label-column", "label",
            "--estimator", estimator, "--examples", str(n), "--export", export, "--store", store]


def assert_close(got: dict, want: dict, rtol=1e-5):
    """Relative to each tensor's largest entry; tensors whose true gradient is 0 (a key bias under
    softmax) hold only rounding noise, so they are compared against the largest entry overall."""
    assert got.keys() == want.keys()
    overall = max(float(t.abs().max()) for t in want.values())
    for name in want:
        scale = max(float(want[name].abs().max()), 1e-4 * overall)
        err = float((got[name] - want[name]).abs().max()) / scale
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_classifier(tmp_path_factory.mktemp("fisher_cli"))


def test_export_equals_brute_force_loop(task, tmp_path):
    model_dir, data, rows = task
    export = tmp_path / "fisher.safetensors"
    proc = fmerge_cli(*fisher_args(model_dir, data, 12, export, tmp_path / "store"))
    assert "Fisher diagonals" in proc.stdout
    got = load_file(export)
    assert_close(got, brute_force_exact(model_dir, rows, 12))


def test_more_examples_extend_the_cached_estimate(task, tmp_path):
    model_dir, data, rows = task
    store = tmp_path / "store"
    fmerge_cli(*fisher_args(model_dir, data, 7, tmp_path / "f7.safetensors", store, "sampled"))
    proc = fmerge_cli(*fisher_args(model_dir, data, 19, tmp_path / "f19.safetensors", store, "sampled"))
    cells = [c.strip() for c in next(line for line in proc.stdout.splitlines() if "│ clf" in line).split("│")]
    assert cells[2:5] == ["sampled", "19", "7"], cells  # estimator, examples, extended from
    fresh = fmerge_cli(*fisher_args(model_dir, data, 19, tmp_path / "fresh.safetensors", tmp_path / "other", "sampled"))
    cells = [c.strip() for c in next(line for line in fresh.stdout.splitlines() if "│ clf" in line).split("│")]
    assert cells[4] == "-"
    assert_close(load_file(tmp_path / "f19.safetensors"), load_file(tmp_path / "fresh.safetensors"))
    # Asking again is a cache hit: nothing is computed.
    again = fmerge_cli(*fisher_args(model_dir, data, 19, tmp_path / "f19.safetensors", store, "sampled"))
    assert "cached" in again.stdout and "computed" not in again.stdout


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_torchrun_two_processes_equal_one(task, tmp_path):
    model_dir, data, rows = task
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fmerge",
           *map(str, fisher_args(model_dir, data, 13, tmp_path / "two.safetensors", tmp_path / "s2", "sampled"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fmerge_cli(*fisher_args(model_dir, data, 13, tmp_path / "one.safetensors", tmp_path / "s1", "sampled"))
    assert_close(load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors"))
