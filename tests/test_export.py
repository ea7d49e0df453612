"""The one export path (fmerge/export.py): merges, iterative merges and Fisher files are written
beside their target, recorded, swapped in; a file fmerge did not write is never deleted or
overwritten; colliding exports are refused before anything runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from conftest import ZOO_RECIPE, fmerge_cli, write_recipe
from fmerge import executor, export
from fmerge.api import load_recipe
from fmerge.errors import FmergeError
from fmerge.export import (MARKER, check_exports, copy_side_files, export_model_dir, export_tensor_file,
                           read_manifest, sidecar_of)
from fmerge.runtime import Runtime
from fmerge.store import Store


def runtime(path, sets=None):
    recipe = load_recipe(path, sets)
    return Runtime(recipe, Store(recipe.resolve(recipe.spec.store)))


def run_ties(path):
    """Run the zoo recipe's `ties` step (and export); returns its report."""
    (report,) = executor.run(runtime(path), only=["ties"])
    return report


def xxh3(path: Path) -> str:
    return xxhash.xxh3_128(path.read_bytes()).hexdigest()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


class Tensors:
    """A TensorSource over a dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return self.tensors[name].dtype

    def get(self, name):
        return self.tensors[name]


def weights(seed: int = 0) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    return Tensors({"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def recipe_path(tmp_path, zoo):
    return write_recipe(tmp_path, ZOO_RECIPE)


# ---------------------------------------------------------------------------------------------
# Model directories: the user's files survive a re-export


def add_user_files(out: Path) -> dict[str, Path]:
    (out / "eval.py").write_text("print('my eval')\n")
    (out / "results" / "run1").mkdir(parents=True)
    (out / "results" / "run1" / "metrics.json").write_text('{"acc": 0.9}')
    (out / "results" / "empty").mkdir()
    (out / "heads" / "notes.txt").write_text("which head is which\n")
    (out / "latest").symlink_to("eval.py")
    return {"eval": out / "eval.py", "metrics": out / "results" / "run1" / "metrics.json"}


def test_a_reexport_keeps_the_users_files_and_records_what_fmerge_wrote(recipe_path, tmp_path):
    run_ties(recipe_path)
    out = tmp_path / "out" / "ties"
    first = read_manifest(out)
    assert first["key"] == executor.status(runtime(recipe_path), only=["ties"])[0].keys[0]
    assert {"model.safetensors", "config.json", "README.md", "heads/a.safetensors"} <= set(first["files"])
    for rel, rec in first["files"].items():  # what the record says is what is on disk
        assert rec["size"] == (out / rel).stat().st_size and rec["xxh3_128"] == xxh3(out / rel), rel
    user = add_user_files(out)
    inode = user["eval"].stat().st_ino

    recipe_path.write_text(recipe_path.read_text().replace("density: 0.5", "density: 0.3"))
    report = run_ties(recipe_path)
    second = read_manifest(out)
    assert second["key"] == report.keys[0] != first["key"]
    assert load_file(out / "model.safetensors") and second["files"]["model.safetensors"]["xxh3_128"] == xxh3(out / "model.safetensors")
    assert user["eval"].read_text() == "print('my eval')\n" and user["eval"].stat().st_ino == inode  # the same file
    assert user["metrics"].read_text() == '{"acc": 0.9}'
    assert (out / "results" / "empty").is_dir() and (out / "heads" / "notes.txt").is_file()
    assert os.readlink(out / "latest") == "eval.py"
    assert not {"eval.py", "latest", "results/run1/metrics.json", "heads/notes.txt"} & set(second["files"])
    assert "kept 4 file(s) of yours" in report.note
    assert leftovers(out.parent) == []


def test_an_up_to_date_export_is_not_rewritten_and_a_changed_fmerge_file_is_refused(recipe_path, tmp_path):
    run_ties(recipe_path)
    out = tmp_path / "out" / "ties"
    before = (out / "model.safetensors").stat().st_mtime_ns
    (out / "eval.py").write_text("x = 1\n")  # the user's own file: the export stays up to date
    assert "up to date" in run_ties(recipe_path).note
    assert (out / "model.safetensors").stat().st_mtime_ns == before

    # fmerge's model card, edited: the export is no longer what the recipe makes, and the file is the
    # user's now, so the run refuses, naming it, whether or not the artifact changed
    (out / "README.md").write_text("my own model card\n")
    for density in ("0.5", "0.3"):
        recipe_path.write_text(recipe_path.read_text().replace("density: 0.5", f"density: {density}"))
        with pytest.raises(FmergeError) as exc:
            run_ties(recipe_path)
        msg = str(exc.value)
        assert "steps.ties.export:" in msg and f"'README.md' in {out} changed since fmerge wrote them" in msg
        assert "will neither overwrite nor delete them" in msg and "Move them out of" in msg
        assert (out / "README.md").read_text() == "my own model card\n" and (out / "eval.py").is_file()
        assert (out / "model.safetensors").stat().st_mtime_ns == before and leftovers(out.parent) == []


def test_a_user_file_the_new_export_would_overwrite_is_refused(recipe_path, tmp_path, zoo):
    run_ties(recipe_path)
    out = tmp_path / "out" / "ties"
    key = read_manifest(out)["key"]
    (out / "generation_config.json").write_text("my settings\n")
    (zoo["base"] / "generation_config.json").write_text("{}\n")  # the base gains a side file
    recipe_path.write_text(recipe_path.read_text().replace("density: 0.5", "density: 0.3"))
    with pytest.raises(FmergeError) as exc:
        run_ties(recipe_path)
    msg = str(exc.value)
    mine = out / "generation_config.json"
    assert f"{mine} was not written by fmerge" in msg and "the new export writes a file of that name" in msg
    assert f"move or rename {mine}" in msg
    assert mine.read_text() == "my settings\n" and read_manifest(out)["key"] == key
    assert leftovers(out.parent) == []


def test_a_directory_without_a_record_or_with_a_broken_one_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FmergeError, match=r"mine exists and was not written by fmerge; refusing to replace it "
                                          r"\(it has no \.fmerge-export\.json"):
        export_model_dir(None, out, "k1", weights(), step="s", readme="card", side_files_from=None)
    (out / MARKER).write_text("{not json")
    with pytest.raises(FmergeError, match=r"is not a readable export record .* Move the files you want to keep"):
        export_model_dir(None, out, "k1", weights(), step="s", readme="card", side_files_from=None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FmergeError, match=r"file exists and is not a directory fmerge wrote"):
        export_model_dir(None, tmp_path / "file", "k1", weights(), step="s", readme="card", side_files_from=None)
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "x"
    assert leftovers(tmp_path) == []


def test_an_export_of_an_older_fmerge_keeps_files_it_did_not_name(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    save_file({"x": torch.ones(2)}, str(out / "model.safetensors"), metadata={"fmerge_key": "old"})
    (out / "README.md").write_text("old card")
    (out / MARKER).write_text(json.dumps({"key": "old", "step": "s", "fmerge_version": "0.1"}))  # format 1
    (out / "eval.py").write_text("mine")
    export_model_dir(None, out, "new", weights(), step="s", readme="card", side_files_from=None)
    assert read_manifest(out)["key"] == "new" and set(load_file(out / "model.safetensors")) == {"a.weight", "b.bias"}
    assert (out / "eval.py").read_text() == "mine" and (out / "README.md").read_text() == "card"


# ---------------------------------------------------------------------------------------------
# Crash safety: no state of a killed export loses a user's file


def user_export(tmp_path) -> Path:
    out = tmp_path / "out"
    export_model_dir(None, out, "k1", weights(1), step="s", readme="card", side_files_from=None)
    (out / "eval.py").write_text("mine")
    return out


def test_killed_after_the_swap_the_previous_export_goes_and_the_users_files_stay(tmp_path, monkeypatch):
    out = user_export(tmp_path)

    def killed(d, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_retire", killed)
    with pytest.raises(KeyboardInterrupt):
        export_model_dir(None, out, "k2", weights(2), step="s", readme="card", side_files_from=None)
    monkeypatch.undo()
    assert read_manifest(out)["key"] == "k2" and (out / "eval.py").read_text() == "mine"
    (old,) = [tmp_path / n for n in leftovers(tmp_path)]  # the previous export, as a dead process leaves it
    old.rename(tmp_path / f".out.tmp-{dead_pid()}.abcd")
    assert "up to date" in export_model_dir(None, out, "k2", weights(2), step="s", readme="card", side_files_from=None)
    assert leftovers(tmp_path) == [] and (out / "eval.py").read_text() == "mine"


def test_killed_between_the_two_renames_the_previous_export_is_put_back(tmp_path):
    out = user_export(tmp_path)
    out.rename(tmp_path / f".out.old-{dead_pid()}.ef01")  # the swap without RENAME_EXCHANGE, killed midway
    assert "up to date" in export_model_dir(None, out, "k1", weights(1), step="s", readme="card", side_files_from=None)
    assert (out / "eval.py").read_text() == "mine" and leftovers(tmp_path) == []


def test_killed_while_building_the_partial_export_is_removed_and_the_users_files_stay(tmp_path):
    out = user_export(tmp_path)
    partial = tmp_path / f".out.tmp-{dead_pid()}.0123"
    partial.mkdir()
    (partial / export.BUILDING).touch()
    (partial / "model.safetensors").write_bytes(b"half")
    os.link(out / "eval.py", partial / "eval.py")  # the user's file, already carried
    export_model_dir(None, out, "k2", weights(2), step="s", readme="card", side_files_from=None)
    assert leftovers(tmp_path) == [] and (out / "eval.py").read_text() == "mine"


def test_the_fallback_swap_without_rename_exchange_keeps_the_users_files(tmp_path, monkeypatch):
    out = user_export(tmp_path)
    monkeypatch.setattr(export, "_rename_exchange", lambda a, b: False)
    export_model_dir(None, out, "k2", weights(2), step="s", readme="card", side_files_from=None)
    assert read_manifest(out)["key"] == "k2" and (out / "eval.py").read_text() == "mine" and leftovers(tmp_path) == []


def test_a_full_disk_keeps_the_previous_export_and_the_users_files(tmp_path, monkeypatch):
    from fmerge import io

    out = user_export(tmp_path)

    def enospc(self, name, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.StreamingSafetensorsWriter, "write", enospc)
    with pytest.raises(FmergeError, match=r"Exporting the model to .*out failed: No space left on device. The "
                                          r"partial export was removed and the previous one kept"):
        export_model_dir(None, out, "k2", weights(2), step="s", readme="card", side_files_from=None)
    assert read_manifest(out)["key"] == "k1" and (out / "eval.py").read_text() == "mine" and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Side files


def test_a_side_file_linking_outside_the_base_is_refused_and_never_exported(tmp_path, zoo):
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.json").write_text('{"api_key": "hunter2"}')
    (zoo["base"] / "tokenizer.json").symlink_to(private / "secret.json")
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    proc = fmerge_cli("run", recipe, "--only", "ties", check=False)
    msg = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in msg
    assert f"Base model file {zoo['base'] / 'tokenizer.json'} is a symbolic link to {private / 'secret.json'}, " \
           f"outside the model directory {zoo['base']}" in msg
    assert "never follows a link out of the model directory" in msg and "cp --remove-destination" in msg
    assert not (tmp_path / "out" / "ties").exists() and leftovers(tmp_path / "out") == []
    assert not any("hunter2" in p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_side_files_inside_the_base_and_in_a_hub_cache_are_copied_as_files(tmp_path):
    base = tmp_path / "base"
    (base / "tok").mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (base / "tok" / "tokenizer.json").write_text('{"v": 1}')
    (base / "tokenizer.json").symlink_to("tok/tokenizer.json")
    (base / "vocab.txt").symlink_to("missing.txt")  # dangling, inside: nothing to copy
    dest = tmp_path / "d1"
    dest.mkdir()
    assert copy_side_files(base, dest) == ["config.json", "tokenizer.json"]
    assert not (dest / "tokenizer.json").is_symlink() and (dest / "tokenizer.json").read_text() == '{"v": 1}'

    snap = tmp_path / "hub" / "models--org--m" / "snapshots" / "abc123"
    (tmp_path / "hub" / "models--org--m" / "blobs").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--m" / "blobs" / "f00d").write_text('{"hub": true}')
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to("../../blobs/f00d")
    dest = tmp_path / "d2"
    dest.mkdir()
    assert copy_side_files(snap, dest) == ["config.json"] and (dest / "config.json").read_text() == '{"hub": true}'


def test_a_side_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    os.mkfifo(base / "vocab.txt")
    dest = tmp_path / "d"
    dest.mkdir()
    result = {}

    def copy():
        try:
            copy_side_files(base, dest)
        except FmergeError as exc:
            result["msg"] = str(exc)

    t = threading.Thread(target=copy, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "copying a fifo blocked"
    assert f"Base model file {base / 'vocab.txt'} is a fifo, not a regular file" in result["msg"]
    assert "Replace it by the real file or remove it" in result["msg"]


# ---------------------------------------------------------------------------------------------
# Merges and iterative merges share the path


def test_iterative_steps_export_through_the_same_path_heads_and_record_before_the_swap(recipe_path, tmp_path,
                                                                                         monkeypatch):
    from fmerge.steps import step_kinds
    from fmerge.steps.base import Planned

    rt = runtime(recipe_path)
    executor.run(rt, only=["ties", "avg"])
    kind = step_kinds()["frank_wolfe"]
    cfg = kind.Config(export="out/fw")
    out = tmp_path / "out" / "fw"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("not fmerge's")
    plan = Planned(step="fw", label="", kind="frank_wolfe", key=rt.planned["ties"][0].key, inputs={}, params={}, version=1)
    with pytest.raises(FmergeError, match=r"fw exists and was not written by fmerge; refusing to replace it"):
        kind.export(rt, "fw", cfg, [plan])
    (out / "mine.txt").unlink()

    swapped = []
    real_swap = export._swap_into_place

    def swap(tmp, target):
        names = {str(p.relative_to(tmp)) for p in tmp.rglob("*")}
        swapped.append(names)
        assert {MARKER, "README.md", "model.safetensors", "heads/a.safetensors"} <= names
        assert export.BUILDING not in names
        return real_swap(tmp, target)

    monkeypatch.setattr(export, "_swap_into_place", swap)
    assert kind.export(rt, "fw", cfg, [plan]) == f"exported {out}"
    manifest = read_manifest(out)
    assert manifest["key"] == plan.key and "heads/b.safetensors" in manifest["files"]
    (out / "eval.py").write_text("mine")
    plan.key = rt.planned["avg"][0].key
    assert "kept 1 file(s) of yours: 'eval.py'" in kind.export(rt, "fw", cfg, [plan])
    assert len(swapped) == 2 and read_manifest(out)["key"] == plan.key and (out / "eval.py").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Single files (Fisher)


def test_a_file_export_is_recorded_and_never_replaces_a_file_fmerge_did_not_write(tmp_path):
    target = tmp_path / "fisher.safetensors"
    assert export_tensor_file(None, target, "k1", weights(1)) == f"wrote {target}"
    record = json.loads(sidecar_of(target).read_text())
    assert record["key"] == "k1" and record["records"][0]["xxh3_128"] == xxh3(target)
    assert sidecar_of(target).name == ".fisher.safetensors.fmerge-export.json"
    mtime = target.stat().st_mtime_ns
    assert export_tensor_file(None, target, "k1", weights(1)) == f"export {target} up to date"
    assert target.stat().st_mtime_ns == mtime
    export_tensor_file(None, target, "k2", weights(2))
    assert torch.equal(load_file(target)["b.bias"], weights(2).get("b.bias"))

    save_file({"mine": torch.zeros(3)}, str(target))  # the user replaced it with their own
    with pytest.raises(FmergeError) as exc:
        export_tensor_file(None, target, "k3", weights(3), where="recipe.yaml:9: steps.f.export")
    assert str(exc.value).startswith(f"recipe.yaml:9: steps.f.export: {target} exists and was not written by "
                                     f"fmerge (it was changed since fmerge wrote it); refusing to replace it")
    assert set(load_file(target)) == {"mine"}

    other = tmp_path / "notes.safetensors"
    save_file({"mine": torch.zeros(3)}, str(other))
    with pytest.raises(FmergeError, match=r"no record \.notes\.safetensors\.fmerge-export\.json beside it and no "
                                          r"fmerge_key in its header\); refusing to replace it"):
        export_tensor_file(None, other, "k1", weights(1))
    legacy = tmp_path / "legacy.safetensors"  # written by an fmerge older than sidecars
    save_file({"x": torch.zeros(1)}, str(legacy), metadata={"fmerge_key": "old"})
    export_tensor_file(None, legacy, "k1", weights(1))
    assert set(load_file(legacy)) == {"a.weight", "b.bias"}
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(FmergeError, match="is not a file fmerge wrote"):
        export_tensor_file(None, tmp_path / "dir.safetensors", "k1", weights(1))


def test_a_file_export_killed_between_record_and_rename_is_still_fmerges(tmp_path, monkeypatch):
    target = tmp_path / "f.safetensors"
    export_tensor_file(None, target, "k1", weights(1))
    real = os.replace

    def killed(src, dst):
        if Path(dst) == target:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(export.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        export_tensor_file(None, target, "k2", weights(2))
    monkeypatch.undo()
    assert json.loads(sidecar_of(target).read_text())["key"] == "k2"  # the record went first
    assert export_tensor_file(None, target, "k2", weights(2)) == f"wrote {target}"
    assert torch.equal(load_file(target)["a.weight"], weights(2).get("a.weight"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".f.safetensors.fmerge-export.json", "f.safetensors"]


def test_fmerge_fisher_export_refuses_a_file_it_did_not_write(tmp_path):
    from test_fisher_cli import fisher_args, make_classifier

    model_dir, data, _ = make_classifier(tmp_path / "task")
    mine = tmp_path / "fisher.safetensors"
    mine.write_bytes(b"my own results, not a safetensors file")
    proc = fmerge_cli(*fisher_args(model_dir, data, 4, mine, tmp_path / "store"), check=False)
    msg = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in msg
    assert f"steps.fisher.export: {mine} exists and was not written by fmerge" in msg and "refusing to replace it" in msg
    assert mine.read_bytes() == b"my own results, not a safetensors file"


# ---------------------------------------------------------------------------------------------
# Validation: colliding exports


def test_two_steps_exporting_to_one_place_are_refused(zoo, tmp_path):
    same = ZOO_RECIPE.replace("    params: {lambda: 0.3}\n", "    params: {lambda: 0.3}\n    export: out/ties\n")
    r = load_recipe(write_recipe(tmp_path, same))
    with pytest.raises(FmergeError) as exc:
        check_exports(r, tmp_path / "store")
    msg = str(exc.value)
    assert "recipe.yaml:16: steps.ta.export and " in msg and "recipe.yaml:21: steps.ties.export: steps 'ta' and " in msg
    assert f"'ties' both export to {tmp_path / 'out' / 'ties'}" in msg and "give each step its own export path" in msg

    nested = ZOO_RECIPE.replace("    params: {lambda: 0.3}\n", "    params: {lambda: 0.3}\n    export: out\n")
    with pytest.raises(FmergeError, match=r"steps 'ta' and 'ties' export to nested paths: .*out and .*out/ties"):
        check_exports(load_recipe(write_recipe(tmp_path, nested)), tmp_path / "store")
    siblings = ZOO_RECIPE.replace("    params: {lambda: 0.3}\n", "    params: {lambda: 0.3}\n    export: out/ti\n")
    check_exports(load_recipe(write_recipe(tmp_path, siblings)), tmp_path / "store")  # a prefix is not nesting
    check_exports(load_recipe(write_recipe(tmp_path, ZOO_RECIPE)), tmp_path / "store")


def test_exports_inside_or_around_the_store_are_refused(zoo, tmp_path):
    inside = load_recipe(write_recipe(tmp_path, ZOO_RECIPE.replace("export: out/ties", "export: store/ties")))
    with pytest.raises(FmergeError) as exc:
        check_exports(inside, tmp_path / "store")
    assert str(exc.value).startswith(f"{tmp_path / 'recipe.yaml'}:20: steps.ties.export: export "
                                     f"{tmp_path / 'store' / 'ties'} is inside the artifact store {tmp_path / 'store'}")
    around = load_recipe(write_recipe(tmp_path, ZOO_RECIPE.replace("store: store", "store: out/ties/cache")))
    with pytest.raises(FmergeError, match=r"steps.ties.export: export .*out/ties holds the artifact store "
                                          r".*out/ties/cache; an export directory is replaced as a whole"):
        check_exports(around, around.resolve(around.spec.store))


def test_a_swept_step_without_a_choosing_eval_exports_each_variant_apart(zoo, tmp_path):
    r = load_recipe(write_recipe(tmp_path, ZOO_RECIPE + "sweep:\n  ties.params.density: [0.2, 0.4]\n"))
    assert [r.steps[v.name].export for v in r.sweeps["ties"]] == ["out/ties/density=0.2", "out/ties/density=0.4"]
    check_exports(r, tmp_path / "store")  # sibling directories: no collision (tests/test_export_hf.py runs them)


def test_fmerge_run_refuses_colliding_exports_before_computing(zoo, tmp_path):
    same = ZOO_RECIPE.replace("method: simple_average\n", "method: simple_average\n    export: out/ties\n")
    proc = fmerge_cli("run", write_recipe(tmp_path, same), check=False)
    msg = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in msg
    assert "steps.avg.export and" in msg and "steps 'avg' and 'ties' both export to" in msg
    assert not (tmp_path / "out").exists() and list((tmp_path / "store" / "objects").iterdir()) == []


def test_a_manifest_of_an_earlier_fmerge_with_sha256_records_still_decides_what_is_ours(tmp_path):
    """Exports made before manifests recorded xxh3-128 keep working: their SHA-256 decides."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights")
    old = {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest(), "mtime_ns": 1}  # a copy: mtime moved
    assert export._matches(f, old)
    f.write_bytes(b"weighTs")  # an edit of the same size
    assert not export._matches(f, old)
    assert export._matches(f, export._record(f)) and "xxh3_128" in export._record(f)
