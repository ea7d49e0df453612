"""Tell Make the truth (issue 14): the README's Makefile, taken from the README itself, runs a tiny
recipe once; a second `make` does nothing and `make -q` exits 0; a recipe edit that changes no
artifact runs nothing, one that changes results reruns fmerge and the target downstream of them.
`fmerge status --check` exits 1 when a step would run, 0 when all are cached, table or JSON
printed either way."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ZOO_RECIPE, write_recipe
from fmerge.export import MARKER
from test_start_fast import build_project, files_under

ROOT = Path(__file__).resolve().parents[1]
FMERGE = Path(sys.executable).parent / "fmerge"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def readme_makefile() -> str:
    """The Makefile between the README's makefile-pattern markers."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- makefile-pattern:start -->\s*```make\n(.*?)```\s*<!-- makefile-pattern:end -->", text, re.S)
    assert block, "README.md lost its makefile-pattern block"
    makefile = block.group(1)
    assert "\n\t" in makefile, "the README's Makefile recipes must be indented with tabs"
    return makefile


def make(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", f"FMERGE={FMERGE}", *args], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def fmerge(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(FMERGE), *args], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"})


def test_readme_makefile_runs_once_then_does_nothing(tmp_path):
    assert FMERGE.is_file(), f"{FMERGE} is not installed (pip install -e .)"
    recipe = build_project(tmp_path)
    project = recipe.parent
    (project / "Makefile").write_text(readme_makefile())

    first = make(project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{FMERGE} run recipe.yaml" in first.stdout and (project / "paper" / "results.csv").is_file()
    outputs = (project / "results", project / "out", project / "paper")
    before = files_under(*outputs)

    second = make(project)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "fmerge" not in second.stdout and "Nothing to be done" in second.stdout, second.stdout
    assert make(project, "-q").returncode == 0
    assert files_under(*outputs) == before

    # an edit that changes no artifact (a comment, a newer mtime): Make still has nothing to do
    recipe.write_text(recipe.read_text() + "# a comment\n")
    assert make(project, "-q").returncode == 0

    # an edit that changes the results: fmerge runs, and the downstream copy is remade
    recipe.write_text(recipe.read_text().replace("limit: 16", "limit: 12"))
    assert make(project, "-q").returncode == 1
    third = make(project)
    assert third.returncode == 0 and f"{FMERGE} run recipe.yaml" in third.stdout, third.stdout + third.stderr
    assert (project / "paper" / "results.csv").stat().st_mtime_ns > before[str(project / "paper" / "results.csv")]
    assert {r["n"] for r in json.loads((project / "results" / "results.json").read_text())} == {12}
    assert make(project, "-q").returncode == 0


def test_readme_makefile_restores_a_deleted_export_or_results_file_and_stops_at_an_edited_one(tmp_path):
    """Issue 26: `status --check` tells Make the truth about exports and results files too."""
    recipe = build_project(tmp_path)
    project = recipe.parent
    (project / "Makefile").write_text(readme_makefile())
    assert make(project).returncode == 0
    assert "Nothing to be done" in make(project).stdout
    export = project / "out" / "avg"

    def contents() -> dict[Path, bytes]:  # the record aside, which holds stamps
        return {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file() and p.name != MARKER}

    exported = contents()

    # a deleted export: Make runs fmerge, which restores it, and then has nothing to do
    shutil.rmtree(export)
    assert make(project, "-q").returncode == 1
    again = make(project)
    assert again.returncode == 0 and f"{FMERGE} run recipe.yaml" in again.stdout, again.stdout + again.stderr
    assert contents() == exported
    assert make(project, "-q").returncode == 0

    # a deleted results file (not itself a target of the Makefile): restored the same way
    (project / "results" / "results.json").unlink()
    assert make(project, "-q").returncode == 1
    assert make(project).returncode == 0 and (project / "results" / "results.json").is_file()
    assert make(project, "-q").returncode == 0

    # an exported file edited in place, its mtime given back: Make runs fmerge, which stops, naming
    # the file (it is the user's now); moved away, the next make restores the export
    card = export / "README.md"
    st = card.stat()
    card.write_text(card.read_text() + "my note\n")
    os.utime(card, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert make(project, "-q").returncode == 1
    stopped = make(project)
    assert stopped.returncode != 0 and "README.md" in stopped.stderr and "changed since fmerge wrote" in stopped.stderr
    card.rename(project / "my-card.md")
    assert make(project).returncode == 0 and card.read_bytes() == exported[Path("README.md")]
    assert make(project, "-q").returncode == 0


def test_status_check_exit_status_with_table_and_json(tmp_path, zoo):
    project = tmp_path
    write_recipe(project, ZOO_RECIPE)
    stale = fmerge(project, "status", "recipe.yaml", "--check")
    assert stale.returncode == 1 and "stale" in stale.stdout  # the table is printed either way
    stale_json = fmerge(project, "status", "recipe.yaml", "--check", "--json")
    assert stale_json.returncode == 1 and {s["state"] for s in json.loads(stale_json.stdout)} == {"stale"}
    assert fmerge(project, "run", "recipe.yaml").returncode == 0
    cached = fmerge(project, "status", "recipe.yaml", "--check")
    assert cached.returncode == 0 and "cached" in cached.stdout and "stale" not in cached.stdout
    cached_json = fmerge(project, "status", "recipe.yaml", "--check", "--json")
    assert cached_json.returncode == 0 and {s["state"] for s in json.loads(cached_json.stdout)} == {"cached"}
    changed = fmerge(project, "status", "recipe.yaml", "--check", "--json", "--set", "ta.params.lambda=0.5")
    assert changed.returncode == 1
    states = {s["step"]: (s["state"], s["note"]) for s in json.loads(changed.stdout)}
    assert states["avg"] == ("cached", "") and states["ta"][0] == "stale"
    # the merge is cached, but a run with --set exports beside the declared path (README: Exports)
    assert states["ties"][0] == "stale" and states["ties"][1].endswith("out/ties@ta.params.lambda=0.5 is missing")
