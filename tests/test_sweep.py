"""Sweeps: grid expansion, `--set`, cache reuse, selection on validation only, the plot."""

from __future__ import annotations

import json

import pytest

from conftest import ZOO_RECIPE, write_recipe
from fmerge import executor
from fmerge.errors import FmergeError
from fmerge.api import load_recipe, parse_recipe
from fmerge.graph import step_dependencies
from fmerge.runtime import Runtime
from fmerge.store import Store
from test_pipeline import RECIPE, project  # noqa: F401  (fixture)


def test_grid_expands_each_swept_step_into_its_variants(zoo, tmp_path):
    text = ZOO_RECIPE + """
sweep:
  ta.params.lambda: [0.1, 0.3, 0.5]
  ties.params.density: [0.2, 0.4]
  ties.params.lambda: [0.5, 1.0]
"""
    r = load_recipe(write_recipe(tmp_path, text))
    assert [v.name for v in r.sweeps["ta"]] == ["ta[lambda=0.1]", "ta[lambda=0.3]", "ta[lambda=0.5]"]
    assert [r.steps[v.name].params["lambda"] for v in r.sweeps["ta"]] == [0.1, 0.3, 0.5]
    ties = {(r.steps[v.name].params["density"], r.steps[v.name].params["lambda"]) for v in r.sweeps["ties"]}
    assert ties == {(0.2, 0.5), (0.2, 1.0), (0.4, 0.5), (0.4, 1.0)}
    assert "ta" not in r.steps and "avg" in r.steps
    assert r.step_names("ta") == [v.name for v in r.sweeps["ta"]]


def test_set_overrides_and_sweeps_from_the_command_line(zoo, tmp_path):
    path = write_recipe(tmp_path, ZOO_RECIPE)
    r = load_recipe(path, ["ties.params.density=0.7", "ta.params.lambda=0.2,0.4", "avg.models=[a, b]"])
    assert r.steps["ties"].params["density"] == 0.7
    assert r.steps["avg"].models == ["a", "b"]
    assert [r.steps[v.name].params["lambda"] for v in r.sweeps["ta"]] == [0.2, 0.4]
    # per-model λ lists are values too
    r = load_recipe(path, ["ta.params.lambda=[0.1, 0.2, 0.3],[1, 1, 1]"])
    assert [r.steps[v.name].params["lambda"] for v in r.sweeps["ta"]] == [[0.1, 0.2, 0.3], [1, 1, 1]]


@pytest.mark.parametrize("sweep, message", [
    ("  nope.params.lambda: [0.1]", "names no step 'nope'"),
    ("  ta.params.lambda: []", "non-empty list"),
    ("  ties.params.density: [0.5, 1.5]", "density"),
    ("  ta: [1, 2]", "must name a parameter"),
])
def test_bad_sweeps_name_the_recipe_key(zoo, tmp_path, sweep, message):
    path = write_recipe(tmp_path, ZOO_RECIPE + "sweep:\n" + sweep + "\n")
    with pytest.raises(FmergeError, match=message) as exc:
        load_recipe(path)
    assert "recipe.yaml" in str(exc.value)


def test_bad_set_is_a_clear_error(zoo, tmp_path):
    path = write_recipe(tmp_path, ZOO_RECIPE)
    with pytest.raises(FmergeError, match="STEP.PARAM=VALUE"):
        load_recipe(path, ["lambda=0.3"])
    with pytest.raises(FmergeError, match="did you mean 'ties'"):
        load_recipe(path, ["tie.params.density=0.3"])


def test_a_step_reading_a_swept_step_is_expanded_with_it(project):  # noqa: F811
    text = RECIPE.replace("LAMBDA", "1.0") + "sweep:\n  fisher_exact.estimator: [exact, empirical]\n"
    r = parse_recipe(text, project)
    assert [v.name for v in r.sweeps["fisher_exact"]] == ["fisher_exact[estimator=exact]",
                                                          "fisher_exact[estimator=empirical]"]
    merges = r.sweeps["fisher"]
    assert [r.steps[v.name].fisher for v in merges] == [v.name for v in r.sweeps["fisher_exact"]]
    # the eval step keeps naming the group and depends on every variant
    assert set(step_dependencies(r, "eval")) >= {v.name for v in merges}


def run(recipe_path, sets=None):
    r = load_recipe(recipe_path, sets)
    rt = Runtime(r, Store(r.resolve(r.spec.store)))
    return rt, {rep.step: rep.state for rep in executor.run(rt)}


def test_lambda_sweep_reuses_the_fisher_and_chooses_on_validation_only(project):  # noqa: F811
    from fmerge.sweep import overrides_suffix

    lambdas = "[0.2, 1.0],[1.0, 1.0],[1.0, 0.2],[1.0, 5.0],[5.0, 1.0]"
    rt, states = run(project, [f"fisher.params.lambda={lambdas}"])
    # a --set run writes its results beside the recipe's own `output` (README: Exports)
    out = project.parent / ("results" + overrides_suffix([f"fisher.params.lambda={lambdas}"]))
    assert out.name == "results@fisher.params.lambda=[0.2,1.0],[1.0,1.0],[1.0,0.2],[1.0,5.0],[5.0,1.0]"
    assert not (project.parent / "results").exists()
    variants = [v.name for v in rt.recipe.sweeps["fisher"]]
    assert len(variants) == 5 and all(states[v] == "computed" for v in variants)
    fishers = [i for i in rt.store.list() if i.kind == "fisher"]
    assert len(fishers) == 2  # one per model, shared by the five merges

    planned = rt.planned["eval"]
    select = [p for p in planned if p.extra["role"] == "select"]
    assert {p.params["split"] for p in select} == {"validation"}
    # the winner is the best validation average, read from the stored validation results alone
    avg = {v: sum(rt.store.open(p.key).meta["accuracy"] for p in select if p.extra["variant"] == v) / 2 for v in variants}
    winner = max(variants, key=lambda v: avg[v])
    results = json.loads((out / "results.json").read_text())
    reported = {r["variant"] for r in results}
    assert winner in reported and not (set(variants) - {winner}) & reported
    assert all(r["split"] == "test" for r in results)
    assert {r["selected_on"] for r in results if r["variant"] == winner} == {"validation"}
    # no test-split evaluation of a losing variant was ever computed
    test_evals = {(i.attrs["meta"]["variant"], i.attrs["meta"]["split"]) for i in rt.store.list() if i.kind == "eval"}
    assert not {(v, "test") for v in variants if v != winner} & test_evals

    assert (out / "sweep_fisher.png").stat().st_size > 1000
    sweeps = json.loads((out / "sweeps.json").read_text())
    assert sweeps[0]["chosen"] == winner and sweeps[0]["split"] == "validation"

    # a second run computes nothing
    _, states = run(project, [f"fisher.params.lambda={lambdas}"])
    assert set(states.values()) == {"cached"}

    # renaming the swept step reuses every artifact, and the report uses the new names
    text = project.read_text().replace("  fisher: {kind: merge", "  fisher_tuned: {kind: merge")
    project.write_text(text.replace("merges: [avg, fisher]", "merges: [avg, fisher_tuned]"))
    _, states = run(project, [f"fisher_tuned.params.lambda={lambdas}"])
    assert set(states.values()) == {"cached"}
    results = json.loads((out.parent / ("results" + overrides_suffix([f"fisher_tuned.params.lambda={lambdas}"]))
                          / "results.json").read_text())
    assert "fisher_tuned" + winner.removeprefix("fisher") in {r["variant"] for r in results}


def test_asking_for_more_rows_than_a_split_has_warns_and_uses_all(project, capsys):  # noqa: F811
    from rich.console import Console

    from fmerge.tasks import load_subset

    r = load_recipe(project)
    rt = Runtime(r, Store(r.resolve(r.spec.store)), Console(stderr=True, width=200))
    sub = load_subset(rt, "animal", "validation", 1000, 0)
    assert len(sub.rows) == 24
    assert "1000 examples asked of data 'animal' (split 'validation'), which has 24 rows" in capsys.readouterr().err


def test_set_changes_only_the_step_it_names_when_steps_share_settings_through_yaml_aliases(zoo, tmp_path):
    text = """
base: zoo/base
models: {a: zoo/task0, b: zoo/task1}
store: store
steps:
  ta1: &step {kind: merge, method: task_arithmetic, params: &p {lambda: 0.3}}
  ta2: {kind: merge, method: task_arithmetic, params: *p}
  ta3: *step
"""
    path = write_recipe(tmp_path, text)
    r = load_recipe(path, ["ta1.params.lambda=0.9"])
    assert [r.steps[s].params["lambda"] for s in ("ta1", "ta2", "ta3")] == [0.9, 0.3, 0.3]
    r = load_recipe(path, ["ta3.params.lambda=0.7"])
    assert [r.steps[s].params["lambda"] for s in ("ta1", "ta2", "ta3")] == [0.3, 0.3, 0.7]
    r = load_recipe(path, ["ta2.params.lambda=0.2,0.4"])  # a sweep of one of them, likewise
    assert [r.steps[s].params["lambda"] for s in ("ta1", "ta3")] == [0.3, 0.3]
    assert [r.steps[v.name].params["lambda"] for v in r.sweeps["ta2"]] == [0.2, 0.4]
