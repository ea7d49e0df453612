"""One artifact, one computation: steps, rows and sweep points that ask for the same key share it.

Two identical merges, one merge scored twice, two identical Fisher steps, a sweep point equal to
another step: the executor computes each key once per run (forced or not), never locks a key
twice, and every step still reports its own rows from the shared result."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest

from fmerge import executor
from fmerge.api import load_recipe
from fmerge.runtime import Runtime
from fmerge.steps import step_kinds
from fmerge.store import Store
from test_pipeline import finetune_steps, two_task_project, two_task_recipe

MERGES = """\
  ta1: {kind: merge, method: task_arithmetic, params: {lambda: 0.5}}
  ta2: {kind: merge, method: task_arithmetic, params: {lambda: 0.5}}
"""


@pytest.fixture
def project(tmp_path):
    two_task_project(tmp_path)
    return tmp_path


def write(project, steps: str, tail: str = ""):
    text = two_task_recipe("from_step: ft_{}", finetune_steps("steps: 2, batch_size: 8, max_length: 16") + steps)
    path = project / "recipe.yaml"
    path.write_text(text + tail)
    return path


@pytest.fixture
def computations(monkeypatch):
    """Every key handed to a step kind's compute, in order (one entry per computation)."""
    keys: list[str] = []
    for kind in step_kinds().values():
        def counted(rt, name, cfg, todo, compute=kind.compute):
            keys.extend(p.key for p in todo)
            return compute(rt, name, cfg, todo)
        monkeypatch.setattr(kind, "compute", counted)
    return keys


def run(path, **options):
    recipe = load_recipe(path)
    rt = Runtime(recipe, Store(recipe.resolve(recipe.spec.store)))
    return rt, {r.step: r for r in executor.run(rt, **options)}


def assert_each_once(keys):
    assert len(keys) == len(set(keys)), [k for k in set(keys) if keys.count(k) > 1]


def test_two_identical_merges_scored_by_one_eval_are_computed_once_and_reported_twice(project, computations):
    path = write(project, MERGES + "  eval: {kind: eval, merges: [ta1, ta2], max_length: 16, limit: 8, "
                                   "output: results}\n")
    rt, reports = run(path)
    assert_each_once(computations)
    assert reports["ta1"].keys == reports["ta2"].keys
    assert (reports["ta1"].state, reports["ta2"].state, reports["eval"].state) == ("computed", "cached", "computed")
    rows = json.loads((project / "results" / "results.json").read_text())
    by = {(r["variant"], r["task"]): r for r in rows}
    for task in ("sentiment", "animal"):
        assert by[("ta1", task)]["accuracy"] == by[("ta2", task)]["accuracy"]
        assert by[("ta1", task)]["n"] == by[("ta2", task)]["n"] == 8
    computations.clear()
    _, reports = run(path)
    assert computations == [] and {r.state for r in reports.values()} == {"cached"}


def test_one_merge_scored_twice_by_one_eval_step_or_by_two(project, computations):
    path = write(project, MERGES + "  eval: {kind: eval, merges: [ta1, ta1], max_length: 16, limit: 8}\n"
                                   "  again: {kind: eval, merges: [ta2], max_length: 16, limit: 8}\n")
    rt, reports = run(path)
    assert_each_once(computations)
    assert reports["again"].state == "cached"
    for task in ("sentiment", "animal"):  # the merge listed twice: two rows, one result
        rows = [r for r in rt.results["eval"] if r["variant"] == "ta1" and r["task"] == task]
        assert len(rows) == 2 and rows[0] == rows[1]
    # forced, the shared artifacts are still computed once in the run
    computations.clear()
    rt, reports = run(path, force=["ta1", "ta2", "eval", "again"])
    assert_each_once(computations)
    assert len(set(computations)) == len(set(reports["ta1"].keys + reports["eval"].keys))


def test_two_identical_fisher_steps_compute_each_fisher_once_even_when_both_are_forced(project, computations):
    fishers = ("  f1: {kind: fisher, estimator: empirical, examples: 8, max_length: 16}\n"
               "  f2: {kind: fisher, estimator: empirical, examples: 8, max_length: 16}\n")
    path = write(project, fishers)
    _, reports = run(path)
    assert_each_once(computations)
    assert reports["f1"].keys == reports["f2"].keys and reports["f2"].state == "cached"
    computations.clear()
    _, reports = run(path, force=["f1", "f2"])
    assert sorted(computations) == sorted(reports["f1"].keys)
    assert reports["f1"].state == "forced" and reports["f2"].state == "cached"


def test_a_sweep_point_equal_to_another_step_is_computed_once(project, computations):
    path = write(project, MERGES + "  eval: {kind: eval, merges: [ta1, ta2], max_length: 16, limit: 8}\n",
                 "sweep:\n  ta2.params.lambda: [0.5, 0.7]\n")
    rt, reports = run(path)
    assert_each_once(computations)
    assert reports["ta2[lambda=0.5]"].keys == reports["ta1"].keys
    assert reports["ta2[lambda=0.5]"].state == "cached"
    # two sweep points that are one artifact (1 and 1.0 are one λ) are scored once on the selection split
    computations.clear()
    path = write(project, MERGES + "  eval: {kind: eval, merges: [ta2], max_length: 16, limit: 8}\n",
                 "sweep:\n  ta2.params.lambda: [1, 1.0]\n")
    rt, reports = run(path)
    assert_each_once(computations)
    assert reports["ta2[lambda=1]"].keys == reports["ta2[lambda=1.0]"].keys
    assert reports["eval"].state == "computed"


def test_a_step_planning_one_key_twice_locks_it_once(project):
    path = write(project, MERGES)
    recipe = load_recipe(path)
    rt = Runtime(recipe, Store(recipe.resolve(recipe.spec.store)))
    planned = executor.plan_step(rt, "ta1")
    locked = []
    lock = rt.store.lock

    def counted(key):
        locked.append(key)
        return lock(key)

    rt.store.lock = counted
    with ExitStack() as stack:
        todo = executor.claim(rt, stack, planned + planned, forced=False)
    assert locked == [planned[0].key] and [p.key for p in todo] == [planned[0].key]
