"""The recipe in git is the truth (issue 26): what lies under a recipe's export and output paths is
exactly what the committed recipe and the input bytes produce, and `fmerge status --check` exits 1
exactly when the next `fmerge run` would compute, write or restore anything.

* A run with `--set` (an override or a sweep) writes its exports and results beside the declared
  paths (`out/ta@ta.params.lambda=0.1`), never into them.
* `status --check` sees a deleted export, an export file edited in place with its mtime given back
  (`touch -r`), an edit made while the export is built, and a deleted or edited results file.
* Results files are fmerge's by a record: a user's file of that name is never overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _iterative_project import HEADER, build
from fmerge import api, export
from fmerge.errors import FmergeError
from fmerge.export import MARKER, OUTPUT_RECORD, read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = """  ta: {kind: merge, method: task_arithmetic, params: {lambda: 0.3}, export: out/ta}
  eval: {kind: eval, merges: [ta], individual: false, base: false, max_length: 16, limit: 8, output: results}
"""


def files_under(*dirs: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `dirs` (hidden records included): its mtime and bytes."""
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("truth_models"))


@pytest.fixture
def project(built, tmp_path) -> Path:
    """A fresh project (recipe, its own store) over the module's models and data; not yet run."""
    for name in ("base", "models", "data"):
        (tmp_path / name).symlink_to(built / name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(HEADER + STEPS)
    return recipe


def status_check(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmerge", "status", str(recipe), "--check", "--json", *extra],
                          cwd=recipe.parent, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


def fmerge_run(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmerge", "run", str(recipe), *extra], cwd=recipe.parent,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


def stale(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """{step: note} of the stale steps a `status --check --json` printed."""
    return {s["step"]: s["note"] for s in json.loads(proc.stdout) if s["state"] == "stale"}


def test_a_run_with_set_writes_beside_the_declared_export_and_results(project):
    root = project.parent
    api.run(project)
    declared = files_under(root / "out" / "ta", root / "results")
    assert any(p.endswith("model.safetensors") for p in declared) and any(p.endswith("results.csv") for p in declared)
    ta_key = read_manifest(root / "out" / "ta")["key"]

    varied = api.run(project, sets=["ta.params.lambda=0.1"])
    assert files_under(root / "out" / "ta", root / "results") == declared, "a --set run wrote into the declared paths"
    beside = root / "out" / "ta@ta.params.lambda=0.1"
    other_key = read_manifest(beside)["key"]
    assert other_key != ta_key and other_key == api.status(project, sets=["ta.params.lambda=0.1"]).steps[0].keys[0]
    rows = json.loads((root / "results@ta.params.lambda=0.1" / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["ta"] * 3 and varied.rows() == rows
    assert "--set ta.params.lambda=0.1" in (beside / "README.md").read_text()  # the card says how it was made

    # a sweep from the command line: the variants go beside the declared export too
    api.run(project, sets=["ta.params.lambda=0.1,0.5"])
    assert files_under(root / "out" / "ta", root / "results") == declared
    chosen = json.loads((root / "results@ta.params.lambda=0.1,0.5" / "sweeps.json").read_text())[0]["chosen"]
    assert read_manifest(root / "out" / "ta@ta.params.lambda=0.1,0.5")["step"] == chosen  # the variant eval chose
    assert (root / "results@ta.params.lambda=0.1,0.5" / "sweeps.json").is_file()

    check = status_check(project)
    assert check.returncode == 0, check.stdout + check.stderr  # the declared paths are the recipe's, as written
    assert status_check(project, "--set", "ta.params.lambda=0.1").returncode == 0


def test_an_export_path_given_by_set_itself_is_used_as_given(project):
    root = project.parent
    api.run(project, sets=["ta.params.lambda=0.1", "ta.export=elsewhere/ta"])
    assert read_manifest(root / "elsewhere" / "ta")["key"]
    assert not (root / "out").exists() and not (root / "results").exists()
    assert len(list(root.glob("results@set-*"))) == 1  # '/' is no part of a name: the suffix is a digest


def test_status_check_sees_deleted_and_edited_exports_and_results(project):
    root = project.parent
    assert status_check(project).returncode == 1
    api.run(project)
    assert status_check(project).returncode == 0
    weights = root / "out" / "ta" / "model.safetensors"

    # a deleted export: stale, and the run restores it
    export_files = files_under(root / "out")
    for path in sorted((root / "out" / "ta").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (root / "out" / "ta").rmdir()
    check = status_check(project)
    assert check.returncode == 1 and "out/ta is missing" in stale(check)["ta"], check.stdout
    assert fmerge_run(project).returncode == 0
    assert status_check(project).returncode == 0
    assert {p: b for p, (_, b) in files_under(root / "out").items() if not p.endswith(MARKER)} == \
        {p: b for p, (_, b) in export_files.items() if not p.endswith(MARKER)}

    # a deleted results file: stale, and the run writes it again
    (root / "results" / "results.csv").unlink()
    check = status_check(project)
    assert check.returncode == 1 and "results.csv is missing" in stale(check)["eval"], check.stdout
    assert fmerge_run(project).returncode == 0 and (root / "results" / "results.csv").is_file()
    assert status_check(project).returncode == 0

    # an exported weight file edited in place, its mtime given back (touch -r): the store's
    # artifact (the same file) and the export both report it; the run refuses the edited file
    st = weights.stat()
    with open(weights, "r+b") as fh:
        fh.seek(st.st_size - 4)
        last = fh.read(4)
        fh.seek(st.st_size - 4)
        fh.write(bytes(b ^ 0xFF for b in last))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_size == st.st_size
    check = status_check(project)
    assert check.returncode == 1 and "ta" in stale(check), check.stdout
    refused = fmerge_run(project)
    assert refused.returncode == 2 and "model.safetensors" in refused.stderr and "changed since fmerge wrote" \
        in refused.stderr, refused.stderr
    assert status_check(project).returncode == 1  # still not what the recipe makes
    weights.unlink()  # the user takes their edit away: the run restores the export
    assert fmerge_run(project).returncode == 0
    assert status_check(project).returncode == 0

    # an edited model card, its mtime given back
    card = root / "out" / "ta" / "README.md"
    st = card.stat()
    card.write_text(card.read_text().replace("fmerge", "fmergE", 1))
    os.utime(card, ns=(st.st_atime_ns, st.st_mtime_ns))
    check = status_check(project)
    assert check.returncode == 1 and "README.md is changed" in stale(check)["ta"], check.stdout


def test_an_edit_made_while_the_export_is_built_is_never_trusted(project, monkeypatch):
    """The store's weight file is edited (its mtime given back) right after the export linked it:
    the export refuses to publish, and status goes on saying stale until a run has put it right."""
    root = project.parent
    link = export.place_file

    def link_then_edit(src: Path, dst: Path) -> str:
        how = link(src, dst)
        st = os.stat(dst)
        with open(dst, "r+b") as fh:
            fh.seek(st.st_size - 1)
            byte = fh.read(1)
            fh.seek(st.st_size - 1)
            fh.write(bytes([byte[0] ^ 1]))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        return how

    monkeypatch.setattr(export, "place_file", link_then_edit)
    with pytest.raises(FmergeError, match="changed while it was exported"):
        api.run(project)
    monkeypatch.undo()
    assert not (root / "out" / "ta").exists()
    assert status_check(project).returncode == 1
    assert fmerge_run(project).returncode == 0  # the artifact is found bad, recomputed and exported
    assert status_check(project).returncode == 0


def test_results_files_are_fmerges_by_a_record_and_a_users_file_is_never_overwritten(project):
    root = project.parent
    results = root / "results"
    results.mkdir()
    (results / "results.csv").write_text("my own table\n")
    with pytest.raises(FmergeError) as exc:
        api.run(project)
    msg = str(exc.value)
    assert "steps.eval.output" in msg and f"{results / 'results.csv'}" in msg and "not written by fmerge" in msg
    assert (results / "results.csv").read_text() == "my own table\n"
    (results / "results.csv").unlink()
    api.run(project)
    record = json.loads((results / OUTPUT_RECORD).read_text())
    assert set(record["files"]) == {"results.json", "results.csv"}

    # fmerge's own file, edited since: the user's now, refused by name and reported stale
    (results / "results.json").write_text("[]\n")
    check = status_check(project)
    assert check.returncode == 1 and "results.json" in stale(check)["eval"]
    refused = fmerge_run(project)
    assert refused.returncode == 2 and "results.json" in refused.stderr and "never overwrites" in refused.stderr
    assert (results / "results.json").read_text() == "[]\n"


def test_results_an_fmerge_before_records_wrote_are_adopted_not_refused(project):
    """A results directory without a record whose files hold exactly what the run writes (an older
    fmerge wrote them): adopted, left as they are, and its plots drawn again; status says so first."""
    sets = ["ta.params.lambda=0.1,0.5"]
    api.run(project, sets=sets)
    out = project.parent / "results@ta.params.lambda=0.1,0.5"
    (out / OUTPUT_RECORD).unlink()
    written = {n: (out / n).stat().st_mtime_ns for n in ("results.json", "results.csv", "sweeps.json")}
    assert status_check(project, "--set", sets[0]).returncode == 1
    api.run(project, sets=sets)
    assert {n: (out / n).stat().st_mtime_ns for n in written} == written
    assert set(json.loads((out / OUTPUT_RECORD).read_text())["files"]) == {*written, "sweep_ta.png"}
    assert status_check(project, "--set", sets[0]).returncode == 0


def test_status_check_sees_a_deleted_or_edited_fisher_export(project):
    project.write_text(HEADER + "  fisher_exact: {kind: fisher, estimator: exact, examples: 8, max_length: 16, "
                                "export: out/fisher}\n")
    api.run(project)
    assert status_check(project).returncode == 0
    file = project.parent / "out" / "fisher" / "animal.safetensors"
    data = file.read_bytes()
    file.unlink()
    check = status_check(project)
    assert check.returncode == 1 and "animal.safetensors is missing" in stale(check)["fisher_exact"], check.stdout
    api.run(project)
    assert file.read_bytes() == data and status_check(project).returncode == 0
    st = file.stat()
    with open(file, "r+b") as fh:
        fh.seek(st.st_size - 1)
        fh.write(bytes([data[-1] ^ 1]))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    check = status_check(project)
    assert check.returncode == 1 and "animal.safetensors is changed" in stale(check)["fisher_exact"], check.stdout
