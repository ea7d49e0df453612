"""Recipe validation: every mistake is one message naming the file, line and key path."""

from __future__ import annotations

import pytest

from fmerge.errors import FmergeError
from fmerge.api import load_recipe
from fmerge.graph import step_order
from conftest import ZOO_RECIPE, write_recipe


@pytest.fixture
def recipe_dir(tmp_path, zoo):
    return tmp_path  # zoo lives in tmp_path/zoo


def bad(recipe_dir, text: str) -> str:
    with pytest.raises(FmergeError) as info:
        load_recipe(write_recipe(recipe_dir, text))
    return str(info.value)


def test_good_recipe_loads_with_typed_steps(recipe_dir):
    r = load_recipe(write_recipe(recipe_dir, ZOO_RECIPE))
    assert list(r.models) == ["a", "b", "c"]
    assert r.steps["ties"].params == {"density": 0.5, "lambda": 1.0}
    assert step_order(r) == ["avg", "ta", "ties"]


def test_malformed_yaml_names_line(recipe_dir):
    msg = bad(recipe_dir, "base: zoo/base\nmodels: [a, \nsteps: {}\n")
    assert "recipe.yaml:" in msg and "malformed YAML" in msg


def test_unknown_top_level_key_suggests(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE.replace("models:", "modles:"))
    assert "modles: unknown key; did you mean 'models'?" in msg
    assert "recipe.yaml:3" in msg


def test_unknown_method_param_suggests_with_line(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE.replace("{density: 0.5,", "{densty: 0.5,"))
    assert "steps.ties.params.densty: unknown key; did you mean 'density'?" in msg
    assert "recipe.yaml:19:" in msg


def test_wrong_type(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE.replace("lambda: 0.3", "lambda: lots"))
    assert "steps.ta.params.lambda" in msg and "'lots'" in msg


def test_out_of_range_density(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE.replace("density: 0.5", "density: 1.5"))
    assert "steps.ties.params" in msg and "density" in msg


def test_unknown_method_suggests(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE.replace("method: ties", "method: tie"))
    assert "steps.ties.method" in msg and "Did you mean 'ties'?" in msg


def test_unknown_step_kind(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE.replace("kind: merge\n    method: simple_average", "kind: merj\n    method: simple_average"))
    assert "steps.avg.kind: unknown step kind 'merj'; did you mean 'merge'?" in msg


def test_missing_model_directory(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE.replace("zoo/task1", "zoo/nope"))
    assert "models.b" in msg and "does not exist" in msg and "zoo/nope" in msg


def test_missing_required_key(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE.replace("base: zoo/base\n", ""))
    assert "base: required key is missing" in msg


def test_step_naming_unknown_model(recipe_dir):
    text = ZOO_RECIPE + "  pair:\n    kind: merge\n    method: simple_average\n    models: [a, bb]\n"
    msg = bad(recipe_dir, text)
    assert "steps.pair.models: no model named 'bb'; did you mean 'b'?" in msg


def test_dangling_step_reference(recipe_dir):
    text = ZOO_RECIPE + "  fm:\n    kind: merge\n    method: fisher\n    fisher: fishr\n"
    msg = bad(recipe_dir, text)
    assert "steps.fm.fisher: no step named 'fishr'" in msg


def test_method_needing_fisher_without_it(recipe_dir):
    text = ZOO_RECIPE + "  fm:\n    kind: merge\n    method: fisher\n"
    assert "needs Fisher diagonals" in bad(recipe_dir, text)


def test_cycle_is_reported(recipe_dir):
    text = """
base: zoo/base
models:
  a: {from_step: ft_a}
steps:
  ft_a:
    kind: merge
    method: simple_average
  m:
    kind: merge
    method: simple_average
"""
    # ft_a produces model a and merges model a: a cycle through the model
    msg = bad(recipe_dir, text)
    assert "cycle" in msg and "ft_a -> ft_a" in msg


def test_mergekit_config_gets_a_pointer(recipe_dir):
    msg = bad(recipe_dir, "merge_method: ties\nbase_model: x\nmodels: []\n")
    assert "mergekit" in msg


def test_bad_regex(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE + "exclude: ['(unclosed']\n")
    assert "exclude" in msg and "regular expression" in msg


def test_all_zero_weights_rejected_at_load(recipe_dir):
    msg = bad(recipe_dir, ZOO_RECIPE.replace("method: simple_average", "method: weighted_average\n    params: {weights: [0, 0, 0]}"))
    assert "steps.avg.params" in msg and "weights" in msg
