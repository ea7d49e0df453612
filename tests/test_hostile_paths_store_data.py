"""Bad input, round 2 (issue 13): export paths, damaged stores and bad task data.

Each case runs the real CLI in process (tests/hostile.py) and asserts exit 2 with one paragraph that
names the path, key or row at fault, no traceback, nothing of the user's changed and a bounded
time; or, where the input is legitimate but odd, exit 0 with the user's files unchanged.

Families: PATHS (where an export goes: `run`, `validate`, `merge --out`, `fisher --export`),
STORE (a damaged artifact store: `ls`, `show`, `verify`, `run`, `gc`, `status`) and DATA (task data
that cannot be read as the spec says: `fmerge fisher --data ...` and recipes with `splits:`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

import hostile
from conftest import ZOO_RECIPE, make_zoo
from test_fisher_cli import make_classifier

pytestmark = pytest.mark.timeout(600, func_only=True)  # a hang guard only: never a speed check (busy machines)

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOT_AS_ROOT = pytest.mark.skipif(AS_ROOT, reason="root ignores file permissions, so nothing is unwritable")
BOUND = 300.0  # seconds: a hang guard only, generous for a busy machine (a refusal comes before any heavy work)


def cli(args: list, cwd: Path, env: dict | None = None) -> hostile.Result:
    start = time.monotonic()
    result = hostile.run(args, cwd, env)
    took = time.monotonic() - start
    assert took < BOUND, f"fmerge {' '.join(map(str, args))} took {took:.1f}s"
    assert "Traceback" not in result.err + result.out, result.err
    return result


def refused(args: list, cwd: Path, *mentions: str, watch: tuple = (), env: dict | None = None) -> str:
    """Exit 2, one paragraph naming `mentions`, and nothing under `watch` changed. Progress lines a
    run printed before it met the problem (a non-terminal's log) precede the paragraph."""
    before = hostile.snapshot(*watch)
    result = cli(args, cwd, env)
    start = result.err.find("error:")
    if start > 0:
        result = hostile.Result(result.code, result.out, result.err[start:])
    msg = hostile.assert_refused(result, *mentions)
    assert hostile.snapshot(*watch) == before, "a refused command changed the user's files"
    return msg


def succeeded(args: list, cwd: Path, watch: tuple = (), env: dict | None = None) -> hostile.Result:
    before = hostile.snapshot(*watch)
    result = cli(args, cwd, env)
    assert result.code == 0, f"exit {result.code}:\n{result.err}\n{result.out}"
    assert hostile.snapshot(*watch) == before, "a command changed the user's files"
    return result


def flat(text: str) -> str:
    return " ".join(text.split())


# =============================================================================================
# Fixtures: one zoo, one computed store, one classifier per module


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_zoo")
    make_zoo(root / "zoo")
    return root / "zoo"


def zoo_recipe(project: Path, zoo: Path, export: str = "out/ties", store: str = "store") -> Path:
    """ZOO_RECIPE in `project`, its models in the shared zoo, the ties step exporting to `export`."""
    text = (ZOO_RECIPE.replace("zoo/", f"{zoo}/").replace("export: out/ties", f"export: {json.dumps(export)}")
            .replace("store: store", f"store: {json.dumps(store)}"))
    project.mkdir(parents=True, exist_ok=True)
    (project / "recipe.yaml").write_text(text)
    return project / "recipe.yaml"


@pytest.fixture(scope="module")
def ran(tmp_path_factory, zoo) -> Path:
    """A project after one `fmerge run` of the zoo recipe: store/ holds avg, ta and ties."""
    project = tmp_path_factory.mktemp("hostile_ran")
    recipe = zoo_recipe(project, zoo)
    assert cli(["run", recipe], project).code == 0
    return project


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """A tiny BERT classifier (3 labels) with its tokenizer, and a 30-row jsonl of its task."""
    root = tmp_path_factory.mktemp("hostile_clf")
    model_dir, data, rows = make_classifier(root)
    return model_dir, data, rows


def keys_by_step(store: Path) -> dict[str, str]:
    from fmerge.store import Store

    return {info.attrs["meta"]["step"]: info.key for info in Store.open_existing(store).list()}


def copy_project(ran: Path, dest: Path, zoo: Path) -> Path:
    """A fresh copy of the computed project (store and recipe, not the export)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ran / "store", dest / "store", symlinks=True)
    zoo_recipe(dest, zoo)
    return dest


# =============================================================================================
# PATHS: where an export goes


def _file(path: Path, text: str = "mine\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _link(path: Path, to: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(to, path)
    return path


def _readonly(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


# name -> setup(project, zoo) returning (export as written in the recipe, strings the message names,
# commands that must refuse: "validate" and "run" refuse before computing anything; "run" alone when
# only the export itself can tell)
def _paths():
    def case(name, setup, *, when=("validate", "run"), marks=()):
        return pytest.param(setup, when, id=name, marks=marks)

    return [
        case("onto an existing file", lambda p, z: (str(_file(p / "out" / "ties").relative_to(p)),
                                                     [str(p / "out" / "ties"), "is a file"])),
        case("onto a file beside the recipe", lambda p, z: (_file(p / "notes.txt").name, [str(p / "notes.txt")])),
        case("under a file", lambda p, z: (_file(p / "some_file") and "some_file/sub",
                                            [str(p / "some_file"), "which is a file"])),
        case("deep under a file", lambda p, z: (_file(p / "some_file") and "some_file/a/b/c",
                                                 [str(p / "some_file"), "which is a file"])),
        case("under a file named like a directory", lambda p, z: (_file(p / "out") and "out/ties",
                                                                   [str(p / "out"), "which is a file"])),
        case("through a symlink loop", lambda p, z: (_link(p / "loop", "loop") and "loop/sub",
                                                      [str(p / "loop"), "symbolic link loop"])),
        case("onto a symlink loop", lambda p, z: (_link(p / "loop", "loop") and "loop",
                                                   [str(p / "loop"), "symbolic link loop"])),
        case("through a two-link loop", lambda p, z: (_link(p / "a", "b") and _link(p / "b", "a") and "a/x",
                                                       [str(p / "a"), "symbolic link loop"])),
        case("onto a dangling link", lambda p, z: (_link(p / "gone", "nowhere") and "gone",
                                                    [str(p / "gone"), "does not exist"])),
        case("through a dangling link", lambda p, z: (_link(p / "gone", "nowhere") and "gone/ties",
                                                       [str(p / "gone"), "does not exist"])),
        case("onto a link to a directory", lambda p, z: ((p / "real").mkdir() or _link(p / "link", "real") and "link",
                                                          [str(p / "link"), "symbolic link"])),
        case("onto a link to a file", lambda p, z: (_file(p / "f.txt") and _link(p / "link", "f.txt") and "link",
                                                     [str(p / "link"), "symbolic link"])),
        case("into an unwritable parent", lambda p, z: (_readonly(p / "ro") and "ro/ties",
                                                         [str(p / "ro"), "cannot be written"]), marks=NOT_AS_ROOT),
        case("below an unwritable directory", lambda p, z: (_readonly(p / "ro") and "ro/a/b/ties",
                                                             [str(p / "ro"), "cannot be written"]), marks=NOT_AS_ROOT),
        case("the base model's directory", lambda p, z: (str(z / "base"), [str(z / "base"), "the base model's directory"])),
        case("a model's directory", lambda p, z: (str(z / "task1"), [str(z / "task1"), "model 'b''s directory"])),
        case("inside a model's directory", lambda p, z: (str(z / "task0" / "merged"),
                                                          [str(z / "task0" / "merged"), "lies inside model 'a''s"])),
        case("the directory holding the models", lambda p, z: (str(z), [str(z), "holds the base model's directory"])),
        case("the recipe's directory", lambda p, z: (".", [str(p), "holds the recipe"])),
        case("the recipe's directory, absolute", lambda p, z: (str(p), [str(p), "holds the recipe"])),
        case("the recipe file", lambda p, z: ("recipe.yaml", [str(p / "recipe.yaml"), "is the recipe"])),
        case("the recipe's parent", lambda p, z: ("..", [str(p.parent), "holds"])),
        case("the file system root", lambda p, z: ("/", ["export /", "holds"])),
        case("a NUL in the path", lambda p, z: ("out/a\0b", ["steps.ties.export", "NUL character"])),
        case("a name too long", lambda p, z: ("out/" + "x" * 300, ["steps.ties.export", "longer than the file system"])),
        case("inside the store", lambda p, z: (str(p.parent / "store" / "ties"),
                                                [str(p.parent / "store" / "ties"), "inside the artifact store"])),
        case("a directory of the user's", lambda p, z: (_file(p / "mine" / "notes.txt") and "mine",
                                                         [str(p / "mine"), "was not written by fmerge"]), when=("run",)),
    ]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("setup, when", _paths())
def test_paths_a_bad_export_path_is_refused(tmp_path, zoo, setup, when, command):
    project = tmp_path / "p"
    project.mkdir()
    export, mentions = setup(project, zoo)
    store = tmp_path / "store"  # outside the project: a run creates it before it refuses
    recipe = zoo_recipe(project, zoo, export, str(store))
    try:
        if command not in when:  # only the export itself finds it: validation passes
            assert cli([command, recipe], project).code == 0
            return
        refused([command, recipe], project, "steps.ties.export", *mentions, watch=(project, zoo))
        if command == "run" and "validate" in when:
            assert not any((store / "objects").glob("*/*")), "computed before refusing"
    finally:
        for p in project.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_paths_a_read_only_parent_is_refused_even_where_permissions_are_not_checked(tmp_path, zoo, monkeypatch,
                                                                                     command):
    """The unwritable-parent case for root too: the directory reads as read-only (a read-only mount)."""
    project = tmp_path / "p"
    (project / "ro").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (
        False if Path(path) == project / "ro" and mode & os.W_OK else real_access(path, mode, *a, **k)))
    recipe = zoo_recipe(project, zoo, "ro/a/ties", str(tmp_path / "store"))
    refused([command, recipe], project, "steps.ties.export", str(project / "ro"), "cannot be written",
            watch=(project, zoo))


def test_paths_export_equal_to_the_current_directory_is_refused(tmp_path, zoo):
    project = tmp_path / "p"
    work = project / "work"
    work.mkdir(parents=True)
    _file(work / "notes.txt")
    recipe = zoo_recipe(project, zoo, str(work), str(tmp_path / "store"))
    refused(["run", recipe], work, str(work), "is the current directory", watch=(project, zoo))


def test_paths_export_holding_the_current_directory_is_refused(tmp_path, zoo):
    project = tmp_path / "p"
    work = project / "deep" / "work"
    work.mkdir(parents=True)
    recipe = zoo_recipe(project, zoo, "deep", str(tmp_path / "store"))
    refused(["validate", recipe], work, str(project / "deep"), "holds the current directory", watch=(project, zoo))


def test_paths_a_fresh_nested_export_succeeds_and_touches_nothing_else(tmp_path, zoo):
    project = tmp_path / "p"
    _file(project / "notes.txt")
    recipe = zoo_recipe(project, zoo, "out/a/b/ties")
    succeeded(["run", recipe], project, watch=(zoo, project / "notes.txt"))
    assert (project / "out" / "a" / "b" / "ties" / "model.safetensors").is_file()


@pytest.mark.parametrize("target, mentions", [
    pytest.param(lambda p, z: z / "base", ["the base model's directory"], id="base"),
    pytest.param(lambda p, z: z / "task1", ["model 'task1''s directory"], id="a model"),
    pytest.param(lambda p, z: _file(p / "merged"), ["is a file"], id="an existing file"),
    pytest.param(lambda p, z: _file(p / "f") / "sub", ["which is a file"], id="under a file"),
    pytest.param(lambda p, z: p, ["is the current directory"], id="the current directory"),
])
def test_paths_merge_out_onto_user_files_is_refused(tmp_path, zoo, target, mentions):
    project = tmp_path / "p"
    project.mkdir()
    out = target(project, zoo)
    refused(["merge", "--method", "task_arithmetic", "--base", zoo / "base", "--model", zoo / "task0",
             "--model", zoo / "task1", "--out", out, "--store", tmp_path / "store"], project, str(out), *mentions,
            watch=(project, zoo))


def fisher_cmd(model_dir, data, export=None, store=None, *extra):
    args = ["fisher", "--model", model_dir, "--data", data, "--examples", "4", "--batch-size", "4"]
    if export is not None:
        args += ["--export", export]
    if store is not None:
        args += ["--store", store]
    return args + list(extra)


@pytest.mark.parametrize("target, mentions", [
    pytest.param(lambda p, m, d: (p / "dir.safetensors").mkdir() or p / "dir.safetensors",
                 ["exists and is not a file fmerge wrote"], id="onto a directory named .safetensors"),
    pytest.param(lambda p, m, d: _file(p / "f.safetensors", "my results"),
                 ["exists and was not written by fmerge", "refusing to replace it"], id="onto a file of the user's"),
    pytest.param(lambda p, m, d: d, ["is data 'task'"], id="onto the data file"),
    # (fmerge fisher's base is its model)
    pytest.param(lambda p, m, d: m, ["is the base model's directory"], id="onto the model's directory"),
    pytest.param(lambda p, m, d: m / "fisher.safetensors", ["lies inside the base model's directory"],
                 id="inside the model's directory"),
    pytest.param(lambda p, m, d: m / "config.json", ["lies inside the base model's directory"],
                 id="onto the model's config"),
    pytest.param(lambda p, m, d: _file(p / "f") / "x.safetensors", ["which is a file"], id="under a file"),
    pytest.param(lambda p, m, d: _link(p / "loop", "loop") / "x.safetensors", ["symbolic link loop"],
                 id="through a symlink loop"),
    pytest.param(lambda p, m, d: _file(p / "real.safetensors") and _link(p / "l.safetensors", "real.safetensors"),
                 ["is a symbolic link"], id="onto a link"),
    pytest.param(lambda p, m, d: p, ["is the current directory"], id="onto the current directory"),
    pytest.param(lambda p, m, d: _readonly(p / "ro") / "x.safetensors", ["cannot be written"],
                 id="into an unwritable directory", marks=NOT_AS_ROOT),
])
def test_paths_fisher_export_onto_user_files_is_refused(tmp_path, clf, target, mentions):
    model_dir, data, _ = clf
    project = tmp_path / "p"
    project.mkdir()
    out = target(project, model_dir, data)
    try:
        refused(fisher_cmd(model_dir, data, out, tmp_path / "store"), project, str(out), "steps.fisher.export",
                *mentions, watch=(project, model_dir, data))
    finally:
        (project / "ro").exists() and (project / "ro").chmod(0o755)


def test_paths_fisher_export_into_an_existing_directory_writes_beside_the_users_files(tmp_path, clf):
    model_dir, data, _ = clf
    out = tmp_path / "results"
    _file(out / "notes.txt")
    succeeded(fisher_cmd(model_dir, data, out, tmp_path / "store"), tmp_path, watch=(out / "notes.txt", model_dir, data))
    assert (out / "clf.safetensors").is_file()


# =============================================================================================
# STORE: damaged artifact stores


def _artifact(store: Path, key: str) -> Path:
    return store / "objects" / key[:2] / key


def _chunk(art: Path) -> Path:
    """The largest file of tensor bytes: a zarr chunk, or the safetensors file a merge keeps."""
    files = [p for p in art.rglob("c/*") if p.is_file()] or list(art.rglob("*.safetensors"))
    return max(files, key=lambda p: p.stat().st_size)


def _tensor_meta(art: Path) -> Path:
    """What describes a tensor's bytes: its zarr array's zarr.json, or the safetensors file (header first)."""
    chunk = _chunk(art)
    return chunk if chunk.suffix == ".safetensors" else chunk.parent.parent / "zarr.json"


def _write(path: Path, data: bytes | str) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _attrs(art: Path, edit) -> None:
    meta = json.loads((art / "zarr.json").read_text())
    edit(meta)
    (art / "zarr.json").write_text(json.dumps(meta))


def _dir_for_meta(art: Path) -> None:
    (art / "zarr.json").unlink()
    (art / "zarr.json").mkdir()


def _emptied(art: Path) -> None:
    shutil.rmtree(art)
    art.mkdir()


# how the ties artifact is damaged -> whether its metadata is unreadable (show refuses) or only its tensors
DAMAGE = {
    "metadata truncated": (lambda a: _truncate(a / "zarr.json"), True),
    "metadata not JSON": (lambda a: _write(a / "zarr.json", "this is not json {"), True),
    "metadata empty": (lambda a: _write(a / "zarr.json", ""), True),
    "metadata not UTF-8": (lambda a: _write(a / "zarr.json", b'{"zarr_format": 3, "attributes": "\xff\xfe"}'), True),
    "metadata a JSON list": (lambda a: _write(a / "zarr.json", "[1, 2, 3]"), True),
    "fmerge attributes missing": (lambda a: _attrs(a, lambda m: m["attributes"].pop("fmerge")), True),
    "fmerge attributes a string": (lambda a: _attrs(a, lambda m: m["attributes"].update(fmerge="x")), True),
    "attributes edited": (lambda a: _attrs(a, lambda m: m["attributes"]["fmerge"].update(kind="fisher")), True),
    "metadata a directory": (_dir_for_meta, True),
    "artifact emptied": (_emptied, True),
    "chunk truncated": (lambda a: _truncate(_chunk(a)), False),
    "chunk deleted": (lambda a: _chunk(a).unlink(), False),
    "chunk grown": (lambda a: _write(_chunk(a), _chunk(a).read_bytes() + b"\0" * 64), False),
    "tensor metadata not JSON": (lambda a: _write(_tensor_meta(a), "{"), False),
}


@pytest.fixture
def damaged(tmp_path, ran, zoo, request):
    """A copy of the computed project with its ties artifact damaged as `request.param` says."""
    project = copy_project(ran, tmp_path / "p", zoo)
    keys = keys_by_step(project / "store")
    damage, meta_bad = DAMAGE[request.param]
    damage(_artifact(project / "store", keys["ties"]))
    return project, keys, meta_bad


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_store_ls_lists_the_intact_artifacts_of_a_damaged_store(damaged):
    project, keys, meta_bad = damaged
    result = succeeded(["ls", "--store", project / "store"], project, watch=(project,))
    out = flat(result.out + result.err)
    assert keys["avg"] in out and keys["ta"] in out
    # listed (its attributes readable: verify finds what is wrong), or named: nothing vanishes unsaid
    assert keys["ties"] in flat(result.out) or f"could not be read and is not listed: {keys['ties']}" in flat(result.err)
    assert meta_bad or keys["ties"] in flat(result.out)


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_store_show_names_the_key_and_the_problem(damaged):
    project, keys, meta_bad = damaged
    args = ["show", keys["ties"][:10], "--store", project / "store"]
    if meta_bad:
        refused(args, project, keys["ties"], watch=(project,))
    else:  # the attributes are intact: show reads no tensor (verify and run check them)
        assert keys["ties"] in succeeded(args, project).out
    assert keys["avg"] in succeeded(["show", keys["avg"], "--store", project / "store"], project).out


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_store_verify_lists_the_damaged_artifact(damaged):
    project, keys, _ = damaged
    before = hostile.snapshot(project)
    result = cli(["verify", "--store", project / "store"], project)
    assert result.code == 1, result.err + result.out
    assert keys["ties"] in flat(result.out) and "2 artifact(s) ok, 1 bad" in flat(result.out)
    assert hostile.snapshot(project) == before


@pytest.mark.parametrize("damaged", ["metadata not JSON", "metadata a directory", "artifact emptied",
                                     "fmerge attributes missing", "chunk truncated", "tensor metadata not JSON"],
                         indirect=True)
def test_store_run_moves_a_damaged_artifact_aside_and_recomputes_it(damaged, zoo):
    project, keys, _ = damaged
    result = succeeded(["run", project / "recipe.yaml"], project, watch=(zoo, project / "recipe.yaml"))
    assert f"cached artifact {keys['ties']}" in flat(result.err) and "recomputing it" in flat(result.err)
    assert "3 artifact(s) ok" in flat(succeeded(["verify", "--store", project / "store"], project).out)
    assert len(list((project / "store" / "quarantine").iterdir())) == 1


@pytest.mark.parametrize("damaged", ["metadata not JSON", "chunk deleted"], indirect=True)
def test_store_verify_repair_removes_the_damaged_artifact_only(damaged):
    project, keys, _ = damaged
    result = succeeded(["verify", "--repair", "--store", project / "store"], project)
    assert "removed" in result.out and not _artifact(project / "store", keys["ties"]).exists()
    assert _artifact(project / "store", keys["avg"]).exists()


def _misplaced(s: Path) -> Path:
    art = next((s / "objects").glob("*/*"))
    shutil.copytree(art, s / "objects" / "zz" / art.name)
    return s / "objects" / "zz" / art.name


@pytest.mark.parametrize("damage", ["chunk truncated", "chunk deleted", "tensor metadata not JSON"])
def test_store_a_damaged_fisher_estimate_is_not_extended(tmp_path, clf, damage):
    """More --examples extend the largest cached estimate; a damaged one is skipped, said, and kept."""
    model_dir, data, _ = clf
    store = tmp_path / "store"
    args = lambda n: fisher_cmd(model_dir, data, None, store, "--estimator", "sampled", "--examples", n)  # noqa: E731
    assert cli(args(4), tmp_path).code == 0
    (key,) = [p.name for p in (store / "objects").glob("*/*")]
    DAMAGE[damage][0](_artifact(store, key))
    before = hostile.snapshot(model_dir, data)
    result = succeeded(args(8), tmp_path)
    assert f"cached Fisher {key}" in flat(result.err) and "not extending it" in flat(result.err)
    assert "│ -" in result.out  # extended from: nothing
    assert hostile.snapshot(model_dir, data) == before and _artifact(store, key).exists()


# Strays: entries of objects/ that fmerge did not write (setup returns the stray).
STRAYS = {
    "a directory objects/zz/not-a-key": lambda s: _file(s / "objects" / "zz" / "not-a-key" / "x").parent,
    "a file objects/readme.txt": lambda s: _file(s / "objects" / "readme.txt"),
    "a file objects/ab/notes.txt": lambda s: _file(s / "objects" / "ab" / "notes.txt"),
    "a file named like a key": lambda s: _file(s / "objects" / "ab" / ("ab" + "0" * 30)),
    "a link out of the store": lambda s: _link(s / "objects" / "ef" / ("ef" + "2" * 30), str(s.parent / "outside")),
    "a misplaced artifact copy": _misplaced,
}


@pytest.fixture
def strayed(tmp_path, ran, zoo, request):
    project = copy_project(ran, tmp_path / "p", zoo)
    _file(project / "outside" / "precious.txt")
    return project, STRAYS[request.param](project / "store")


@pytest.mark.parametrize("strayed", list(STRAYS), indirect=True)
@pytest.mark.parametrize("command", ["ls", "verify", "verify --repair", "run", "status", "gc"])
def test_store_strays_in_objects_are_reported_never_removed(strayed, zoo, command):
    project, stray = strayed
    store = project / "store"
    strays = [stray, *(stray.rglob("*") if stray.is_dir() and not stray.is_symlink() else [])]
    args = {"ls": ["ls", "--store", store], "verify": ["verify", "--store", store],
            "verify --repair": ["verify", "--repair", "--store", store], "run": ["run", project / "recipe.yaml"],
            "status": ["status", project / "recipe.yaml"], "gc": ["gc", project / "recipe.yaml"]}[command]
    result = cli(args, project)
    assert result.code in (0, 1), result.err + result.out  # verify: 1 when it lists a bad entry
    for p in strays:
        assert os.path.lexists(p), f"{p} was removed"
    assert len(keys_by_step(store)) == 3
    assert (project / "outside" / "precious.txt").read_text() == "mine\n"
    if command.startswith("verify") and result.code == 1:
        assert "bad" in result.out


NON_KEYS = ["zzzz", "xyz!", "../../etc", "/etc/passwd", "a/b", ".hidden", "not-a-key", "ABCD-", "ffff ffff", "x" * 500]


@pytest.mark.parametrize("key", NON_KEYS)
def test_store_show_refuses_what_is_not_a_key(tmp_path, ran, zoo, key):
    project = copy_project(ran, tmp_path / "p", zoo)
    refused(["show", key, "--store", project / "store"], project, "is not an artifact key", watch=(project,))


def test_store_show_an_unknown_key_prefix(tmp_path, ran, zoo):
    project = copy_project(ran, tmp_path / "p", zoo)
    unknown = next(c * 8 for c in "0123456789abcdef" if not any(k.startswith(c * 8) for k in keys_by_step(project / "store").values()))
    refused(["show", unknown, "--store", project / "store"], project, f"No artifact '{unknown}'", "fmerge ls")


@pytest.mark.parametrize("command", ["ls", "verify", "show", "gc", "status", "run"])
def test_store_option_pointing_at_a_file_is_refused(tmp_path, zoo, command):
    project = tmp_path / "p"
    recipe = zoo_recipe(project, zoo)
    store = _file(project / "store.txt", "my notes")
    args = {"ls": ["ls"], "verify": ["verify"], "show": ["show", "abcd1234"], "gc": ["gc", "--older-than", "2000-01-01"],
            "status": ["status", recipe], "run": ["run", recipe]}[command]
    refused(args + ["--store", store], project, str(store), "a file", watch=(project, zoo))


def _marker(text: bytes | str):
    return lambda s: _write(s / "fmerge-store.json", text)


def _replace_with_dir(name: str):
    def damage(s: Path) -> None:
        p = s / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        (p / "x").mkdir(parents=True)
    return damage


def _replace_with_file(name: str):
    def damage(s: Path) -> None:
        p = s / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        _file(p)
    return damage


def _lock_dirs(s: Path) -> None:
    for key in keys_by_step(s).values():
        (s / "locks" / f"{key}.lock").unlink(missing_ok=True)
        (s / "locks" / f"{key}.lock").mkdir(parents=True)
    for p in (s / "objects").glob("*/*"):
        shutil.rmtree(p)  # so that run must lock each key to compute it


# the whole store damaged -> strings the refusal names, commands that must refuse
STORE_DAMAGE = {
    "marker of a future format": (_marker('{"format": "fmerge-store", "version": 99}'), ["format version 99"],
                                  ["ls", "verify", "run", "status"]),
    "marker garbage JSON": (_marker("{{{ not json"), ["fmerge-store.json", "unreadable"], ["ls", "run"]),
    "marker not UTF-8": (_marker(b"\xff\xfe\x00"), ["fmerge-store.json", "unreadable"], ["ls"]),
    "marker a JSON list": (_marker("[1]"), ["fmerge-store.json", "unreadable"], ["verify"]),
    "marker version not a number": (_marker('{"version": "one"}'), ["fmerge-store.json", "unreadable"], ["status"]),
    "marker a directory": (_replace_with_dir("fmerge-store.json"), ["fmerge-store.json", "a directory"],
                           ["ls", "run", "verify"]),
    "objects/ a file": (_replace_with_file("objects"), ["objects", "not a directory"], ["ls", "verify", "run"]),
    "tmp/ a file": (_replace_with_file("tmp"), ["tmp", "not a directory"], ["run", "verify"]),
    "locks/ a file": (_replace_with_file("locks"), ["locks", "not a directory"], ["run"]),
    "quarantine/ a file": (_replace_with_file("quarantine"), ["quarantine", "not a directory"], ["ls", "run"]),
    "a lock file that is a directory": (_lock_dirs, [".lock", "is a directory"], ["run"]),
}


@pytest.mark.parametrize("name, command", [(n, c) for n, (_, _, cs) in STORE_DAMAGE.items() for c in cs])
def test_store_damaged_layout_is_refused_clearly(tmp_path, ran, zoo, name, command):
    project = copy_project(ran, tmp_path / "p", zoo)
    store = project / "store"
    if name == "quarantine/ a file":  # only a run that meets a bad artifact needs quarantine/
        _truncate(_artifact(store, keys_by_step(store)["ties"]) / "zarr.json")
    damage, mentions, _ = STORE_DAMAGE[name]
    damage(store)
    recipe = project / "recipe.yaml"
    args = {"ls": ["ls", "--store", store], "verify": ["verify", "--store", store], "run": ["run", recipe],
            "status": ["status", recipe]}[command]
    refused(args, project, str(store), *mentions, watch=(project, zoo))


def test_store_root_that_is_a_symlink_loop(tmp_path, zoo):
    project = tmp_path / "p"
    recipe = zoo_recipe(project, zoo)
    _link(project / "store", "store")
    for args in (["ls", "--store", project / "store"], ["run", recipe]):
        refused(args, project, str(project / "store"), "symbolic link loop", watch=(project, zoo))


# gc looks in the recipes' store


def test_store_gc_uses_the_recipes_store(tmp_path, ran, zoo, monkeypatch):
    monkeypatch.delenv("FMERGE_STORE", raising=False)
    project = copy_project(ran, tmp_path / "p", zoo)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = succeeded(["gc", project / "recipe.yaml", "--dry-run"], elsewhere, watch=(project, zoo))
    assert "0 artifact(s) would be removed" in result.out
    assert list(elsewhere.iterdir()) == []  # no ./artifacts looked for or made


def test_store_gc_removes_from_the_recipes_store_what_it_no_longer_references(tmp_path, ran, zoo, monkeypatch):
    monkeypatch.delenv("FMERGE_STORE", raising=False)
    project = copy_project(ran, tmp_path / "p", zoo)
    keys = keys_by_step(project / "store")
    text = (project / "recipe.yaml").read_text().replace("  avg:\n    kind: merge\n    method: simple_average\n", "")
    (project / "recipe.yaml").write_text(text)
    result = succeeded(["gc", project / "recipe.yaml"], tmp_path, watch=(zoo,))
    assert f"removed {keys['avg']}" in result.out and set(keys_by_step(project / "store")) == {"ta", "ties"}


def test_store_gc_refuses_recipes_with_different_stores(tmp_path, ran, zoo, monkeypatch):
    monkeypatch.delenv("FMERGE_STORE", raising=False)
    project = copy_project(ran, tmp_path / "p", zoo)
    other = zoo_recipe(tmp_path / "q", zoo, store="other-store")
    refused(["gc", project / "recipe.yaml", other], tmp_path, "different artifact stores", str(project / "store"),
            str(tmp_path / "q" / "other-store"), watch=(project, zoo))


def test_store_gc_store_option_wins_over_the_recipes(tmp_path, ran, zoo, monkeypatch):
    monkeypatch.delenv("FMERGE_STORE", raising=False)
    project = copy_project(ran, tmp_path / "p", zoo)
    other = zoo_recipe(tmp_path / "q", zoo, store="other-store")
    result = succeeded(["gc", other, "--dry-run", "--store", project / "store"], tmp_path, watch=(project,))
    assert "0 artifact(s) would be removed" in result.out


def test_store_gc_with_a_recipe_whose_store_is_missing(tmp_path, zoo, monkeypatch):
    monkeypatch.delenv("FMERGE_STORE", raising=False)
    recipe = zoo_recipe(tmp_path / "q", zoo, store="never-made")
    refused(["gc", recipe], tmp_path, f"No artifact store at {tmp_path / 'q' / 'never-made'}", watch=(tmp_path,))


# =============================================================================================
# DATA: task data that cannot be read as the spec says


def _rows(n: int = 20, label=lambda i: i % 3) -> list[dict]:
    return [{"text": f"good dog {i}", "label": label(i)} for i in range(n)]


def _jsonl(path: Path, rows: list, raw: dict[int, bytes] | None = None) -> Path:
    """rows as JSON lines; raw: 1-based line number -> bytes written instead."""
    lines = [json.dumps(r).encode() for r in rows]
    for line, data in (raw or {}).items():
        lines[line - 1] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    return path


def _csv(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


CSV_OK = "text,label\n" + "".join(f"good dog {i},{i % 3}\n" for i in range(12))
LATIN = b'{"text": "caf\xe9 dog", "label": 1}'

# name -> setup(dir) returning (data path, extra fisher options, strings the refusal names)
DATA = {
    "empty jsonl": lambda d: (_csv(d / "t.jsonl", ""), [], ["t.jsonl", "has no rows"]),
    "blank-lines jsonl": lambda d: (_csv(d / "t.jsonl", "\n\n\n"), [], ["t.jsonl", "has no rows"]),
    "empty csv": lambda d: (_csv(d / "t.csv", ""), [], ["t.csv", "has no rows"]),
    "header-only csv": lambda d: (_csv(d / "t.csv", "text,label\n"), [], ["t.csv", "has no rows"]),
    "broken jsonl line": lambda d: (_jsonl(d / "t.jsonl", _rows(), {6: b'{"text": "x", "label": '}), [],
                                    ["t.jsonl", "line 6"]),
    "jsonl line not an object": lambda d: (_jsonl(d / "t.jsonl", _rows(), {3: b"[1, 2]"}), [], ["t.jsonl", "line 3"]),
    "jsonl truncated last line": lambda d: (_csv(d / "t.jsonl", "".join(json.dumps(r) + "\n" for r in _rows(5))
                                                 + '{"text": "goo'), [], ["t.jsonl", "line 6"]),
    "broken json array": lambda d: (_csv(d / "t.json", '[{"text": "a", "label": 0},\n {"text": "b" "label": 1}]'),
                                    [], ["t.json", "line 2"]),
    "non-UTF-8 jsonl row": lambda d: (_jsonl(d / "t.jsonl", _rows(), {14: LATIN}), [], ["t.jsonl", "line 14", "UTF-8"]),
    "non-UTF-8 csv row": lambda d: (_csv(d / "t.csv", CSV_OK.encode() + b"caf\xe9 dog,1\n"), [],
                                    ["t.csv", "line 14", "UTF-8"]),
    "non-UTF-8 json": lambda d: (_csv(d / "t.json", b'[{"text": "a", "label": 0},\n' + LATIN + b"]"), [],
                                 ["t.json", "line 2", "UTF-8"]),
    "missing text column": lambda d: (_jsonl(d / "t.jsonl", _rows()), ["--text-column", "sentence"],
                                      ["no column 'sentence'", "text, label"]),
    "missing label column": lambda d: (_jsonl(d / "t.jsonl", [{"text": "good"}] * 8), [],
                                       ["no column 'label'", "label_column"]),
    "label out of range": lambda d: (_jsonl(d / "t.jsonl", _rows(8, label=lambda i: 7 if i == 3 else 0)),
                                     ["--examples", "8"], ["t.jsonl", "row 4", "holds 7", "0..2"]),
    "negative label": lambda d: (_jsonl(d / "t.jsonl", _rows(8, label=lambda i: -1)), ["--examples", "8"],
                                 ["t.jsonl", "row 1", "holds -1", "0..2"]),
    "fractional label": lambda d: (_jsonl(d / "t.jsonl", _rows(8, label=lambda i: 1.5)), ["--examples", "8"],
                                   ["label column 'label'", "1.5"]),
    "null label": lambda d: (_jsonl(d / "t.jsonl", _rows(8, label=lambda i: None if i == 5 else 1)), [],
                             ["t.jsonl", "row 6", "label"]),
    "null text": lambda d: (_jsonl(d / "t.jsonl", _rows(), {17: b'{"text": null, "label": 0}'}), [],
                            ["t.jsonl", "row 17", "text column 'text'"]),
    "numbers as text": lambda d: (_jsonl(d / "t.jsonl", [{"text": i, "label": 0} for i in range(8)]), [],
                                  ["t.jsonl", "text column 'text'", "row 1"]),
    "text missing from one row": lambda d: (_jsonl(d / "t.jsonl", _rows(), {9: b'{"label": 0}'}), [],
                                            ["t.jsonl", "row 9", "text column 'text'"]),
    "csv ragged row (extra field)": lambda d: (_csv(d / "t.csv", CSV_OK.replace("good dog 4,1\n", "good dog 4,1,x\n")),
                                               [], ["t.csv", "line 6", "3 fields", "2"]),
    "csv ragged row (missing field)": lambda d: (_csv(d / "t.csv", CSV_OK.replace("good dog 4,1\n", "good dog 4\n")),
                                                 [], ["t.csv", "line 6", "1 field", "2"]),
    "string labels outside --label-names": lambda d: (
        _jsonl(d / "t.jsonl", _rows(8, label=lambda i: ["neg", "pos", "meh"][i % 3])),
        ["--label-names", "neg,pos,neu", "--examples", "8"], ["'meh'", "label_names"]),
    "--label-names repeated": lambda d: (_jsonl(d / "t.jsonl", _rows()), ["--label-names", "a,b,a"],
                                         ["--label-names", "'a'", "more than once"]),
    "--label-names with an empty name": lambda d: (_jsonl(d / "t.jsonl", _rows()), ["--label-names", "a,,b"],
                                                   ["--label-names", "empty name"]),
    "--label-names without labels": lambda d: (_jsonl(d / "t.jsonl", _rows()),
                                               ["--label-names", "a,b", "--label-column", ""],
                                               ["--label-names", "--label-column is empty"]),
    "more --label-names than the head has": lambda d: (
        _jsonl(d / "t.jsonl", _rows(8, label=lambda i: "d")), ["--label-names", "a,b,c,d", "--examples", "8"],
        ["label_names name 4 classes", "head has 3"]),
    "directory without split files": lambda d: (_csv(d / "data" / "notes.md", "hello").parent, [],
                                                ["data", "no data files", "notes.md"]),
    "empty directory": lambda d: ((d / "data").mkdir() or d / "data", [], ["data", "no data files"]),
    "directory lacking the split": lambda d: (_jsonl(d / "data" / "train.jsonl", _rows()).parent, ["--split", "validation"],
                                              ["data", "no split 'validation'", "train"]),
    "split file that is a directory": lambda d: ((d / "train.jsonl").mkdir() or d / "train.jsonl", [],
                                                 ["train.jsonl", "is a directory"]),
    "data file a symlink loop": lambda d: (_link(d / "t.jsonl", "t.jsonl"), [], ["t.jsonl", "does not exist"]),
    "data file a dangling link": lambda d: (_link(d / "t.jsonl", "gone.jsonl"), [], ["t.jsonl", "does not exist"]),
    "data file a fifo": lambda d: (os.mkfifo(d / "t.jsonl") or d / "t.jsonl", [], ["t.jsonl", "not a regular file"]),
    "unknown extension": lambda d: (_csv(d / "t.txt", "good dog\n"), [], ["t.txt", "extension '.txt'"]),
    "not a parquet file": lambda d: (_csv(d / "t.parquet", "not parquet"), [], ["t.parquet", "parquet"]),
    "missing file": lambda d: (d / "nothing.jsonl", [], ["nothing.jsonl", "does not exist"]),
}


@pytest.mark.parametrize("name", list(DATA))
def test_data_bad_task_data_is_refused(tmp_path, clf, name):
    model_dir, _, _ = clf
    project = tmp_path / "p"
    project.mkdir()
    data, extra, mentions = DATA[name](project)
    refused(fisher_cmd(model_dir, data, None, tmp_path / "store", *extra), project, *mentions,
            watch=(project, model_dir))


@pytest.mark.parametrize("examples, seed", [(2, 0), (2, 1), (2, 5), (20, 0)])
def test_data_a_non_utf8_row_is_refused_whichever_rows_are_drawn(tmp_path, clf, examples, seed):
    model_dir, _, _ = clf
    data = _jsonl(tmp_path / "t.jsonl", _rows(), {14: LATIN})
    refused(fisher_cmd(model_dir, data, None, tmp_path / "store", "--examples", examples, "--seed", seed),
            tmp_path, str(data), "line 14", "UTF-8", watch=(data,))


@pytest.mark.parametrize("examples, seed", [(2, 0), (2, 3), (20, 0)])
def test_data_a_null_text_is_refused_whichever_rows_are_drawn(tmp_path, clf, examples, seed):
    model_dir, _, _ = clf
    data = _jsonl(tmp_path / "t.jsonl", _rows(), {11: b'{"text": null, "label": 0}'})
    refused(fisher_cmd(model_dir, data, None, tmp_path / "store", "--examples", examples, "--seed", seed),
            tmp_path, str(data), "row 11", watch=(data,))


def _recipe_with_split(project: Path, model_dir: Path, split_file: str) -> Path:
    (project / "recipe.yaml").write_text(
        f"base: {model_dir}\nstore: store\nmodels:\n  a: {{path: {model_dir}, data: t}}\n"
        f"data:\n  t: {{splits: {{train: {split_file}}}}}\nsteps:\n  f: {{kind: fisher, examples: 4, batch_size: 4}}\n")
    return project / "recipe.yaml"


@pytest.mark.parametrize("setup, mentions", [
    pytest.param(lambda d: (d / "train.jsonl").mkdir(), ["train.jsonl", "is a directory"], id="a directory"),
    pytest.param(lambda d: _link(d / "train.jsonl", "train.jsonl"), ["train.jsonl", "does not exist"], id="a loop"),
    pytest.param(lambda d: _jsonl(d / "train.jsonl", _rows(), {2: LATIN}), ["train.jsonl", "line 2"], id="not UTF-8"),
    pytest.param(lambda d: _csv(d / "train.jsonl", ""), ["train.jsonl", "has no rows"], id="empty"),
])
def test_data_a_recipes_split_file_that_cannot_be_read(tmp_path, clf, setup, mentions):
    model_dir, _, _ = clf
    project = tmp_path / "p"
    project.mkdir()
    setup(project)
    recipe = _recipe_with_split(project, model_dir, "train.jsonl")
    refused(["run", recipe], project, *mentions, watch=(project / "train.jsonl", model_dir))


@pytest.mark.parametrize("setup", [
    pytest.param(lambda d: _link(d / "loop", "loop"), id="a self loop"),
    pytest.param(lambda d: _link(d / "sub" / "up", ".."), id="a link to its parent"),
    pytest.param(lambda d: _link(d / "a", "b") and _link(d / "b", "a"), id="a two-link loop"),
])
def test_data_symlink_loops_in_a_data_directory_are_harmless(tmp_path, clf, setup):
    model_dir, _, _ = clf
    data = tmp_path / "data"
    _jsonl(data / "train.jsonl", _rows())
    setup(data)
    succeeded(fisher_cmd(model_dir, data, None, tmp_path / "store"), tmp_path, watch=(data, model_dir))


def test_data_label_names_map_string_labels_to_head_indices(tmp_path, clf):
    """--label-names in an unsorted order: the empirical Fisher (which reads the labels) equals the
    one of integer labels mapped the same way; without --label-names the strings are refused (the
    model's id2label has only transformers' default names), never mapped in sorted order."""
    from safetensors.torch import load_file

    model_dir, _, _ = clf
    names = ["pos", "neg", "neu"]
    rows = _rows(12)
    strings = _jsonl(tmp_path / "s.jsonl", [{"text": r["text"], "label": names[r["label"]]} for r in rows])
    order = ["neu", "neg", "pos"]  # head order: neu=0, neg=1, pos=2
    ints = _jsonl(tmp_path / "i.jsonl", [{"text": r["text"], "label": order.index(names[r["label"]])} for r in rows])
    common = ["--estimator", "empirical", "--examples", "12"]
    succeeded(fisher_cmd(model_dir, strings, tmp_path / "s.safetensors", tmp_path / "store", *common,
                         "--label-names", ",".join(order)), tmp_path, watch=(strings,))
    succeeded(fisher_cmd(model_dir, ints, tmp_path / "i.safetensors", tmp_path / "store", *common), tmp_path)
    refused(fisher_cmd(model_dir, strings, tmp_path / "d.safetensors", tmp_path / "store", *common), tmp_path,
            f"row 1 of label column 'label' holds {names[rows[0]['label']]!r}", "LABEL_0..",
            "--label-names", watch=(strings,))
    got, want = load_file(tmp_path / "s.safetensors"), load_file(tmp_path / "i.safetensors")
    assert all(float((got[n] - want[n]).abs().max()) <= 1e-6 * float(want[n].abs().max()) + 1e-12 for n in want)
