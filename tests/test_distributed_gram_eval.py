"""Grams and eval under torchrun (2 gloo processes on CPU) equal one process: each rank takes its
rows rank::2, the Gram sums and row counts are all-reduced, the eval's per-row predictions,
per-batch NLL sums and choice log-likelihoods are gathered, and rank 0 writes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from hostile import run
from test_fisher_cli import make_classifier
from test_lm_eval import CHOICES, make_tiny_lm, write_jsonl

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

WORDS = "the a cat dog sat ran on under mat rug big small red blue fast slow and then it was".split()


def torchrun_cli(*args) -> None:
    """`fmerge ARGS` as two gloo processes on this CPU."""
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "fmerge", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[:3000]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for _ in range(n)]


@pytest.fixture
def recipe(tmp_path):
    """One recipe whose gram and eval steps cover a classifier, a causal LM and multiple choice,
    each with an odd number of rows so the two ranks' shards differ in size."""
    clf, clf_data, _ = make_classifier(tmp_path)  # 30 labelled rows
    clf_test = write_jsonl(tmp_path / "clf_test.jsonl", [{"text": t, "label": i % 3}
                                                         for i, t in enumerate(sentences(17, 3))])
    lm = make_tiny_lm(tmp_path / "lm", seed=3)
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in sentences(13, 1)])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"text": t} for t in sentences(11, 2)])
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"q": r["question"], "choices": r["options"], "label": r["answer"]}
                                             for r in CHOICES] * 3)
    spec = {
        "base": str(lm),
        "data": {
            "task": {"splits": {"train": str(clf_data), "test": str(clf_test)}},
            "texts": {"splits": {"train": str(texts), "test": str(held_out)}},
            "mc": {"splits": {"test": str(mc)}, "text": "q", "choices": "choices"},
        },
        "models": {"clf": {"path": str(clf), "data": "task"}, "lm": {"path": str(lm), "data": "texts"},
                   "mc": {"path": str(lm), "data": "mc"}},
        "steps": {
            "grams": {"kind": "gram", "models": ["clf", "lm"], "examples": 13, "batch_size": 4, "max_length": 16},
            "ev": {"kind": "eval", "base": False, "batch_size": 4, "max_length": 16, "output": "results"},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def stored_grams(store) -> dict[str, dict[str, torch.Tensor]]:
    """Every gram artifact of a store: its tensors by name, under its key (content-addressed, so
    one process and two compute the same keys)."""
    from fmerge.store import Store

    s = Store(store)
    return {info.key: {n: s.open(info.key).get(n) for n in s.open(info.key).names()} for info in s.find("gram")}


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_gram_and_eval_under_torchrun_equal_one_process(recipe, tmp_path):
    torchrun_cli("run", recipe, "--store", tmp_path / "two", "--set", "ev.output=two_results")
    single = run(["run", recipe, "--store", tmp_path / "one", "--set", "ev.output=one_results"])
    assert single.code == 0, single.err

    one, two = stored_grams(tmp_path / "one"), stored_grams(tmp_path / "two")
    assert len(one) == 2 and set(one) == set(two)
    for key, tensors in one.items():
        assert set(tensors) == set(two[key]) and any(n.startswith("gram_rows/") for n in tensors)
        for n, t in tensors.items():
            if n.startswith("gram_rows/"):
                assert torch.equal(t, two[key][n]), n  # every row counted once
            else:
                torch.testing.assert_close(two[key][n], t, rtol=1e-6, atol=1e-6 * float(t.abs().max()))

    results = {name: json.loads((tmp_path / f"{name}_results" / "results.json").read_text()) for name in ("one", "two")}
    by_task = {name: {r["task"]: r for r in rows} for name, rows in results.items()}
    assert set(by_task["one"]) == set(by_task["two"]) == {"clf", "lm", "mc"}
    for task, row in by_task["one"].items():
        shared = by_task["two"][task]
        assert row["n"] == shared["n"] > 10, task  # every row scored once, by one of the ranks
        for metric in ("accuracy", "macro_f1", "acc", "acc_norm", "tokens"):
            assert row.get(metric) == shared.get(metric), (task, metric)
        for metric in ("loss", "perplexity"):
            if metric in row:
                assert shared[metric] == pytest.approx(row[metric], rel=1e-6), (task, metric)
    assert by_task["one"]["lm"]["tokens"] > 0


def fisher_gram_eval(root, store, **top) -> dict[str, dict]:
    """Run the recipe with a Fisher step added (and `top` keys set) in process; every stored tensor
    of the statistics and every eval figure, by step and model."""
    from fmerge import executor
    from fmerge.api import load_recipe
    from fmerge.runtime import Runtime
    from fmerge.store import Store

    spec = yaml.safe_load((root / "recipe.yaml").read_text())
    spec["steps"]["fisher"] = {"kind": "fisher", "estimator": "empirical", "models": ["clf", "lm"], "examples": 9,
                               "batch_size": 4, "max_length": 16}
    (root / "big.yaml").write_text(yaml.safe_dump({**spec, **top}))
    recipe = load_recipe(root / "big.yaml")
    rt = Runtime(recipe, Store(store))
    executor.run(rt)
    found = {}
    for step in ("grams", "fisher"):
        for p in rt.planned[step]:
            art = rt.store.open(p.key)
            found[f"{step}/{p.label}"] = {n: art.get(n) for n in art.names()}
    found["ev"] = {r["task"]: r for r in rt.results["ev"]}
    return found


def test_device_map_gives_the_numbers_of_one_device(recipe, tmp_path, monkeypatch):
    """device_map: auto places the models through accelerate's dispatch; on this CPU every layer
    lands on 'cpu', and forcing accelerate's device-moving hooks onto every layer exercises the
    path a model spread over GPUs takes. Fisher, Grams and eval equal the plain run's."""
    accelerate = pytest.importorskip("accelerate")
    plain = fisher_gram_eval(tmp_path, tmp_path / "plain")
    dispatched = []
    real = accelerate.dispatch_model

    def dispatch_with_hooks(model, device_map, **kwargs):
        dispatched.append(set(device_map.values()))
        return real(model, device_map=device_map, force_hooks=True, **kwargs)

    monkeypatch.setattr(accelerate, "dispatch_model", dispatch_with_hooks)
    spread = fisher_gram_eval(tmp_path, tmp_path / "spread", device_map="auto", max_memory={"cpu": "1GiB"})
    assert dispatched and all(d == {"cpu"} for d in dispatched)
    assert set(plain) == set(spread)
    for name, tensors in plain.items():
        if name == "ev":
            continue
        assert set(tensors) == set(spread[name]), name
        for n, t in tensors.items():
            torch.testing.assert_close(spread[name][n], t, rtol=1e-5, atol=1e-7, msg=f"{name} {n}")
    for task, row in plain["ev"].items():
        for metric in ("accuracy", "macro_f1", "acc", "acc_norm", "tokens", "n"):
            assert spread["ev"][task].get(metric) == row.get(metric), (task, metric)
        if "loss" in row:
            assert spread["ev"][task]["loss"] == pytest.approx(row["loss"], rel=1e-6)


def test_device_map_without_accelerate_says_how_to_install_it(recipe, tmp_path, monkeypatch):
    from fmerge.errors import RecipeError

    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate raises ImportError
    with pytest.raises(RecipeError) as refused:
        fisher_gram_eval(tmp_path, tmp_path / "store", device_map="auto")
    message = str(refused.value)
    assert "big.yaml" in message and "device_map 'auto'" in message and "`pip install accelerate`" in message
    assert "remove device_map" in message
