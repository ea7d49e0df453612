"""The step graph: planning, cache hits and misses, invalidation, exports."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmerge import executor
from fmerge.api import load_recipe
from fmerge.runtime import Runtime
from fmerge.store import Store
from conftest import ZOO_RECIPE, write_recipe


def runtime(path):
    recipe = load_recipe(path)
    return Runtime(recipe, Store(recipe.resolve(recipe.spec.store)))


def states(reports):
    return {r.step: r.state for r in reports}


@pytest.fixture
def recipe_path(tmp_path, zoo):
    return write_recipe(tmp_path, ZOO_RECIPE)


def test_first_run_computes_second_is_all_cached(recipe_path):
    assert states(executor.status(runtime(recipe_path))) == {"avg": "stale", "ta": "stale", "ties": "stale"}
    assert states(executor.run(runtime(recipe_path))) == {"avg": "computed", "ta": "computed", "ties": "computed"}
    assert states(executor.run(runtime(recipe_path))) == {"avg": "cached", "ta": "cached", "ties": "cached"}


def test_lambda_change_recomputes_only_that_merge(recipe_path):
    executor.run(runtime(recipe_path))
    recipe_path.write_text(recipe_path.read_text().replace("lambda: 0.3", "lambda: 0.5"))
    assert states(executor.status(runtime(recipe_path))) == {"avg": "cached", "ta": "stale", "ties": "cached"}
    assert states(executor.run(runtime(recipe_path))) == {"avg": "cached", "ta": "computed", "ties": "cached"}


def test_changed_model_byte_invalidates_its_dependents(recipe_path, tmp_path):
    executor.run(runtime(recipe_path))
    weights = tmp_path / "zoo" / "task1" / "model.safetensors"
    state = load_file(weights)
    name = "bert.encoder.layer.0.output.dense.weight"
    state[name][0, 0] += 1.0
    save_file(state, weights, metadata={"format": "pt"})
    assert states(executor.status(runtime(recipe_path))) == {"avg": "stale", "ta": "stale", "ties": "stale"}
    assert states(executor.run(runtime(recipe_path))) == {"avg": "computed", "ta": "computed", "ties": "computed"}


def test_only_and_force_and_dry_run(recipe_path):
    reports = executor.run(runtime(recipe_path), only=["ta"])
    assert states(reports) == {"ta": "computed"}
    assert states(executor.run(runtime(recipe_path), dry_run=True)) == {"avg": "stale", "ta": "cached", "ties": "stale"}
    assert states(executor.run(runtime(recipe_path), only=["ta"], force=["ta"])) == {"ta": "forced"}


def test_export_written_once_and_rewritten_only_when_content_changes(recipe_path, tmp_path):
    executor.run(runtime(recipe_path))
    out = tmp_path / "out" / "ties"
    weights = out / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert load_file(out / "heads" / "b.safetensors")["classifier.weight"].shape == (3, 16)
    executor.run(runtime(recipe_path))
    assert weights.stat().st_mtime_ns == first
    recipe_path.write_text(recipe_path.read_text().replace("density: 0.5", "density: 0.3"))
    executor.run(runtime(recipe_path))
    assert weights.stat().st_mtime_ns != first
    marker = json.loads((out / ".fmerge-export.json").read_text())
    assert marker["key"] == executor.status(runtime(recipe_path), only=["ties"])[0].keys[0]


def test_exported_model_loads_with_transformers(recipe_path, tmp_path):
    from transformers import AutoModel

    executor.run(runtime(recipe_path))
    model = AutoModel.from_pretrained(tmp_path / "out" / "ties")
    exported = load_file(tmp_path / "out" / "ties" / "model.safetensors")
    assert torch.equal(model.state_dict()["encoder.layer.1.output.dense.weight"],
                       exported["encoder.layer.1.output.dense.weight"])


def test_simple_average_equals_mean_with_prefix_alignment(recipe_path, tmp_path):
    executor.run(runtime(recipe_path))
    rt = runtime(recipe_path)
    key = executor.status(rt, only=["avg"])[0].keys[0]
    art = rt.store.open(key).view("weights/")
    models = [load_file(tmp_path / "zoo" / f"task{i}" / "model.safetensors") for i in range(3)]
    base = load_file(tmp_path / "zoo" / "base" / "model.safetensors")
    for name in base:
        expected = sum(m["bert." + name] for m in models) / 3 if base[name].is_floating_point() else base[name]
        assert torch.allclose(art.get(name), expected, atol=1e-6), name


def test_a_run_that_computes_turns_the_gc_back_on_after_the_cli_kept_it_off_for_start_up():
    import gc

    gc.disable()
    try:
        executor.resume_gc()
        assert gc.isenabled() and gc.get_freeze_count() > 0  # start-up's objects are out of its way
        executor.resume_gc()  # already on: nothing changes
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
