"""Crash safety, concurrency, reproducibility and untrusted files (issue 7)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ZOO_RECIPE, fmerge_cli, write_recipe
from fmerge.errors import FmergeError
from fmerge.io import ModelDir
from fmerge.api import load_recipe
from fmerge.store import Store
from test_errors import classifier_project, run_recipe

KILL_RECIPE = """
base: base
store: store
data:
  t: {path: data/t.jsonl}
models:
  a: {path: clf_a, data: t}
  b: {path: clf_b, data: t}
steps:
  fish: {kind: fisher, estimator: exact, examples: 16, batch_size: 8, max_length: 8}
  fm: {kind: merge, method: fisher, fisher: fish, export: out/fm}
  ta: {kind: merge, method: task_arithmetic, params: {lambda: 0.5}, export: out/ta}
  dare: {kind: merge, method: dare, params: {p: 0.5, seed: 3}, export: out/dare}
"""


def tensors_of(store: Store) -> dict[str, dict[str, torch.Tensor]]:
    """Every artifact's tensors by key."""
    out = {}
    for info in store.list():
        art = store.open(info.key)
        out[info.key] = {n: art.get(n) for n in art.names()}
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            x, y = a[key][name], b[key][name]
            assert x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), (key, name)


def exports(out_dir: Path) -> list[Path]:
    """Export directories in place (not the hidden ones of exports under way)."""
    return [p for p in out_dir.iterdir() if not p.name.startswith(".")] if out_dir.exists() else []


def export_is_whole(out: Path) -> None:
    """An export directory is complete and names the artifact it was written from."""
    marker = json.loads((out / ".fmerge-export.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["fmerge_key"] == marker["key"]
        for name in f.keys():
            f.get_tensor(name)
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["a.safetensors", "b.safetensors"]


# ------------------------------------------------------------------------------------------
# Crash safety


def test_sigkill_at_random_points_never_corrupts_and_resumes_to_the_same_result(tmp_path):
    """SIGKILL `fmerge run` during Fisher, merge writes and export, over and over (seeded); every
    listed artifact still verifies, and finishing gives bit-for-bit what an uninterrupted run gives."""
    project = classifier_project(tmp_path / "p")
    recipe = write_recipe(project, KILL_RECIPE)
    # the uninterrupted reference, in its own store and export directory
    _, reports = run_recipe(recipe)
    assert {r.state for r in reports} == {"computed"}
    shutil.move(project / "store", tmp_path / "ref_store")
    shutil.move(project / "out", tmp_path / "ref_out")

    rng = random.Random(7)
    store_dir, out_dir = project / "store", project / "out"
    start, trials, kills = time.monotonic(), 0, 0
    while trials < 3 or time.monotonic() - start < 30:
        phase = "any" if trials == 0 else rng.choice(["write", "export", "any"])
        proc = subprocess.Popen([sys.executable, "-m", "fmerge", "run", str(recipe)], cwd=project,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + (rng.uniform(2.0, 8.0) if trials == 0 else rng.uniform(0.3, 4.0))
        while proc.poll() is None:
            if phase == "write":
                hit = any("deleted" not in p.name for p in (store_dir / "tmp").glob("*"))
            elif phase == "export":
                hit = any(".tmp-" in p.name for p in out_dir.glob(".*"))
            else:
                hit = time.monotonic() >= deadline
            if hit:
                time.sleep(rng.uniform(0, 0.03))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        kills += proc.wait() == -signal.SIGKILL
        trials += 1
        store = Store(store_dir)
        assert store.verify() == []
        for out in exports(out_dir):
            export_is_whole(out)
        # undo some finished work at random so the next run has something to be killed in
        for info in list(store.list()):
            if info.kind == "merge" and rng.random() < 0.6:
                store.remove(info.key)
        for out in exports(out_dir):
            if rng.random() < 0.6:
                shutil.rmtree(out)
    assert kills >= 2, f"only {kills} of {trials} runs were killed"
    print(f"{trials} runs, {kills} killed")

    proc = fmerge_cli("run", recipe, cwd=project)
    assert "Traceback" not in proc.stderr
    store = Store(store_dir)
    assert store.verify() == []
    assert_bit_identical(tensors_of(store), tensors_of(Store(tmp_path / "ref_store")))
    for step in ("fm", "ta", "dare"):
        export_is_whole(out_dir / step)
        got, ref = load_file(out_dir / step / "model.safetensors"), load_file(tmp_path / "ref_out" / step / "model.safetensors")
        assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
    fmerge_cli("gc", recipe, "--store", store_dir, cwd=project)  # leftovers of the killed writers go
    assert list((store_dir / "tmp").iterdir()) == []
    assert not [p for p in out_dir.glob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def test_verify_reports_and_repair_removes_bad_artifacts(tmp_path, zoo):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    fmerge_cli("run", recipe)
    store = Store(tmp_path / "store")
    keys = {info.attrs["meta"]["step"]: info.key for info in store.list()}
    chunk = next((store.path(keys["ta"]) / "safetensors" / "weights").glob("*.safetensors"))  # the merge's weights
    chunk.write_bytes(b"\0" * len(chunk.read_bytes()))            # silent corruption of one tensor
    (store.path(keys["avg"]) / "zarr.json").write_text("{truncated")  # an unreadable artifact

    proc = fmerge_cli("verify", "--store", store.root, check=False)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert keys["ta"] in text and "1 tensor(s) differ from their checksums" in text
    assert keys["avg"] in text and "unreadable" in text
    assert "1 artifact(s) ok, 2 bad" in text and "fmerge verify --repair" in text

    proc = fmerge_cli("verify", "--repair", "--store", store.root)
    assert "removed" in proc.stdout and "1 artifact(s) ok, 2 bad (removed)" in " ".join(proc.stdout.split())
    assert fmerge_cli("verify", "--store", store.root).returncode == 0
    states = fmerge_cli("run", recipe).stderr
    assert "avg (merge): computed" in states and "ta (merge): computed" in states and "ties (merge): cached" in states
    assert store.verify() == []


# ------------------------------------------------------------------------------------------
# Concurrency


def test_two_runs_at_once_compute_each_artifact_once(tmp_path, zoo):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    env = {**os.environ, "COLUMNS": "200"}
    procs = [subprocess.Popen([sys.executable, "-m", "fmerge", "run", str(recipe)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outputs]
    logs = outputs[0][1] + outputs[1][1]
    for step in ("avg", "ta", "ties"):
        assert logs.count(f"{step} (merge): computed") == 1, logs
        assert logs.count(f"{step} (merge): cached") == 1, logs
    store = Store(tmp_path / "store")
    assert len(list(store.list())) == 3 and store.verify() == []
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert (tmp_path / "out" / "ties" / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "ties"]


# ------------------------------------------------------------------------------------------
# Reproducibility and provenance


def test_same_recipe_twice_is_bit_identical_and_records_its_provenance(tmp_path, zoo):
    text = ZOO_RECIPE + "  dare:\n    kind: merge\n    method: dare\n    params: {p: 0.3, seed: 11}\n    export: out/dare\n"
    recipe = write_recipe(tmp_path, text)
    run_recipe(recipe)
    shutil.move(tmp_path / "store", tmp_path / "first")
    rt, _ = run_recipe(recipe)
    assert_bit_identical(tensors_of(rt.store), tensors_of(Store(tmp_path / "first")))

    art = rt.store.open(rt.planned["dare"][0].key)
    attrs = art.attrs
    assert attrs["recipe"]["file"] == str(recipe)
    assert attrs["recipe"]["spec"]["steps"]["dare"]["params"] == {"p": 0.3, "seed": 11}
    assert attrs["versions"]["torch"] == torch.__version__ and {"fmerge", "transformers", "zarr"} <= set(attrs["versions"])
    # the models by content, in order, never by name
    assert attrs["inputs"]["models"] == [rt.model_hash(m) for m in ("a", "b", "c")] and attrs["inputs"]["base"]
    card = (tmp_path / "out" / "dare" / "README.md").read_text()
    assert art.key in card and attrs["inputs"]["base"] in card and f'"torch": "{torch.__version__}"' in card
    assert "seed: 11" in card and str(recipe) in card


# ------------------------------------------------------------------------------------------
# Untrusted files


def pickle_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def test_pickle_checkpoints_refused_by_default_and_loaded_weights_only_when_allowed(tmp_path, zoo):
    pickle_model(zoo["task1"], tmp_path / "zoo" / "pickled")
    recipe = write_recipe(tmp_path, ZOO_RECIPE.replace("zoo/task1", "zoo/pickled"))
    proc = fmerge_cli("run", recipe, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    msg = " ".join(proc.stderr.split())
    assert "Model 'b':" in msg and "only pickle checkpoints (pytorch_model.bin)" in msg and "--allow-pickle" in msg

    fmerge_cli("run", recipe, "--allow-pickle")
    pickled = tensors_of(Store(tmp_path / "store"))
    shutil.rmtree(tmp_path / "store")
    run_recipe(write_recipe(tmp_path, ZOO_RECIPE))  # the same weights as safetensors: same keys, same bytes
    assert_bit_identical(pickled, tensors_of(Store(tmp_path / "store")))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_weights_only_loader_refuses_code_in_a_pickle(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": _Payload(str(marker))}, bad / "pytorch_model.bin")
    with pytest.raises(FmergeError, match=r"Model 'bad': .*pytorch_model.bin could not be loaded as a plain tensor "
                                          r"checkpoint with torch's weights-only loader"):
        ModelDir(bad, allow_pickle=True, label="bad")
    assert not marker.exists()


def test_artifact_keys_cannot_escape_the_store(tmp_path):
    store = Store(tmp_path / "s")
    (tmp_path / "x").mkdir()
    for key in ("../x", "../../x", "/etc", ".", "..", "ab/../../x", ""):
        with pytest.raises(FmergeError, match="is not an artifact key"):
            store.open(key)
        with pytest.raises(FmergeError):
            store.lock(key)


def test_model_names_cannot_become_paths(tmp_path, zoo):
    text = ZOO_RECIPE.replace("  a: zoo/task0", "  ../evil: zoo/task0")
    with pytest.raises(FmergeError, match=r"name '../evil' must start with a letter or digit and use only letters, digits"):
        load_recipe(write_recipe(tmp_path, text))


def test_export_never_replaces_a_directory_fmerge_did_not_write(tmp_path, zoo):
    before = (zoo["task2"] / "model.safetensors").read_bytes()
    recipe = write_recipe(tmp_path, ZOO_RECIPE.replace("export: out/ties", "export: zoo/task2"))
    proc = fmerge_cli("run", recipe, check=False)
    msg = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in msg
    # refused before anything runs: an export onto a model's own directory would replace the user's model
    assert "steps.ties.export:" in msg and "zoo/task2" in msg and "Export to a directory of its own" in msg
    assert (zoo["task2"] / "model.safetensors").read_bytes() == before


def test_remote_code_is_not_run_unless_the_recipe_trusts_it(tmp_path):
    from fmerge.runtime import Runtime
    from fmerge.tasks import model_config

    classifier_project(tmp_path)
    marker = tmp_path / "pwned"
    config = json.loads((tmp_path / "clf_a" / "config.json").read_text())
    config.update(model_type="evilbert", auto_map={"AutoConfig": "evil.EvilConfig"})
    (tmp_path / "clf_a" / "config.json").write_text(json.dumps(config))
    (tmp_path / "clf_a" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                "from transformers import BertConfig\n"
                                                "class EvilConfig(BertConfig):\n    model_type = 'evilbert'\n")
    # allow_crimes: its model_type is no longer the base's, which a merge refuses (tests/test_crimes.py)
    r = load_recipe(write_recipe(tmp_path, "base: base\nmodels: {a: clf_a}\nallow_crimes: true\n"
                                           "steps:\n  m: {kind: merge, method: simple_average}\n"))
    assert r.spec.trust_remote_code is False
    with pytest.raises(FmergeError, match=r"Model 'a': cannot read the transformers config .* fmerge does only when "
                                          r"the recipe sets 'trust_remote_code: true'"):
        model_config(Runtime(r, Store(tmp_path / "store")), "a")
    assert not marker.exists()
