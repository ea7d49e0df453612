"""`fmerge eval` end to end (in process, through `fmerge.cli.main`): model directories, merges
in the store, the cache, the files it writes, and each refusal as one paragraph with exit 2."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_zoo
from hostile import assert_refused, run
from test_lm_eval import CHOICES, TEXTS, make_tiny_lm, save_tokenizer, write_jsonl

from fmerge import api


@pytest.fixture
def lm(tmp_path) -> Path:
    return make_tiny_lm(tmp_path / "llama")


def eval_json(*args) -> dict:
    result = run(["eval", *args, "--json"])
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_language_model_eval_is_cached_and_written(tmp_path, lm):
    data = write_jsonl(tmp_path / "lm.jsonl", TEXTS)
    args = [lm, "--data", data, "--prompt-column", "prompt", "--store", tmp_path / "st", "--output", tmp_path / "out"]
    first = eval_json(*args)
    (scores,) = first["scores"]
    assert first["steps"][0]["state"] == "computed" and scores["kind"] == "causal_lm" and scores["split"] == "test"
    assert scores["metrics"]["tokens"] == 25  # the texts' words, prompts left out
    assert scores["metrics"]["perplexity"] == pytest.approx(math.exp(scores["metrics"]["loss"]))
    again = run(["eval", *args])
    assert again.code == 0 and "cached" in again.out and "perplexity" in again.out
    (row,) = csv.DictReader((tmp_path / "out" / "results.csv").open())
    assert float(row["perplexity"]) == pytest.approx(scores["metrics"]["perplexity"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["tokens"] == 25


def test_eval_output_keeps_every_models_rows_and_never_overwrites_a_users_file(tmp_path, lm):
    """Two models evaluated into one --output: both rows stay, each naming its model (as given,
    and its content hash), data (and its hash), split and metric; a user's results file is refused."""
    import shutil

    data = write_jsonl(tmp_path / "lm.jsonl", TEXTS)
    other = tmp_path / "llama2"
    shutil.copytree(lm, other)
    out = tmp_path / "out"
    common = ["--data", data, "--prompt-column", "prompt", "--store", tmp_path / "st", "--output", out]
    first = eval_json(lm, *common)
    second = eval_json(other, *common)
    rows = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in rows] == [str(lm), str(other)]
    assert rows[0]["model_key"] == rows[1]["model_key"]  # the same bytes: one content hash, two names
    assert {r["eval_key"] for r in rows} == {first["scores"][0]["key"], second["scores"][0]["key"]}
    for r in rows:
        assert r["data"] == str(data) and r["data_hash"] and r["split"] == "test" and r["metric"] == "perplexity"
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["model"] for r in table] == [str(lm), str(other)] and all(r["data_hash"] for r in table)
    eval_json(lm, *common)  # again: its row is replaced, not added
    assert len(json.loads((out / "results.json").read_text())) == 2

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("my own table\n")
    refused = run(["eval", lm, *common[:-1], mine])
    assert refused.code == 2 and f"{mine / 'results.csv'}" in refused.err and "not written by fmerge" in refused.err
    assert (mine / "results.csv").read_text() == "my own table\n" and not (mine / "results.json").exists()


def test_multiple_choice_eval_matches_the_api(tmp_path, lm):
    data = write_jsonl(tmp_path / "mc.jsonl", [{"q": r["question"], "choices": r["options"], "label": r["answer"]}
                                               for r in CHOICES])
    shown = eval_json(lm, "--data", data, "--task", "multiple_choice", "--text-column", "q", "--store", tmp_path / "st")
    result = api.evaluate(lm, data, choices_column="choices", text_column="q", store=tmp_path / "st")
    (scores,) = result.scores
    assert result.cached and scores.kind == "multiple_choice"  # the same figures, found in the cache
    assert shown["scores"][0]["metrics"] == scores.metrics and set(scores.metrics) == {"accuracy", "acc", "acc_norm"}


def test_classifier_eval_through_its_own_head_or_a_head_file(tmp_path):
    from safetensors.torch import save_file

    zoo = make_zoo(tmp_path / "zoo", n_models=1)
    save_tokenizer(zoo["task0"])
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(6)] + [{"text": "extra", "label": 0}]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    own = eval_json(zoo["task0"], "--data", data, "--store", tmp_path / "st")
    assert own["scores"][0]["kind"] == "classification" and own["scores"][0]["n"] == 7
    # A head of zeros gives every class the same logit, so every row is predicted class 0.
    head = tmp_path / "head.safetensors"
    save_file({"classifier.weight": torch.zeros(2, 16), "classifier.bias": torch.zeros(2)}, head)
    zeroed = eval_json(zoo["task0"], "--data", data, "--head", head, "--store", tmp_path / "st")
    assert zeroed["scores"][0]["metrics"]["accuracy"] == pytest.approx(4 / 7)


def test_a_merge_in_the_store_equals_its_export(tmp_path, lm):
    other = make_tiny_lm(tmp_path / "llama2", seed=1)
    merged = api.merge("simple_average", [lm, other], base=lm, out=tmp_path / "merged", store=tmp_path / "st")
    data = write_jsonl(tmp_path / "lm.jsonl", TEXTS)
    by_key = eval_json(merged.key[:10], "--data", data, "--store", tmp_path / "st")
    exported = eval_json(tmp_path / "merged", "--data", data, "--store", tmp_path / "st")
    assert by_key["model"] == f"merge {merged.key[:12]}"
    assert by_key["scores"][0]["metrics"] == pytest.approx(exported["scores"][0]["metrics"])
    assert by_key["scores"][0]["metrics"] != pytest.approx(eval_json(lm, "--data", data, "--store", tmp_path / "st")
                                                           ["scores"][0]["metrics"])


# -- refusals --------------------------------------------------------------------------------------


def test_language_model_data_without_its_text_column(tmp_path, lm):
    data = write_jsonl(tmp_path / "lm.jsonl", [{"body": "the cat sat"}])
    assert_refused(run(["-q", "eval", lm, "--data", data, "--store", tmp_path / "st"]), "no column 'text'", "lm.jsonl",
                   "body")


def test_choices_that_are_not_a_list(tmp_path, lm):
    data = write_jsonl(tmp_path / "mc.jsonl", [{"text": "the sky is", "choices": ["blue", "red"], "label": 0},
                                              {"text": "a cat", "choices": "sat", "label": 0}])
    assert_refused(run(["-q", "eval", lm, "--data", data, "--task", "multiple_choice", "--store", tmp_path / "st"]),
                   "row 2 of choices column 'choices'", "'sat'", "not a non-empty list")


@pytest.mark.parametrize("answer,shown", [(2, "holds 2"), ("2", "holds '2'"), ("B", "holds 'B'")])
def test_answer_out_of_range_or_not_an_index(tmp_path, lm, answer, shown):
    data = write_jsonl(tmp_path / "mc.jsonl", [{"text": "the sky is", "choices": ["blue", "red"], "label": answer}])
    assert_refused(run(["-q", "eval", lm, "--data", data, "--choices-column", "choices", "--store", tmp_path / "st"]),
                   f"row 1 of answer column 'label' {shown}", "a number or a string of digits",
                   "0..1 for its 2 choices")


def test_hub_model_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_jsonl(tmp_path / "lm.jsonl", TEXTS)
    assert_refused(run(["-q", "eval", "someone/tiny-llama", "--data", data, "--store", tmp_path / "st"]),
                   "someone/tiny-llama", "hub id", "HF_HUB_OFFLINE=1", "local path")


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-evaluation-harness is installed")
def test_lm_eval_refused_when_not_installed(tmp_path, lm):
    result = run(["-q", "eval", lm, "--lm-eval", "hellaswag", "--store", tmp_path / "st"])
    assert_refused(result, "--lm-eval", "pip install lm-eval")
    assert not (tmp_path / "st").exists()  # refused before anything was created


def test_unknown_task_and_non_merge_key(tmp_path, lm):
    data = write_jsonl(tmp_path / "lm.jsonl", TEXTS)
    assert_refused(run(["-q", "eval", lm, "--data", data, "--task", "summarization", "--store", tmp_path / "st"]),
                   "summarization", "classification, causal_lm, multiple_choice")
    key = eval_json(lm, "--data", data, "--store", tmp_path / "st")["scores"][0]["key"]
    assert_refused(run(["-q", "eval", key[:8], "--data", data, "--store", tmp_path / "st"]), "is of kind 'eval', not a merge")


def test_head_files_that_cannot_serve(tmp_path):
    from safetensors.torch import save_file

    zoo = make_zoo(tmp_path / "zoo", n_models=1)
    save_tokenizer(zoo["task0"])
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": "the cat", "label": 1}])
    base = ["-q", "eval", zoo["task0"], "--data", data, "--store", tmp_path / "st", "--head"]
    assert_refused(run([*base, tmp_path / "none.safetensors"]), "head file", "none.safetensors", "does not exist")
    save_file({"head.weight": torch.zeros(2, 16)}, tmp_path / "other.safetensors")
    assert_refused(run([*base, tmp_path / "other.safetensors"]), "head.weight", "not tensors of the task model",
                   "classifier.weight")
    save_file({"classifier.bias": torch.tensor([0.0, float("nan")])}, tmp_path / "nan.safetensors")
    assert_refused(run([*base, tmp_path / "nan.safetensors"]), "classifier.bias", "NaN")


def test_mistakes_in_what_to_evaluate(tmp_path, lm):
    data = write_jsonl(tmp_path / "lm.jsonl", [{"text": ""}])
    store = ["--store", tmp_path / "st"]
    assert_refused(run(["-q", "eval", lm, *store]), "Nothing to evaluate", "--data")
    assert_refused(run(["-q", "eval", lm, "--data", data, "--like", lm, *store]), "--like", "no merge's key")
    assert_refused(run(["-q", "eval", lm, "--data", data, *store]), "lm.jsonl", "no token to score")
    long = write_jsonl(tmp_path / "mc.jsonl", [{"text": "the", "choices": ["a " * 70, "b"], "label": 1}])
    assert_refused(run(["-q", "eval", lm, "--data", long, "--choices-column", "choices", "--max-length", "8", *store]),
                   "row 1, choice 0 takes 70 tokens", "max_length 8")


@pytest.mark.parametrize("entry,says", [
    ({"task": "multiple_choice"}, "needs 'choices'"),
    ({"task": "causal_lm", "choices": "c"}, "'choices' is for multiple_choice data"),
    ({"prompt": "p", "choices": "c"}, "'prompt' is for causal_lm"),
])
def test_data_entries_that_contradict_themselves(tmp_path, entry, says):
    from fmerge.errors import RecipeError

    data = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    text = json.dumps({"base": str(tmp_path), "data": {"d": {"splits": {"test": str(data)}, **entry}}})
    with pytest.raises(RecipeError, match=says):
        api.parse_recipe(text, tmp_path / "r.yaml")
