"""Start fast (issue 14): `fmerge status`, `validate`, `ls` and a cached no-op `fmerge run` import
neither transformers nor datasets (nor zarr, nor matplotlib, nor a torch submodule that `import
torch` does not load), read no tensor, hash no model or data file (the store's caches answer), and a
no-op run rewrites no export and no results file.

Each command runs in a fresh `python -c` subprocess through `fmerge.cli.main`, which records
`sys.modules` at exit (atexit); with `no_read` the subprocess first makes every tensor read and
every content hash raise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _iterative_project import HEADER, build, run

# A tiny data-aware project: a Fisher, three merges (one exported, one swept) and an eval that
# writes results.{json,csv}, sweeps.json and a sweep plot.
STEPS = """  fisher_exact: {kind: fisher, estimator: exact, examples: 16, max_length: 16}
  avg: {kind: merge, method: simple_average, export: out/avg}
  ta: {kind: merge, method: task_arithmetic, params: {lambda: 0.3}}
  fisher: {kind: merge, method: fisher, fisher: fisher_exact}
  eval: {kind: eval, merges: [avg, ta, fisher], max_length: 16, limit: 16, output: results}
sweep:
  ta.params.lambda: [0.3, 0.6]
"""

PROBE = r"""
import atexit, json, sys

out_file, no_read, argv = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
atexit.register(lambda: open(out_file, "w").write(json.dumps(sorted(sys.modules))))
if no_read:
    import fmerge.fingerprint, fmerge.io, fmerge.store

    def refuse(what):
        def call(*args, **kwargs):
            raise RuntimeError(f"{what} was called")
        return call

    for owner, name in ((fmerge.io.ModelDir, "get"), (fmerge.store.Artifact, "get"),
                        (fmerge.io, "content_hash"), (fmerge.fingerprint, "hash_file")):
        assert hasattr(owner, name), f"the probe patches {owner}.{name}, which no longer exists"
        setattr(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}"))
sys.argv = ["fmerge", *argv]
from fmerge.cli import main

main()
"""

HEAVY = ("transformers", "datasets", "tokenizers", "matplotlib", "zarr")


def build_project(root: Path) -> Path:
    """The tiny project under root, not yet run; returns its recipe."""
    build(root)
    recipe = root / "recipe.yaml"
    recipe.write_text(HEADER + STEPS)
    return recipe


def files_under(*dirs: Path) -> dict[str, int]:
    """Every file under `dirs`, with its mtime (ns)."""
    return {str(p): p.stat().st_mtime_ns for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tiny project, run once (so every artifact is cached)."""
    recipe = build_project(tmp_path_factory.mktemp("start_fast"))
    _, states, _ = run(recipe)
    assert set(states.values()) == {"computed"}
    assert (recipe.parent / "results" / "sweep_ta.png").is_file()
    return recipe


@pytest.fixture(scope="module")
def torch_modules() -> set[str]:
    """What `import torch` alone loads."""
    proc = subprocess.run([sys.executable, "-c", "import json, sys, torch; print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, check=True)
    return set(json.loads(proc.stdout))


def probe(project: Path, *argv: str, no_read: bool = True) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `fmerge ARGV` in a fresh interpreter in the project; (process, modules loaded at exit)."""
    mods = project.parent / "modules.json"
    mods.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(mods), "1" if no_read else "0", *argv],
                          cwd=project.parent, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, f"fmerge {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, set(json.loads(mods.read_text()))


def assert_light(mods: set[str], torch_modules: set[str], what: str) -> None:
    heavy = [m for m in HEAVY if m in mods]
    assert not heavy, f"{what} imported {heavy}"
    extra = sorted(m for m in mods - torch_modules if m == "torch" or m.startswith("torch."))
    assert not extra, f"{what} imported torch modules that `import torch` does not: {extra}"


@pytest.mark.parametrize("argv", [["status", "recipe.yaml"], ["status", "recipe.yaml", "--json", "--check"],
                                  ["validate", "recipe.yaml"], ["ls", "--store", "store"]])
def test_planning_commands_import_no_heavy_library_and_read_no_tensor(project, torch_modules, argv):
    proc, mods = probe(project, *argv)
    assert_light(mods, torch_modules, f"fmerge {' '.join(argv)}")
    if argv[0] == "status":
        assert "stale" not in proc.stdout and "cached" in proc.stdout


def test_cached_run_is_light_and_touches_no_output(project, torch_modules):
    outputs = (project.parent / "out", project.parent / "results")
    before = files_under(*outputs)
    assert any(p.endswith("results.json") for p in before) and any(p.endswith(".png") for p in before)
    proc, mods = probe(project, "run", "recipe.yaml")
    assert "computed" not in proc.stdout + proc.stderr and "cached" in proc.stdout
    assert "up to date" in proc.stdout + proc.stderr  # the export was found current, not rewritten
    assert_light(mods, torch_modules, "a cached fmerge run")
    assert files_under(*outputs) == before, "a no-op run rewrote exports or results files"


def test_results_files_are_rewritten_when_their_content_changes(project):
    """The other half of write-only-if-changed: a results file that differs is replaced, and a
    missing sweep plot is drawn again."""
    from fmerge.export import OUTPUT_RECORD, _record

    results = project.parent / "results"
    (results / "results.json").write_text("[]")  # as if an earlier recipe's results, which fmerge wrote
    record = json.loads((results / OUTPUT_RECORD).read_text())
    record["files"]["results.json"] = [_record(results / "results.json")]
    (results / OUTPUT_RECORD).write_text(json.dumps(record))
    (results / "sweep_ta.png").unlink()
    probe(project, "run", "recipe.yaml", no_read=False)
    assert json.loads((results / "results.json").read_text()) != []
    assert (results / "sweep_ta.png").is_file()
