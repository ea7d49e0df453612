"""The Python API (`import fmerge`): merge, fisher, run and status, each result checked against a
formula or loop written here, the cache seen from Python and from the CLI, and each refused
argument's message and error kind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fmerge
import hostile
from fmerge.errors import ExportError, ModelError, RecipeError, StoreError
from test_fisher_cli import assert_close, brute_force_exact, make_classifier


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_import_fmerge_loads_no_api_until_a_name_is_used():
    code = "import sys, fmerge; print('fmerge.api' in sys.modules, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]
    from fmerge import api
    from fmerge.fisher import fisher_diagonal  # the algorithm module, imported: fmerge.fisher stays the API's

    assert fmerge.merge is api.merge and fmerge.RunResult is api.RunResult and fmerge.fisher is api.fisher
    assert sys.modules["fmerge.fisher"].fisher_diagonal is fisher_diagonal
    with pytest.raises(AttributeError, match="no attribute 'merj'"):
        fmerge.merj


def test_merge_equals_the_task_arithmetic_formula_and_exports_it(tmp_path, zoo):
    result = fmerge.merge("task_arithmetic", {"a": zoo["task0"], "b": zoo["task1"]}, base=zoo["base"],
                          params={"lambda": 0.3}, out=tmp_path / "out", store=tmp_path / "store")
    assert not result.cached and result.out == (tmp_path / "out").absolute()
    assert result.report.state == "computed" and result.report.keys == [result.key]
    base, a, b = weights(zoo["base"]), weights(zoo["task0"]), weights(zoo["task1"])
    merged = dict(result.tensors())
    assert set(merged) == set(base)
    for name, theta0 in base.items():
        want = theta0 + 0.3 * ((a["bert." + name] - theta0) + (b["bert." + name] - theta0))
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6, msg=name)
    exported = weights(tmp_path / "out")
    for name, tensor in merged.items():
        assert torch.equal(exported[name], tensor), name


def test_second_merge_is_cached_and_the_cli_shares_its_key(tmp_path, zoo):
    models = [zoo["task0"], zoo["task1"]]
    first = fmerge.merge("simple_average", models, base=zoo["base"], store=tmp_path / "store")
    second = fmerge.merge("simple_average", models, base=zoo["base"], store=tmp_path / "store")
    assert (first.cached, second.cached) == (False, True) and second.key == first.key
    cli = hostile.run(["merge", "--method", "simple_average", "--base", zoo["base"], "--model", zoo["task0"],
                       "--model", zoo["task1"], "--out", tmp_path / "out", "--store", tmp_path / "store", "--json"])
    (step,) = json.loads(cli.out)["steps"]
    assert step["keys"] == [first.key] and step["state"] == "cached"
    a, b = weights(zoo["task0"]), weights(zoo["task1"])
    tensors = first.tensors()
    name = "encoder.layer.0.attention.self.query.weight"
    assert name in tensors and "nope" not in tensors and len(tensors) == len(weights(zoo["base"]))
    assert tensors.shape(name) == tuple(a["bert." + name].shape) and tensors.dtype(name) == torch.float32
    torch.testing.assert_close(tensors[name], (a["bert." + name] + b["bert." + name]) / 2, rtol=0, atol=1e-7)
    with pytest.raises(KeyError):
        tensors["nope"]


def test_per_model_values_follow_the_models_in_the_order_given(tmp_path, zoo):
    """docs/api.md: a list of per-model values follows the models in the order given; a mapping
    names each model. The order enters the cache key, so the reversed order is not served the
    first order's result."""
    a, b = weights(zoo["task0"]), weights(zoo["task1"])
    name = "bert.encoder.layer.1.output.dense.weight"
    first = fmerge.merge("weighted_average", [zoo["task1"], zoo["task0"]], params={"weights": [2, 1]},
                         store=tmp_path / "store")
    reversed_ = fmerge.merge("weighted_average", [zoo["task0"], zoo["task1"]], params={"weights": [2, 1]},
                             store=tmp_path / "store")
    named = fmerge.merge("weighted_average", [zoo["task1"], zoo["task0"]],
                         params={"weights": {"task1": 2, "task0": 1}}, store=tmp_path / "store")
    assert first.key != reversed_.key and not reversed_.cached
    torch.testing.assert_close(first.tensors()[name], (2 * b[name] + a[name]) / 3, rtol=0, atol=1e-7)
    torch.testing.assert_close(reversed_.tensors()[name], (2 * a[name] + b[name]) / 3, rtol=0, atol=1e-7)
    torch.testing.assert_close(named.tensors()[name], (2 * b[name] + a[name]) / 3, rtol=0, atol=1e-7)


# Each case: the arguments that differ from a good call (given the zoo and tmp_path), the error kind, its message.
MERGE_MISTAKES = {
    "one path as models": (lambda zoo, tmp: dict(models=str(zoo["task0"])), RecipeError,
                           "models= takes a list of model directories"),
    "no models": (lambda zoo, tmp: dict(models=[]), RecipeError, "models= is empty"),
    "misspelt method": (lambda zoo, tmp: dict(method="tis"), RecipeError,
                        "Unknown merge method 'tis'. Did you mean 'ties'?"),
    "no base for ties": (lambda zoo, tmp: dict(method="ties", base=None), RecipeError,
                         "Method 'ties' needs the base model: pass base=DIR"),
    "params as pairs": (lambda zoo, tmp: dict(params=[("lambda", 0.3)]), RecipeError,
                        "params= takes a mapping of the method's parameters"),
    "density out of range": (lambda zoo, tmp: dict(method="ties", params={"density": 2}), RecipeError,
                             "steps.merge.params.density: Input should be less than or equal to 1"),
    "unknown device": (lambda zoo, tmp: dict(device="gpu"), RecipeError, "device: unknown device 'gpu'"),
    "integer out_dtype": (lambda zoo, tmp: dict(out_dtype="int8"), RecipeError,
                          "steps.merge.out_dtype: unknown dtype 'int8'"),
    "missing model": (lambda zoo, tmp: dict(models=[tmp / "missing"]), RecipeError, "missing does not exist"),
    "store is a file": (lambda zoo, tmp: dict(store=zoo["task0"] / "config.json"), StoreError,
                        "config.json is not an fmerge artifact store"),
    "export onto an input": (lambda zoo, tmp: dict(out=zoo["task0"]), ExportError,
                             "is model 'task0'"),
    "export onto a stranger": (lambda zoo, tmp: dict(out=zoo["task2"]), ExportError,
                               "exists and was not written by fmerge; refusing to replace it"),
}


@pytest.mark.parametrize("case", MERGE_MISTAKES)
def test_merge_refuses_bad_arguments_with_the_cli_error_kinds(tmp_path, zoo, case):
    arguments, error, message = MERGE_MISTAKES[case]
    call = {"method": "simple_average", "models": [zoo["task0"]], "base": zoo["base"], "store": tmp_path / "store",
            **arguments(zoo, tmp_path)}
    before = {m: (zoo[m] / "model.safetensors").read_bytes() for m in ("task0", "task2")}
    with pytest.raises(error) as caught:
        fmerge.merge(**call)
    assert message in str(caught.value)
    # Refused before anything is computed, except an export onto a directory fmerge did not write: that is
    # found when exporting, and the merge stays cached.
    assert bool(list((tmp_path / "store").glob("objects/*/*"))) == (case == "export onto a stranger")
    assert before == {m: (zoo[m] / "model.safetensors").read_bytes() for m in ("task0", "task2")}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return make_classifier(tmp_path_factory.mktemp("api_fisher"))


def test_fisher_is_cached_and_more_examples_extend_it_to_the_per_example_loop(classifier, tmp_path):
    model_dir, data, rows = classifier
    store = tmp_path / "store"
    result = fmerge.fisher(model_dir, data, examples=4, max_length=16, store=store, export=tmp_path / "f.safetensors")
    assert (result.model, result.estimator, result.examples, result.extended_from) == ("clf", "exact", 4, 0)
    assert not result.cached and result.export == tmp_path / "f.safetensors" and result.fisher_mean > 0
    diagonal = dict(result.diagonal())
    exported = load_file(tmp_path / "f.safetensors")
    assert exported.keys() == diagonal.keys() and all(torch.equal(exported[n], t) for n, t in diagonal.items())

    again = fmerge.fisher(model_dir, data, examples=4, max_length=16, store=store)
    assert again.cached and again.key == result.key
    # The 7-row subset starts with the 4 rows above; its estimate extends theirs, so checking it
    # against the loop checks both.
    more = fmerge.fisher(model_dir, data, examples=7, max_length=16, store=store)
    assert not more.cached and more.extended_from == 4 and more.examples == 7
    assert_close(dict(more.diagonal()), brute_force_exact(model_dir, rows, 7))


@pytest.mark.parametrize("arguments, message", [
    (dict(model=["A", "B"]), "model= takes one model directory (fisher_many takes several)"),
    (dict(seed=-1), "seed=-1: a seed is a whole number from 0 up"),
    (dict(data=""), "The task data is named by an empty string"),
    (dict(label_names=["neg", "neg", "pos"]), "names 'neg' more than once"),
    (dict(label_names="neg,pos"), "give the class names in head order as a list of strings"),
    (dict(label_names=["neg", "pos"], label_column=None), "but the label column is empty"),
    (dict(estimator="exakt"), "unknown estimator 'exakt'; did you mean 'exact'?"),
])
def test_fisher_refuses_bad_arguments(classifier, tmp_path, arguments, message):
    model_dir, data, _ = classifier
    call = {"model": model_dir, "data": data, "examples": 4, "store": tmp_path / "store", **arguments}
    with pytest.raises(RecipeError) as caught:
        fmerge.fisher(**call)
    assert message in str(caught.value)
    assert not (tmp_path / "store").exists()


def test_fisher_of_a_model_without_a_classification_head_is_a_model_error(tmp_path, classifier):
    _, data, _ = classifier
    from test_pipeline import tiny_base

    tiny_base(tmp_path / "body")
    with pytest.raises(ModelError):
        fmerge.fisher(tmp_path / "body", data, examples=4, max_length=16, store=tmp_path / "store")


RUN_RECIPE = """
base: base
store: store
data:
  sentiment: {path: data/sentiment}
  color: {path: data/color}
models:
  sentiment: {path: models/sentiment, data: sentiment}
  color: {path: models/color, data: color}
steps:
  avg: {kind: merge, method: simple_average}
  eval: {kind: eval, merges: [avg], base: false, models: [color], max_length: 16}
"""


def individual_accuracy(root: Path, task: str) -> float:
    """The fine-tuned model's accuracy on its test file, one sentence at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(root / "models" / task).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    rows = [json.loads(line) for line in (root / "data" / task / "test.jsonl").read_text().splitlines()]
    with torch.no_grad():
        right = [int(model(**tokenizer(r["text"], return_tensors="pt")).logits[0].argmax()) == r["label"] for r in rows]
    return sum(right) / len(right)


def test_run_and_status_report_steps_rows_and_merged_weights(tmp_path):
    from _iterative_project import build

    build(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RUN_RECIPE)
    before = fmerge.status(recipe)
    assert before.stale == ["avg", "eval"] and not before.cached
    assert not (tmp_path / "store").exists()  # status creates nothing

    result = fmerge.run(recipe)
    assert [(r.step, r.state) for r in result.steps] == [("avg", "computed"), ("eval", "computed")]
    rows = {r["variant"]: r for r in result.rows()}
    assert set(rows) == {"avg", "individual"} and result.results == {"eval": result.rows()}
    assert all(r["step"] == "eval" and r["task"] == "color" and r["split"] == "test" and r["n"] == 40
               for r in rows.values())
    assert rows["individual"]["accuracy"] == pytest.approx(individual_accuracy(tmp_path, "color"), abs=1e-6)

    sentiment, color = weights(tmp_path / "models" / "sentiment"), weights(tmp_path / "models" / "color")
    merged = result.merged("avg")
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.bias"):
        want = (sentiment["bert." + name] + color["bert." + name]) / 2
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-7)
    with pytest.raises(RecipeError, match="Step 'eval' \\(eval\\) made no model weights"):
        result.merged("eval")
    with pytest.raises(RecipeError, match="This run has no step 'ties'; its steps are avg, eval"):
        result.step("ties")

    assert fmerge.status(recipe).cached
    again = fmerge.run(recipe, only="avg")
    assert [(r.step, r.state) for r in again.steps] == [("avg", "cached")] and again.rows() == []


def test_run_refuses_sets_on_a_parsed_recipe_and_unknown_steps(tmp_path, zoo):
    from conftest import ZOO_RECIPE, write_recipe

    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    with pytest.raises(RecipeError, match="sets= overrides a recipe as it is read"):
        fmerge.run(fmerge.load_recipe(recipe), sets=["ta.params.lambda=0.5"])
    with pytest.raises(RecipeError, match="sets= takes a list of STEP.PARAM=VALUE strings"):
        fmerge.run(recipe, sets="ta.params.lambda=0.5")
    with pytest.raises(RecipeError, match="--only names unknown step"):
        fmerge.run(recipe, only="nope")
    with pytest.raises(RecipeError, match="recipe= takes a recipe file's path"):
        fmerge.status({"steps": {}})
    dry = fmerge.run(recipe, dry_run=True, sets=["ta.params.lambda=0.5"])
    assert {r.state for r in dry.steps} == {"stale"}
    with pytest.raises(StoreError, match="a dry run computes nothing"):
        dry.merged("avg")
