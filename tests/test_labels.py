"""The label rule (`fmerge.data.label_targets`) on every path that reads labels: `fmerge eval`,
`fmerge fisher --estimator empirical` and their API calls refuse labels they cannot map, naming
the row and the value, and score a mapped split as a plain loop over its rows does."""

from __future__ import annotations

import json

import pytest
import torch

from hostile import assert_refused, run
from test_fisher_cli import make_classifier

from fmerge import api
from fmerge.errors import DataError

TEXTS = ["the cat sat", "a dog ran far", "cold rain", "the sun", "a red fox ran", "dogs and cats", "mat"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny 3-class BERT classifier with transformers' default id2label (LABEL_0..LABEL_2)."""
    model_dir, _, _ = make_classifier(tmp_path_factory.mktemp("labels"), num_labels=3)
    return model_dir


def write_labels(path, labels, texts=TEXTS):
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    return path


def with_id2label(model_dir, tmp_path, names):
    """A copy of the classifier whose config names its classes `names` (in head order)."""
    import shutil

    copy = tmp_path / "named"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def eval_args(model_dir, data, store, *extra):
    return ["-q", "eval", model_dir, "--data", data, "--store", store, *extra]


def fisher_args(model_dir, data, store, *extra):
    return ["-q", "fisher", "--model", model_dir, "--data", data, "--estimator", "empirical", "--examples", "4",
            "--store", store, *extra]


# (labels of the rows, what the refusal names)
REFUSED = {
    "strings_without_names": (["neg", "pos", "neu", "pos"], ["row 1", "'neg'", "LABEL_0", "--label-names"]),
    "fraction": ([0, 1.5, 2, 1], ["row 2", "1.5", "0..2"]),
    "above_the_head": ([0, 7, 2, 1], ["row 2", "holds 7", "0..2"]),
    "negative": ([-1, 0, 2, 1], ["row 1", "holds -1", "0..2"]),
    "mixed_text_and_number": (["1", 2, 0, 1], ["row 2", "holds 2", "row 1 holds '1'", "mixes"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_eval_refuses_labels_it_cannot_map(classifier, tmp_path, case):
    labels, mentions = REFUSED[case]
    data = write_labels(tmp_path / "d.jsonl", labels)
    assert_refused(run(eval_args(classifier, data, tmp_path / "st")), str(data), "label column 'label'", *mentions)
    with pytest.raises(DataError) as err:
        api.evaluate(classifier, data, store=tmp_path / "st")
    assert all(m in " ".join(str(err.value).split()) for m in mentions if not m.startswith("--")), str(err.value)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_empirical_fisher_refuses_labels_it_cannot_map(classifier, tmp_path, case):
    labels, mentions = REFUSED[case]
    data = write_labels(tmp_path / "d.jsonl", labels)
    assert_refused(run(fisher_args(classifier, data, tmp_path / "st")), str(data), *mentions)
    with pytest.raises(DataError, match="row "):
        api.fisher(classifier, data, estimator="empirical", examples=4, store=tmp_path / "st")


def test_default_id2label_names_no_strings_but_the_ones_the_data_says(classifier, tmp_path):
    """transformers' LABEL_i names map strings only where the data's labels are those names."""
    data = write_labels(tmp_path / "d.jsonl", ["LABEL_2", "LABEL_0", "LABEL_1", "LABEL_0"])
    default = api.evaluate(classifier, data, store=tmp_path / "st").scores[0].metrics["accuracy"]
    ints = write_labels(tmp_path / "ints.jsonl", [2, 0, 1, 0])
    assert default == api.evaluate(classifier, ints, store=tmp_path / "st").scores[0].metrics["accuracy"]
    other = write_labels(tmp_path / "other.jsonl", ["LABEL_2", "neg", "LABEL_1", "LABEL_0"])
    assert_refused(run(eval_args(classifier, other, tmp_path / "st")), "row 2", "'neg'", "LABEL_0..")


def test_id2label_unknown_string_is_refused(classifier, tmp_path):
    named = with_id2label(classifier, tmp_path, ["pos", "neg", "neu"])
    data = write_labels(tmp_path / "d.jsonl", ["pos", "neg", "bad", "neu"])
    assert_refused(run(eval_args(named, data, tmp_path / "st")), "row 3", "'bad'", "id2label", "'pos, neg, neu'")


def hand_accuracy(model_dir, texts, gold) -> float:
    """Accuracy by a plain loop: each row alone through the model, its argmax against its class."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    hits = 0
    with torch.no_grad():
        for text, y in zip(texts, gold):
            hits += int(model(**tok(text, return_tensors="pt")).logits[0].argmax()) == y
    return hits / len(texts)


def test_strings_named_by_id2label_score_as_a_plain_loop(classifier, tmp_path):
    """id2label in unsorted order: mapping by it (not by sorting the strings) gives the loop's score."""
    names = ["pos", "neg", "neu"]
    named = with_id2label(classifier, tmp_path, names)
    labels = ["neu", "pos", "neg", "neg", "pos", "neu", "pos"]
    data = write_labels(tmp_path / "d.jsonl", labels)
    got = api.evaluate(named, data, store=tmp_path / "st").scores[0].metrics["accuracy"]
    want = hand_accuracy(named, TEXTS, [names.index(y) for y in labels])
    assert got == pytest.approx(want)
    assert got != pytest.approx(hand_accuracy(named, TEXTS, [sorted(names).index(y) for y in labels]))
    shown = run(eval_args(named, data, tmp_path / "st", "--json"))
    assert shown.code == 0 and json.loads(shown.out)["scores"][0]["metrics"]["accuracy"] == pytest.approx(want)


def test_label_names_map_strings_as_given(classifier, tmp_path):
    labels = ["b", "c", "a", "a", "c", "b", "b"]
    data = write_labels(tmp_path / "d.jsonl", labels)
    order = ["c", "a", "b"]
    got = api.evaluate(classifier, data, label_names=order, store=tmp_path / "st").scores[0].metrics["accuracy"]
    assert got == pytest.approx(hand_accuracy(classifier, TEXTS, [order.index(y) for y in labels]))
    shown = run(eval_args(classifier, data, tmp_path / "st", "--label-names", "c,a,b", "--json"))
    assert shown.code == 0 and json.loads(shown.out)["scores"][0]["metrics"]["accuracy"] == pytest.approx(got)
    assert_refused(run(eval_args(classifier, data, tmp_path / "st", "--label-names", "c,a")),
                   "name 2 classes", "head has 3")


def test_a_regression_head_reads_float_targets_and_refuses_others(tmp_path):
    from fmerge.data import DataSpec, label_targets, load_dataset_split

    spec = DataSpec(path=str(write_labels(tmp_path / "r.jsonl", [0.25, 3, -1.5])))
    targets = label_targets(load_dataset_split(spec), spec, num_labels=1)
    assert targets.dtype == "float32" and targets.tolist() == [0.25, 3.0, -1.5]
    spec = DataSpec(path=str(write_labels(tmp_path / "s.jsonl", ["high", "low", "low"])))
    with pytest.raises(DataError, match="row 1 .*'high', but the model has a regression head"):
        label_targets(load_dataset_split(spec), spec, num_labels=1)
    spec = DataSpec(path=str(write_labels(tmp_path / "b.jsonl", [1, True, 0])))
    with pytest.raises(DataError, match="row 2 .*holds True, but row 1 holds 1: the column mixes"):
        label_targets(load_dataset_split(spec), spec, num_labels=2)


def test_adamerging_refuses_a_label_outside_a_tasks_head(tmp_path):
    """The iterative steps go through the same rule: row 5 of a 3-class task's validation file says 7."""
    from _iterative_project import HEADER, build

    root = build(tmp_path / "p")
    split = root / "data" / "animal" / "validation.jsonl"
    rows = [json.loads(line) for line in split.read_text().splitlines()]
    rows[4]["label"] = 7
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = root / "ada.yaml"
    recipe.write_text(HEADER + "  ada: {kind: adamerging, steps: 2, batch_size: 4, examples: 8, max_length: 16}\n")
    assert_refused(run(["-q", "run", recipe]), "data/animal' (split 'validation')", "row 5 of label column 'label'",
                   "holds 7", "0..2")
