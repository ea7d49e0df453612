"""Planning is pure (validate, status and --dry-run load no dataset and build no model), and cache
keys come from content: renaming a data entry or moving the data directory reuses every artifact."""

from __future__ import annotations

import shutil

import pytest

import _iterative_project as proj
from conftest import fmerge_cli
from fmerge import executor
from fmerge.api import load_recipe
from fmerge.runtime import Runtime
from fmerge.store import Store

RECIPE = proj.HEADER + """
  fisher:
    kind: fisher
    examples: 16
  avg:
    kind: merge
    method: simple_average
  fm:
    kind: merge
    method: fisher
    fisher: fisher
  ta:
    kind: merge
    method: task_arithmetic
  ada:
    kind: adamerging
    steps: 2
    examples: 8
  ev:
    kind: eval
    merges: [avg, fm, ta, ada]
    limit: 8
sweep:
  ta.params.lambda: [0.2, 0.4]
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = proj.build(tmp_path_factory.mktemp("purity"))
    (root / "recipe.yaml").write_text(RECIPE)
    proj.run(root / "recipe.yaml")  # everything computed once
    return root


def forbid_loading(monkeypatch):
    """Make every way of reading a dataset or building a model raise."""
    import datasets
    import transformers

    def refuse(*_, **__):
        raise AssertionError("planning loaded data or built a model")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr("fmerge.data.load_dataset_split", refuse)
    monkeypatch.setattr("fmerge.tasks.load_dataset_split", refuse, raising=False)
    monkeypatch.setattr("fmerge.tasks.load_subset", refuse)
    monkeypatch.setattr("fmerge.tasks.build_task_model", refuse)
    for name in ("AutoModelForSequenceClassification", "AutoTokenizer", "AutoConfig"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
        monkeypatch.setattr(getattr(transformers, name), "from_config", refuse, raising=False)


def runtime(recipe_file):
    r = load_recipe(recipe_file)
    return Runtime(r, Store(r.resolve(r.spec.store)))


def test_status_and_dry_run_load_no_data_and_build_no_model(project, monkeypatch):
    forbid_loading(monkeypatch)
    reports = executor.status(runtime(project / "recipe.yaml"))
    assert {r.state for r in reports} == {"cached"}
    reports = executor.run(runtime(project / "recipe.yaml"), dry_run=True)
    assert {r.state for r in reports} == {"cached"}


def test_validate_and_status_through_the_cli(project):
    assert fmerge_cli("validate", project / "recipe.yaml").returncode == 0
    proc = fmerge_cli("status", project / "recipe.yaml", "--json")
    assert '"stale"' not in proc.stdout and '"cached"' in proc.stdout


def test_a_stale_plan_still_loads_nothing(project, monkeypatch):
    """A step whose key changed is planned (stale) without reading the data it will need."""
    text = (project / "recipe.yaml").read_text().replace("examples: 16", "examples: 17")
    (project / "changed.yaml").write_text(text)
    forbid_loading(monkeypatch)
    states = {r.step: r.state for r in executor.status(runtime(project / "changed.yaml"))}
    assert states["fisher"] == "stale" and states["fm"] == "stale" and states["avg"] == "cached"


def test_renamed_data_entries_and_a_moved_data_directory_reuse_every_artifact(project):
    shutil.copytree(project / "data", project / "moved" / "elsewhere")
    text = (project / "recipe.yaml").read_text()
    for name in proj.TASKS:
        text = text.replace(f"  {name}: {{path: data/{name}}}", f"  task_{name}: {{path: moved/elsewhere/{name}}}")
        text = text.replace(f"data: {name}}}", f"data: task_{name}}}")
    assert "data/" not in text.split("models:")[0].replace("moved/elsewhere", "")
    (project / "renamed.yaml").write_text(text)
    states = {r.state for r in executor.run(runtime(project / "renamed.yaml"))}
    assert states == {"cached"}


def test_changed_data_bytes_change_the_keys(project):
    shutil.copytree(project / "data", project / "edited")
    first = next((project / "edited" / "sentiment").iterdir())
    first.write_text(first.read_text() + first.read_text().splitlines()[0] + "\n")
    text = (project / "recipe.yaml").read_text().replace("{path: data/sentiment}", "{path: edited/sentiment}")
    (project / "edited.yaml").write_text(text)
    states = {r.step: r.state for r in executor.status(runtime(project / "edited.yaml"))}
    assert states["fisher"] == "stale" and states["ev"] == "stale" and states["avg"] == "cached"
