"""Keys are content: renaming model and data entries or moving the project keeps every key; one
changed byte in a file a step reads (weights, config.json, tokenizer.json, data) changes exactly
the keys of the artifacts that depend on it; and an edit is seen even when the mtime is set back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import _iterative_project as proj
from fmerge import executor
from fmerge.api import load_recipe
from fmerge.fingerprint import FileHashes
from fmerge.io import HashCache, ModelDir
from fmerge.runtime import Runtime
from fmerge.store import Store

TEMPLATE = """
base: base
store: store
seed: 0
data:
  {DS}: {{path: data/sentiment}}
  {DA}: {{path: data/animal}}
  {DC}: {{path: data/color}}
  {DL}: {{path: data/sentiment, label_names: [pos, neg]}}
models:
  {S}: {{path: models/sentiment, data: {DS}}}
  {A}: {{path: models/animal, data: {DA}}}
  {C}: {{path: models/color, data: {DC}}}
steps:
  fisher: {{kind: fisher, examples: 4}}
  gram: {{kind: gram, examples: 4, models: [{S}, {A}]}}
  tv: {{kind: task_vectors}}
  avg: {{kind: merge, method: simple_average}}
  ta: {{kind: merge, method: task_arithmetic, params: {{lambda: {{{S}: 0.3, {A}: 0.4, {C}: 0.5}}}}}}
  fm: {{kind: merge, method: fisher, fisher: fisher, params: {{fallback: {A}}}}}
  ada: {{kind: adamerging, steps: 1, examples: 4}}
  fw: {{kind: frank_wolfe, max_iters: 1, merge_params: {{lambda: {{{S}: 0.2, {A}: 0.3, {C}: 0.4}}}}}}
  stack: {{kind: stack_layers, slices: [{{model: {S}, layers: [0, 1]}}, {{model: {A}, layers: [1, 2]}}]}}
  ft: {{kind: finetune, data: {DL}, steps: 1}}
  ev: {{kind: eval, merges: [avg, ta, fm, ada], base: true}}
"""
NAMES = dict(S="sentiment", A="animal", C="color", DS="sentiment", DA="animal", DC="color", DL="labelled")
RENAMED = dict(S="t0", A="t1", C="t2", DS="reviews", DA="pets", DC="paint", DL="reviews_labelled")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = proj.build(tmp_path_factory.mktemp("keys"))
    (root / "recipe.yaml").write_text(TEMPLATE.format(**NAMES))
    return root


def planned_keys(recipe: Path, by_label: bool = False) -> dict[tuple[str, int | str], str]:
    """{(step, position of the artifact in its step's plan, or its label): key}, from planning alone."""
    r = load_recipe(recipe)
    rt = Runtime(r, Store(r.resolve(r.spec.store)), device="cpu")
    executor.status(rt)
    rt.data_hashes.save()  # as a run does: the next planning trusts these hashes by file stamp
    return {(step, p.label if by_label else i): p.key for step, planned in rt.planned.items()
            for i, p in enumerate(planned)}


def test_renaming_models_and_data_entries_keeps_every_key(project):
    before = planned_keys(project / "recipe.yaml")
    (project / "renamed.yaml").write_text(TEMPLATE.format(**RENAMED))
    assert planned_keys(project / "renamed.yaml") == before


def test_a_per_model_map_and_the_list_in_model_order_share_a_key(project):
    before = planned_keys(project / "recipe.yaml")
    text = TEMPLATE.format(**NAMES).replace("{sentiment: 0.3, animal: 0.4, color: 0.5}", "[0.3, 0.4, 0.5]")
    (project / "listed.yaml").write_text(text)
    after = planned_keys(project / "listed.yaml")
    assert after == before
    (project / "swapped.yaml").write_text(text.replace("[0.3, 0.4, 0.5]", "[0.4, 0.3, 0.5]"))
    assert planned_keys(project / "swapped.yaml")[("ta", 0)] != before[("ta", 0)]  # the order is meaningful


def test_moving_the_project_keeps_every_key(project, tmp_path):
    before = planned_keys(project / "recipe.yaml")
    moved = tmp_path / "elsewhere" / "project"
    shutil.copytree(project, moved)
    assert planned_keys(moved / "recipe.yaml") == before


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place (same size, same inode), then set the mtime back as `touch -r` would."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1 and len(old) == len(new)
    st = path.stat()
    with open(path, "r+") as fh:  # in place: the same inode and size, only ctime tells
        fh.write(text.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


ALL = {"fisher": 3, "gram": 2, "tv": 3, "avg": 1, "ta": 1, "fm": 1, "ada": 1, "fw": 1, "stack": 1, "ft": 1}


def positions(**steps) -> set[tuple[str, int]]:
    return {(s, i) for s, idx in steps.items() for i in (idx if isinstance(idx, (list, tuple)) else range(ALL[s]))}


# Which artifacts read each file (the eval step is checked apart: its items are many).
# The animal model is the second of the models (index 1).
CASES = {
    # its tensors: every step that reads the animal model's weights
    "models/animal/model.safetensors": positions(fisher=[1], gram=[1], tv=[1], avg=0, ta=0, fm=0, ada=0, fw=0, stack=0),
    # its config: only the steps that run the animal model (its config is its architecture); no merge
    "models/animal/config.json": positions(fisher=[1], gram=[1], ada=0, fw=0, stack=0, fm=0),
    # the base's tokenizer (the models have none): every step that tokenizes text; no merge but fm
    "base/tokenizer.json": positions(fisher=[0, 1, 2], gram=[0, 1], ada=0, fw=0, ft=0, fm=0),
    # one data file: what reads the animal data
    "data/animal/train.jsonl": positions(fisher=[1], gram=[1], ada=0, fw=0, fm=0),
}


# The eval items (variant, task) each file enters: a variant whose merge changed, and a task whose
# model, side files or data changed.
MERGES = ("avg", "ta", "fm", "ada")
EVAL_CASES = {
    "models/animal/model.safetensors": {(v, t) for v in MERGES for t in proj.TASKS} | {("base", "animal"),
                                                                                         ("individual", "animal")},
    "models/animal/config.json": {(v, t) for v in ("fm", "ada") for t in proj.TASKS} | {
        (v, "animal") for v in ("base", "individual", *MERGES)},
    "base/tokenizer.json": {(v, t) for v in ("base", "individual", *MERGES) for t in proj.TASKS},
    "data/animal/train.jsonl": {(v, t) for v in ("fm", "ada") for t in proj.TASKS} | {
        (v, "animal") for v in ("base", "individual", *MERGES)},
}


@pytest.mark.parametrize("file", list(CASES))
def test_one_changed_byte_changes_exactly_the_dependent_keys(project, tmp_path, file):
    copy = tmp_path / "p"
    shutil.copytree(project, copy)
    before, labels_before = planned_keys(copy / "recipe.yaml"), planned_keys(copy / "recipe.yaml", by_label=True)
    target = copy / file
    if target.suffix == ".safetensors":
        flip_byte(target, target.stat().st_size - 4)  # the lowest byte of the last float32
    elif target.name == "config.json":
        replace_once(target, '"hidden_dropout_prob": 0.1', '"hidden_dropout_prob": 0.2')  # not an architecture field: the models still merge
    elif target.name == "tokenizer.json":
        replace_once(target, '"fish": 13', '"fisk": 13')
    else:
        flip_byte(target, 2)
    after, labels_after = planned_keys(copy / "recipe.yaml"), planned_keys(copy / "recipe.yaml", by_label=True)
    assert {k for k in before if before[k] != after[k] and k[0] != "ev"} == CASES[file]
    evals = {tuple(label.split("|")[:2]) for (step, label), key in labels_before.items()
             if step == "ev" and labels_after[(step, label)] != key}
    assert evals == EVAL_CASES[file]


def test_an_edit_with_the_mtime_set_back_is_seen(tmp_path):
    """fingerprint.file_stamp and the model hash cache hold ctime, which no user command sets back."""
    from conftest import make_zoo

    zoo = make_zoo(tmp_path / "zoo", n_models=1)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    hashes = FileHashes(tmp_path / "cache.json")
    cache = HashCache(tmp_path / "models.json")
    model = zoo["task0"]
    old = hashes.file(data), cache.hash_model(ModelDir(model)), hashes.file(model / "config.json")
    hashes.save()
    flip_byte(data, 2)
    flip_byte(model / "model.safetensors", (model / "model.safetensors").stat().st_size - 4)
    replace_once(model / "config.json", '"hidden_act": "gelu"', '"hidden_act": "relu"')
    hashes = FileHashes(tmp_path / "cache.json")  # a later run, reading the cache file
    new = hashes.file(data), HashCache(tmp_path / "models.json").hash_model(ModelDir(model)), \
        hashes.file(model / "config.json")
    assert all(a != b for a, b in zip(old, new))


def test_an_edited_data_file_with_the_mtime_set_back_is_read_anew(tmp_path):
    """The datasets library trusts its cached build of a file by the file's mtime; fmerge keeps each
    build under the files' content hash, so the rows read are those the key was made from."""
    from fmerge.data import DataSpec, load_dataset_split

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "good", "label": 0}\n{"text": "bad", "label": 1}\n')
    assert list(load_dataset_split(DataSpec(path=str(path)))["text"]) == ["good", "bad"]
    replace_once(path, '"good"', '"fine"')
    assert list(load_dataset_split(DataSpec(path=str(path)))["text"]) == ["fine", "bad"]
