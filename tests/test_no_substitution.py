"""Nothing is substituted silently (issue "core made trustworthy", point 6).

A model lacking a tensor of the base, a checkpoint missing a shard, a tensor held by two weight
files: each is an FmergeError naming the tensors and files, in process and through the CLI (exit 2,
no traceback). Taking the base's value for a missing tensor needs the recipe's explicit
`missing_tensors: base`, and is then listed in the artifact's plan and the exported model card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fmerge_cli, write_recipe
from fmerge.errors import FmergeError
from fmerge.io import ModelDir, content_hash
from fmerge.merging import plan_tensors
from fmerge.recipe import DEFAULT_HEADS, RecipeSpec
from fmerge.store import Store

GONE = "encoder.layer.0.attention.self.query.weight"  # base naming; the classifiers add 'bert.'


def cli_error(*args, cwd=None) -> str:
    proc = fmerge_cli(*args, cwd=cwd, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    return " ".join(proc.stderr.split())  # rich may wrap long paths


def lib_error(fn, *args, **kwargs) -> str:
    with pytest.raises(FmergeError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg.strip()  # one paragraph
    return msg


def copy_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    for n in names:
        del state[n]
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def shard(src: Path, dst: Path, n_shards: int = 2, index: bool = True) -> tuple[Path, dict[str, str]]:
    """A copy of `src` saved as `n_shards` safetensors shards (and an index): {tensor: shard file}."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = list(state)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[i * len(names) // n_shards:(i + 1) * len(names) // n_shards]
        save_file({n: state[n] for n in part}, dst / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    if index:
        write_index(dst, weight_map)
    return dst, weight_map


def write_index(dst: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json") -> None:
    (dst / name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def recipe(tmp_path: Path, model_b: str, extra: str = "") -> Path:
    return write_recipe(tmp_path, f"base: zoo/base\nmodels: {{a: zoo/task0, b: {model_b}}}\nstore: store\n{extra}"
                                  "steps:\n  avg: {kind: merge, method: simple_average, export: out/avg}\n")


# ----------------------------------------------------------------------------- a model lacks a tensor

def test_missing_tensor_is_an_error_naming_it_and_the_model(tmp_path, zoo):
    lacking = copy_without(zoo["task1"], tmp_path / "zoo" / "lacking", "bert." + GONE)
    base, models = ModelDir(zoo["base"]), {"a": ModelDir(zoo["task0"]), "b": ModelDir(lacking)}
    msg = lib_error(plan_tensors, base, models, [], DEFAULT_HEADS)
    assert f"model 'b' lacks 1: '{GONE}'" in msg
    assert "missing_tensors: base" in msg and "'exclude'" in msg
    assert "model 'a'" not in msg
    # the default policy is the same
    assert lib_error(plan_tensors, base, models, [], DEFAULT_HEADS, "error") == msg
    # excluding the tensor is an explicit choice: no error, nothing recorded as substituted
    plan = plan_tensors(base, models, [r"\.0\.attention\.self\.query\.weight$"], DEFAULT_HEADS)
    assert GONE in plan.copy and plan.from_base == {}


def test_many_missing_tensors_are_counted(tmp_path, zoo):
    state = load_file(zoo["task1"] / "model.safetensors")
    layer1 = [n for n in state if ".layer.1." in n]
    lacking = copy_without(zoo["task1"], tmp_path / "zoo" / "lacking", *layer1)
    lacking2 = copy_without(zoo["task2"], tmp_path / "zoo" / "lacking2", "bert." + GONE)
    msg = lib_error(plan_tensors, ModelDir(zoo["base"]),
                    {"a": ModelDir(zoo["task0"]), "b": ModelDir(lacking), "c": ModelDir(lacking2)}, [], DEFAULT_HEADS)
    assert f"{len(layer1) + 1} floating-point tensor(s) of the base are missing" in msg
    assert f"model 'b' lacks {len(layer1)}: '{layer1[0][len('bert.'):]}'" in msg
    assert f"and {len(layer1) - 3} more" in msg
    assert f"model 'c' lacks 1: '{GONE}'" in msg


def test_base_policy_takes_the_base_value_and_records_it(tmp_path, zoo):
    lacking = copy_without(zoo["task1"], tmp_path / "zoo" / "lacking", "bert." + GONE)
    plan = plan_tensors(ModelDir(zoo["base"]), {"a": ModelDir(zoo["task0"]), "b": ModelDir(lacking)}, [],
                        DEFAULT_HEADS, "base")
    assert GONE in plan.copy and GONE not in plan.merge
    assert plan.from_base == {GONE: ["b"]} and plan.summary()["from_base"] == {GONE: ["b"]}
    with pytest.raises(FmergeError, match="unknown policy 'fill'"):
        plan_tensors(ModelDir(zoo["base"]), {"b": ModelDir(lacking)}, [], DEFAULT_HEADS, "fill")


def test_recipe_option_is_validated():
    assert RecipeSpec.model_fields["missing_tensors"].default == "error"
    assert "base" in RecipeSpec.model_fields["missing_tensors"].description


def test_tensor_under_another_prefix_is_never_dropped(tmp_path, zoo):
    """A body tensor saved under a different prefix would otherwise become a per-model 'head' and the
    base's value would take its place: refused even with missing_tensors: base."""
    dst = copy_without(zoo["task1"], tmp_path / "zoo" / "renamed", "bert." + GONE)
    state = load_file(dst / "model.safetensors")
    state["roberta." + GONE] = load_file(zoo["task1"] / "model.safetensors")["bert." + GONE]
    save_file(state, dst / "model.safetensors")
    models = {"a": ModelDir(zoo["task0"]), "b": ModelDir(dst)}
    for policy in ("error", "base"):
        msg = lib_error(plan_tensors, ModelDir(zoo["base"]), models, [], DEFAULT_HEADS, policy)
        assert f"model 'b' has 'roberta.{GONE}' where the base has '{GONE}'" in msg
        assert "different prefix" in msg


def test_missing_tensor_through_the_cli(tmp_path, zoo):
    copy_without(zoo["task1"], tmp_path / "zoo" / "lacking", "bert." + GONE)
    msg = cli_error("run", recipe(tmp_path, "zoo/lacking"))
    assert f"model 'b' lacks 1: '{GONE}'" in msg and "missing_tensors: base" in msg
    assert not (tmp_path / "out").exists()


def test_missing_tensor_with_base_policy_through_the_cli(tmp_path, zoo):
    copy_without(zoo["task1"], tmp_path / "zoo" / "lacking", "bert." + GONE)
    fmerge_cli("run", recipe(tmp_path, "zoo/lacking", "missing_tensors: base\n"))
    merged = load_file(tmp_path / "out" / "avg" / "model.safetensors")
    base = load_file(zoo["base"] / "model.safetensors")
    a, b = load_file(zoo["task0"] / "model.safetensors"), load_file(zoo["task1"] / "model.safetensors")
    assert torch.equal(merged[GONE], base[GONE])
    other = "encoder.layer.0.attention.self.key.weight"
    assert torch.allclose(merged[other], (a["bert." + other] + b["bert." + other]) / 2, atol=1e-6)
    (info,) = [i for i in Store(tmp_path / "store").list() if i.kind == "merge"]
    assert Store(tmp_path / "store").open(info.key).meta["plan"]["from_base"] == {GONE: ["b"]}
    card = (tmp_path / "out" / "avg" / "README.md").read_text()
    assert "## Tensors taken from the base" in card and f"- `{GONE}` (missing in b)" in card


# ----------------------------------------------------------------------------- shards

def test_sharded_checkpoint_reads_like_the_single_file(tmp_path, zoo):
    for index in (True, False):
        sharded, _ = shard(zoo["task1"], tmp_path / f"sharded{index}", 3, index=index)
        m = ModelDir(sharded)
        assert sorted(m.names()) == sorted(ModelDir(zoo["task1"]).names())
        assert content_hash(m) == content_hash(ModelDir(zoo["task1"]))


def test_missing_shard_named_in_the_index(tmp_path, zoo):
    sharded, weight_map = shard(zoo["task1"], tmp_path / "zoo" / "sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    gone = [n for n, f in weight_map.items() if f == "model-00002-of-00002.safetensors"]
    msg = lib_error(ModelDir, sharded, label="b")
    assert "Model 'b': model.safetensors.index.json names shard file(s) missing" in msg
    assert "model-00002-of-00002.safetensors" in msg and f"'{gone[0]}'" in msg
    assert f"hold {len(gone)} tensor(s)" in msg and "fetch the missing shard(s) again" in msg


def test_missing_shard_through_the_cli(tmp_path, zoo):
    sharded, _ = shard(zoo["task1"], tmp_path / "zoo" / "sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    msg = cli_error("run", recipe(tmp_path, "zoo/sharded"))
    assert "model-00002-of-00002.safetensors" in msg and "missing" in msg


def test_missing_shard_without_an_index(tmp_path, zoo):
    sharded, _ = shard(zoo["task1"], tmp_path / "sharded", 3, index=False)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    msg = lib_error(ModelDir, sharded, label="b")
    assert "shard file(s) model-00002-of-00003.safetensors missing" in msg and "3 shards, 2 are present" in msg


def test_shards_of_two_saves(tmp_path, zoo):
    sharded, _ = shard(zoo["task1"], tmp_path / "sharded", 2, index=False)
    shutil.copy(sharded / "model-00001-of-00002.safetensors", sharded / "model-00001-of-00003.safetensors")
    msg = lib_error(ModelDir, sharded, label="b")
    assert "mixes shards of different saves" in msg and "-of-00002, -of-00003" in msg


def duplicate_in_shards(src: Path, dst: Path) -> tuple[Path, str]:
    """Shards without an index where the second also holds (another value of) a tensor of the first."""
    sharded, _ = shard(src, dst, index=False)
    first = load_file(sharded / "model-00001-of-00002.safetensors")
    dup = next(iter(first))
    second = load_file(sharded / "model-00002-of-00002.safetensors")
    second[dup] = first[dup] + 1.0
    save_file(second, sharded / "model-00002-of-00002.safetensors")
    return sharded, dup


def test_tensor_in_two_shards_is_an_error(tmp_path, zoo):
    sharded, dup = duplicate_in_shards(zoo["task1"], tmp_path / "sharded")
    msg = lib_error(ModelDir, sharded, label="b")
    assert (f"Model 'b': tensor '{dup}' is in two weight files, model-00001-of-00002.safetensors and "
            f"model-00002-of-00002.safetensors") in msg and "remove the file" in msg


def test_tensor_in_two_shards_through_the_cli(tmp_path, zoo):
    _, dup = duplicate_in_shards(zoo["task1"], tmp_path / "zoo" / "sharded")
    msg = cli_error("run", recipe(tmp_path, "zoo/sharded"))
    assert f"'{dup}' is in two weight files" in msg


def test_stale_single_file_beside_indexed_shards(tmp_path, zoo):
    sharded, _ = shard(zoo["task1"], tmp_path / "sharded")
    shutil.copy(zoo["task1"] / "model.safetensors", sharded / "model.safetensors")
    msg = lib_error(ModelDir, sharded, label="b")
    assert "weight file(s) model.safetensors" in msg and "not named in model.safetensors.index.json" in msg


def test_index_and_shards_disagree(tmp_path, zoo):
    sharded, weight_map = shard(zoo["task1"], tmp_path / "sharded")
    name = next(n for n, f in weight_map.items() if f == "model-00001-of-00002.safetensors")
    write_index(sharded, {**weight_map, name: "model-00002-of-00002.safetensors", "bert.extra.weight": weight_map[name]})
    msg = lib_error(ModelDir, sharded, label="b")
    assert "shard index and shard files" in msg
    assert f"'{name}' (index: model-00002-of-00002.safetensors, found in model-00001-of-00002.safetensors)" in msg
    assert "'bert.extra.weight' (index: model-00001-of-00002.safetensors, found nowhere)" in msg
    del weight_map[name]
    write_index(sharded, weight_map)
    msg = lib_error(ModelDir, sharded, label="b")
    assert f"1 tensor(s) in the shards are not in the index ('{name}')" in msg


def test_unreadable_index(tmp_path, zoo):
    sharded, _ = shard(zoo["task1"], tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text("{not json")
    assert "is not a readable shard index" in lib_error(ModelDir, sharded, label="b")
    write_index(sharded, {"x": "../elsewhere.safetensors"})
    assert "must map tensor names to shard file names" in lib_error(ModelDir, sharded, label="b")


def test_pickle_index_names_a_missing_shard(tmp_path, zoo):
    dst = tmp_path / "pickled"
    dst.mkdir()
    state = load_file(zoo["task1"] / "model.safetensors")
    names = list(state)
    torch.save({n: state[n] for n in names[:10]}, dst / "pytorch_model-00001-of-00002.bin")
    write_index(dst, {**{n: "pytorch_model-00001-of-00002.bin" for n in names[:10]},
                      **{n: "pytorch_model-00002-of-00002.bin" for n in names[10:]}}, "pytorch_model.bin.index.json")
    msg = lib_error(ModelDir, dst, allow_pickle=True, label="b")
    assert "pytorch_model.bin.index.json names shard file(s) missing" in msg
    assert "pytorch_model-00002-of-00002.bin" in msg and f"'{names[10]}'" in msg
    # complete: loads, and the index is checked against the tensors
    torch.save({n: state[n] for n in names[10:]}, dst / "pytorch_model-00002-of-00002.bin")
    assert sorted(ModelDir(dst, allow_pickle=True).names()) == sorted(names)
