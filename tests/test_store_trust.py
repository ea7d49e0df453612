"""A store that proves what it serves (issue "core made trustworthy", point 4).

fmerge creates a store only where nothing is, never deletes what it did not write, and never
serves an artifact whose bytes it has not checked against the checksums recorded at write time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ZOO_RECIPE, fmerge_cli, make_zoo, write_recipe
from fmerge.errors import FmergeError
from fmerge.store import STORE_MARKER, CorruptArtifactError, Store


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash ('dir' for directories)."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def one_line(text: str) -> str:
    return " ".join(text.split())


def cli_refuses(*args, cwd=None) -> str:
    proc = fmerge_cli(*args, cwd=cwd, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return one_line(proc.stderr)


# ------------------------------------------------------------------------------------------
# Only fmerge's own directories are written to or deleted from


def project_folder(root: Path) -> Path:
    """A user's project: a recipe, notes, and a tmp/ of their own (names fmerge might have used too)."""
    root.mkdir()
    (root / "recipe.yaml").write_text("base: base\n")
    (root / "tmp").mkdir()
    (root / "tmp" / "draft.txt").write_text("mine")
    (root / "tmp" / "abc.99999999.deadbeef").mkdir()  # looks like a dead writer's leftover, is not in a store
    (root / "tmp" / "abc.99999999.deadbeef" / "x").write_text("mine too")
    (root / "objects").mkdir()
    return root


def fake_git(root: Path) -> Path:
    git = root / ".git"
    for d in ("objects/ab", "refs/heads", "tmp"):
        (git / d).mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "objects" / "ab" / "cdef0123").write_bytes(b"blob")
    (git / "tmp" / "abc.99999999.deadbeef").write_text("x")
    return git


@pytest.mark.parametrize("folder", ["project", "git"])
@pytest.mark.parametrize("command", [["gc", "--older-than", "2999-01-01"], ["verify", "--repair"], ["verify"], ["ls"]])
def test_commands_refuse_a_directory_that_is_not_a_store_and_touch_nothing(tmp_path, folder, command):
    target = project_folder(tmp_path / "project") if folder == "project" else fake_git(tmp_path)
    before = snapshot(tmp_path)
    msg = cli_refuses(*command, "--store", target)
    assert f"{target} is not an fmerge artifact store: it has no {STORE_MARKER} and is not empty" in msg
    assert "never writes into or deletes from a directory it did not create" in msg
    assert "--store DIR, the FMERGE_STORE variable or the recipe's `store:`" in msg
    assert snapshot(tmp_path) == before


def test_store_api_refuses_a_foreign_directory_and_deletes_only_its_own(tmp_path):
    project = project_folder(tmp_path / "project")
    before = snapshot(project)
    for open_ in (Store, Store.create_or_open, Store.open_existing):
        with pytest.raises(FmergeError, match="is not an fmerge artifact store"):
            open_(project)
    assert snapshot(project) == before

    store = Store(tmp_path / "s")
    (tmp_path / "s" / "objects" / "pr").symlink_to(project)  # a link out of the store
    for other in (project / "tmp" / "draft.txt", project, tmp_path / "s" / "tmp", tmp_path / "s" / "objects" / "ab",
                  tmp_path / "s" / "objects" / "pr" / "tmp"):
        with pytest.raises(FmergeError, match="Refusing to remove"):
            store.remove_path(other)
    assert snapshot(project) == before


def test_clean_tmp_removes_only_what_fmerge_named(tmp_path):
    store = Store(tmp_path / "s")
    tmp = tmp_path / "s" / "tmp"
    theirs = ["notes.txt", "my-dir", "abc.1.not-hex!", "abc.12.deadbeef.extra", ".hidden.1.deadbeef"]
    for name in theirs:
        (tmp / name).mkdir() if name == "my-dir" else (tmp / name).write_text("x")
    ours = ["k1.99999999.0123abcd", "k2.99999998.deleted-89abcdef"]
    for name in ours:
        (tmp / name).mkdir()
        (tmp / name / "zarr.json").write_text("{}")
    (tmp / "k3.99999997.fedcba98").symlink_to(tmp_path)  # a link fmerge never makes: left alone
    assert store.clean_tmp() == 2
    assert sorted(p.name for p in tmp.iterdir()) == sorted(theirs + ["k3.99999997.fedcba98"])


@pytest.mark.parametrize("command", [["ls"], ["verify"], ["verify", "--repair"], ["show", "abcd1234"],
                                     ["gc", "--older-than", "2999-01-01"]])
def test_read_commands_on_a_missing_store_create_nothing(tmp_path, command):
    msg = cli_refuses(*command, "--store", tmp_path / "typo", cwd=tmp_path)
    assert f"No artifact store at {tmp_path / 'typo'}: the directory does not exist (nothing was created)" in msg
    assert "FMERGE_STORE" in msg
    assert list(tmp_path.iterdir()) == []


def test_ls_without_a_store_does_not_create_artifacts(tmp_path):
    env_store = os.environ.pop("FMERGE_STORE", None)
    try:
        msg = cli_refuses("ls", cwd=tmp_path)
    finally:
        if env_store is not None:
            os.environ["FMERGE_STORE"] = env_store
    assert f"No artifact store at {tmp_path / 'artifacts'}: the directory does not exist" in msg  # named whole
    assert list(tmp_path.iterdir()) == []


def test_an_empty_directory_is_refused_by_readers_and_becomes_a_store_for_writers(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = cli_refuses("verify", "--store", tmp_path / "empty")
    assert f"{tmp_path / 'empty'} is not an fmerge artifact store: it is an empty directory" in msg
    assert list((tmp_path / "empty").iterdir()) == []
    store = Store(tmp_path / "empty")
    assert json.loads((tmp_path / "empty" / STORE_MARKER).read_text())["version"] == 1
    assert Store.open_existing(tmp_path / "empty").root == store.root


def test_status_on_a_missing_store_reads_as_empty(tmp_path):
    store = Store.open_existing(tmp_path / "nothing", missing_ok=True)
    assert not store.has("abcd") and list(store.list()) == [] and store.verify() == []
    with pytest.raises(FmergeError, match="No artifact 'abcd1234'"):
        store.open("abcd1234")
    with pytest.raises(FmergeError, match="opened read-only"):
        store.writer("abcd1234", "merge", {}, {}, 1)
    assert not (tmp_path / "nothing").exists()


def test_run_refuses_to_make_a_store_in_a_foreign_directory(tmp_path, zoo):
    project_folder(tmp_path / "project")
    recipe = write_recipe(tmp_path, ZOO_RECIPE.replace("store: store", "store: project"))
    before = snapshot(tmp_path / "project")
    msg = cli_refuses("run", recipe)
    assert f"{tmp_path / 'project'} is not an fmerge artifact store" in msg and "(it holds objects, recipe.yaml, tmp)" in msg
    assert snapshot(tmp_path / "project") == before


def test_a_store_of_an_earlier_fmerge_is_read_and_adopted(tmp_path, zoo):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    fmerge_cli("run", recipe)
    (tmp_path / "store" / STORE_MARKER).unlink()  # what fmerge before the marker left
    listing = fmerge_cli("ls", "--store", tmp_path / "store").stdout
    assert listing.count("merge") >= 3 and not (tmp_path / "store" / STORE_MARKER).exists()
    again = fmerge_cli("run", recipe).stderr
    assert again.count("(merge): cached") == 3
    assert (tmp_path / "store" / STORE_MARKER).is_file()


def test_a_store_of_a_newer_format_is_refused(tmp_path):
    Store(tmp_path / "s")
    (tmp_path / "s" / STORE_MARKER).write_text(json.dumps({"format": "fmerge-store", "version": 99}))
    with pytest.raises(FmergeError, match=r"has format version 99 .* reads version 1 and older"):
        Store.open_existing(tmp_path / "s")


# ------------------------------------------------------------------------------------------
# Nothing is served unchecked


def small_artifact(store: Store, key: str = "k1" + "0" * 30):
    w = store.writer(key, "merge", {}, {}, 1)
    w.write("weights/a", torch.arange(64, dtype=torch.float32))
    w.write("weights/b", torch.ones(3, 3, dtype=torch.bfloat16))
    return w.commit({"step": "m"})


def chunk_of(array_dir: Path) -> Path:
    return next(p for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json")


def flip_byte(path: Path, at: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_get_refuses_a_corrupted_tensor(tmp_path):
    store = Store(tmp_path / "s")
    art = small_artifact(store)
    assert art.attrs["checksum_algorithm"] == "xxh3_128" and "attrs_checksum" in art.attrs
    flip_byte(chunk_of(art.path / "weights" / "a"))
    view = store.open(art.key).view("weights/")
    with pytest.raises(CorruptArtifactError) as info:
        view.get("a")
    msg = one_line(str(info.value))
    assert f"Artifact {art.key} (merge, step m) in store {tmp_path / 's'} is corrupt: tensor 'weights/a' differs " \
           f"from the checksum recorded when it was written. It was not used." in msg
    assert f"`fmerge verify --repair --store {tmp_path / 's'}` removes them" in msg
    assert torch.equal(view.get("b"), torch.ones(3, 3, dtype=torch.bfloat16))  # an intact tensor still reads
    chunk_of(art.path / "weights" / "b").unlink()  # a deleted chunk reads as zeros: caught too
    with pytest.raises(CorruptArtifactError, match="tensor 'weights/b' differs"):
        view.get("b")
    assert "differ from their checksums" in store.check(art.key)


def test_meta_only_artifact_checks_its_attributes(tmp_path):
    store = Store(tmp_path / "s")
    key = "e1" + "0" * 30
    store.writer(key, "eval", {}, {}, 1).commit({"step": "ev", "accuracy": 0.25})
    assert store.check(key) == ""
    meta = store.path(key) / "zarr.json"
    meta.write_text(meta.read_text().replace("0.25", "0.95"))
    assert store.check(key) == "its attributes differ from their checksum"
    with pytest.raises(CorruptArtifactError, match=rf"Artifact {key} \(eval, step ev\) in store .* is corrupt: its attributes differ"):
        store.open(key)


def test_an_artifact_under_another_key_is_refused(tmp_path):
    store = Store(tmp_path / "s")
    a, b = small_artifact(store, "aa" + "1" * 30), small_artifact(store, "bb" + "2" * 30)
    shutil.rmtree(b.path)
    shutil.copytree(a.path, b.path)
    assert store.check(b.key) == f"its attributes name another key, {a.key}"
    with pytest.raises(CorruptArtifactError, match=f"its attributes name another key, {a.key}"):
        store.open(b.key)


def test_has_intact_moves_a_bad_artifact_aside(tmp_path):
    store = Store(tmp_path / "s")
    art = small_artifact(store)
    assert store.has_intact(art.key)
    flip_byte(chunk_of(art.path / "weights" / "a"))
    store._verified.clear()  # a new process
    reported = []
    assert not store.has_intact(art.key, on_bad=reported.append)
    assert not store.has(art.key)
    (bad,) = reported
    assert bad.key == art.key and bad.step == "m" and "weights/a" in bad.problem
    assert bad.path.parent == tmp_path / "s" / "quarantine" and store.quarantined() == [bad.path]
    assert json.loads((bad.path / "fmerge-quarantine.json").read_text())["key"] == art.key


def test_legacy_blake2b_artifacts_still_read_and_verify(tmp_path):
    store = Store(tmp_path / "s")
    art = small_artifact(store)
    meta_file = art.path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    attrs = meta["attributes"]["fmerge"]
    for name in attrs["tensors"]:  # as fmerge wrote them before: blake2b-128, no algorithm, no attrs checksum
        data = art.get(name).view(-1).view(torch.uint8).numpy() if art.get(name).numel() else b""
        attrs["checksums"][name] = hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()
    del attrs["checksum_algorithm"], attrs["attrs_checksum"]
    meta_file.write_text(json.dumps(meta))
    old = store.open(art.key)
    assert old.checksum_algorithm == "blake2b_128" and store.check(art.key) == ""
    assert torch.equal(old.get("weights/a"), torch.arange(64, dtype=torch.float32))
    flip_byte(chunk_of(art.path / "weights" / "a"))
    with pytest.raises(CorruptArtifactError):
        Store(tmp_path / "s").open(art.key).get("weights/a")


# ------------------------------------------------------------------------------------------
# `fmerge run` checks what it reuses: a corrupt cached merge is reported, moved aside, recomputed


@pytest.fixture(scope="module")
def ran_project(tmp_path_factory) -> Path:
    """A project after one `fmerge run` of ZOO_RECIPE (its ties export kept as the reference)."""
    root = tmp_path_factory.mktemp("trust")
    make_zoo(root / "zoo")
    write_recipe(root, ZOO_RECIPE)
    fmerge_cli("run", root / "recipe.yaml")
    return root


def corrupt(store: Path, key: str, other: str, how: str) -> None:
    obj = lambda k: store / "objects" / k[:2] / k  # noqa: E731
    weights = obj(key) / "safetensors" / "weights"  # a merge's weights: the safetensors files it exports
    largest = max((p for p in weights.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "flipped byte":
        flip_byte(largest, 100)
    elif how == "deleted chunk":
        largest.unlink()
    elif how == "another key's artifact":
        shutil.rmtree(obj(key))
        shutil.copytree(obj(other), obj(key))
    elif how == "another artifact's tensors":
        shutil.rmtree(weights)
        shutil.copytree(obj(other) / "safetensors" / "weights", weights)


@pytest.mark.parametrize("how", ["flipped byte", "deleted chunk", "another key's artifact", "another artifact's tensors"])
def test_run_recomputes_a_corrupt_cached_merge_and_exports_it_right(ran_project, tmp_path, how):
    project = tmp_path / "p"
    shutil.copytree(ran_project, project, symlinks=True)
    reference = load_file(project / "out" / "ties" / "model.safetensors")
    shutil.rmtree(project / "out")  # the next run exports from what the store serves
    store = Store.open_existing(project / "store")
    keys = {info.attrs["meta"]["step"]: info.key for info in store.list()}
    corrupt(project / "store", keys["ties"], keys["ta"], how)

    proc = fmerge_cli("run", project / "recipe.yaml")
    err = one_line(proc.stderr)
    assert f"warning: cached artifact {keys['ties']} (merge, step ties) in store {project / 'store'} is corrupt:" in err
    assert "ties (merge): computed" in err and "avg (merge): cached" in err and "ta (merge): cached" in err
    (moved,) = Store.open_existing(project / "store").quarantined()
    assert moved.name.startswith(keys["ties"] + ".") and f"Moved it to {moved}; recomputing it." in err
    exported = load_file(project / "out" / "ties" / "model.safetensors")
    assert exported.keys() == reference.keys() and all(torch.equal(exported[n], reference[n]) for n in reference)
    assert Store.open_existing(project / "store").verify() == []

    verify = one_line(fmerge_cli("verify", "--store", project / "store").stdout)
    assert "kept 1 corrupt artifact(s) that `fmerge run` had moved aside" in verify
    repair = one_line(fmerge_cli("verify", "--repair", "--store", project / "store").stdout)
    assert "removed 1 corrupt artifact(s)" in repair and not moved.exists()


def test_concurrent_writers_create_one_store(tmp_path):
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "s"
    script = textwrap.dedent(f"""
        import sys, torch
        from fmerge.store import Store
        w = Store({str(root)!r}).writer("k" + sys.argv[1] * 8, "merge", {{}}, {{}}, 1)
        w.write("weights/a", torch.ones(4))
        w.commit()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    store = Store.open_existing(root)
    assert len(list(store.list())) == 4 and store.verify() == []


def test_repair_leaves_an_entry_fmerge_did_not_name(tmp_path):
    store = Store(tmp_path / "s")
    small_artifact(store)
    stray = tmp_path / "s" / "objects" / "k1" / "notes.txt"
    stray.write_text("mine")
    text = one_line(fmerge_cli("verify", "--repair", "--store", tmp_path / "s").stdout)
    assert "notes.txt" in text and "left alone (not an artifact name)" in text
    assert stray.read_text() == "mine" and store.check("k1" + "0" * 30) == ""


def test_the_repository_commits_no_store():
    """artifacts/ is built, never committed: a fresh clone has no store, and the first `fmerge run`
    (e.g. `make demo`, whose recipes use ../artifacts) creates it in the missing directory."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "artifacts"], cwd=repo, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert tracked.stdout.strip() == ""
