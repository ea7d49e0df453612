"""Accuracy in the traces of AdaMerging and Frank-Wolfe (hard and soft), and the Objective's loss,
gradient and accuracy over several tasks, against plain loops over one unpadded example at a time.

Each step draws a whole validation split (24 rows) per step, so the examples of a draw are the
split's rows whatever their seeded order, and the accuracy at a body is written out here: the
task's own classifier with that body loaded, argmax of its logits against each row's label.
"""

from __future__ import annotations

import json

import pytest
import torch

from _iterative_project import HEADER, TASKS, build, run
from fmerge.objective import Objective, TaskModel, correct_and_labelled

ROWS = 24  # validation rows per task (test_pipeline.write_task)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return build(tmp_path_factory.mktemp("acc"))


def rows(project, task: str) -> list[dict]:
    return [json.loads(line) for line in (project / "data" / task / "validation.jsonl").read_text().splitlines()]


def classifier(project, task: str, body: dict[str, torch.Tensor] | None = None):
    from transformers import BertForSequenceClassification

    net = BertForSequenceClassification.from_pretrained(project / "models" / task).eval()
    if body is not None:
        missing, unexpected = net.bert.load_state_dict(body, strict=False)
        assert not unexpected and all(m.endswith("position_ids") for m in missing)
    return net


def hand_accuracy(project, task: str, body: dict[str, torch.Tensor]) -> float:
    """The share of the task's validation rows whose argmax class at `body` is their label."""
    from transformers import AutoTokenizer

    net, tok = classifier(project, task, body), AutoTokenizer.from_pretrained(project / "base")
    hits = 0
    with torch.no_grad():
        for row in rows(project, task):
            logits = net(**tok(row["text"], return_tensors="pt", truncation=True, max_length=16)).logits[0]
            hits += int(int(logits.argmax()) == row["label"])
    return hits / ROWS


def bodies(project):
    """The base's body and each task model's, in base naming."""
    from safetensors.torch import load_file

    base = load_file(project / "base" / "model.safetensors")
    models = {t: {n: classifier(project, t).state_dict()["bert." + n] for n in base} for t in TASKS}
    return base, models


def check_accuracy(entry: dict, project, body: dict[str, torch.Tensor]) -> None:
    expect = {t: hand_accuracy(project, t, body) for t in TASKS}
    assert entry["task_accuracy"] == pytest.approx(expect, abs=1e-12)
    assert entry["accuracy"] == pytest.approx(sum(expect.values()) / len(expect), abs=1e-12)


def trace_of(project, name: str, step: str):
    recipe = project / f"{name}.yaml"
    recipe.write_text(HEADER + step)
    rt, states, _ = run(recipe)
    assert states == {name: "computed"}
    return rt.store.open(rt.planned[name][0].key).meta["trace"]


@pytest.mark.parametrize("loss", ["cross_entropy", "entropy"])
def test_adamerging_trace_has_the_accuracy_at_the_first_body(project, loss):
    trace = trace_of(project, "ada", f"""
  ada: {{kind: adamerging, granularity: task, loss: {loss}, steps: 2, lr: 0.05, init: 0.3, batch_size: {ROWS},
        max_length: 16}}
""")
    base, models = bodies(project)
    first = {n: base[n] + sum(0.3 * (models[t][n] - base[n]) for t in TASKS) for n in base}  # θ(Λ_0)
    check_accuracy(trace[0], project, first)
    assert all("accuracy" in e and set(e["task_accuracy"]) == set(TASKS) for e in trace)


def test_frank_wolfe_trace_has_the_accuracy_at_each_iterate(project):
    trace = trace_of(project, "fw", f"""
  fw: {{kind: frank_wolfe, init: base, max_iters: 2, step_size: 0.5, dataset_size: {ROWS}, max_length: 16}}
""")
    base, models = bodies(project)
    check_accuracy(trace[0], project, base)
    chosen = models[trace[0]["chosen"]]
    x1 = {n: base[n] + 0.5 * (chosen[n] - base[n]) for n in base}  # γ_0 = 2/(0+2)·0.5
    check_accuracy(trace[1], project, x1)


def test_frank_wolfe_soft_trace_has_the_accuracy_at_the_selection(project):
    trace = trace_of(project, "fws", f"""
  fws: {{kind: frank_wolfe_soft, init: base, max_iters: 1, ada_iters: 1, dataset_size: {ROWS}, max_length: 16}}
""")
    base, _ = bodies(project)
    check_accuracy(trace[0], project, base)


def test_data_without_labels_records_no_accuracy(project):
    recipe = project / "unlabelled.yaml"
    unlabelled = HEADER.replace("sentiment: {path: data/sentiment}", "sentiment: {path: data/sentiment, label: null}")
    recipe.write_text(unlabelled + "  ada: {kind: adamerging, loss: entropy, steps: 1, batch_size: 8, max_length: 16}\n")
    rt, states, _ = run(recipe)
    assert states == {"ada": "computed"}
    (entry,) = rt.store.open(rt.planned["ada"][0].key).meta["trace"]
    assert set(entry["task_accuracy"]) == {"animal", "color"}
    assert entry["accuracy"] == pytest.approx(sum(entry["task_accuracy"].values()) / 2)


def test_objective_over_tasks_equals_the_mean_of_plain_per_example_losses(project):
    """Three tasks (a 1/3 that is not a power of two) adding into one gradient: the mean over tasks of
    each task's mean loss and its gradient, and each task's accuracy, written out per example."""
    from transformers import AutoTokenizer

    from fmerge.data import DataSpec, encode_batches, load_dataset_split

    tok = AutoTokenizer.from_pretrained(project / "base")
    base, _ = bodies(project)
    g = torch.Generator().manual_seed(0)
    body = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    tasks = {}
    for t in TASKS:
        spec = DataSpec(path=str(project / "data" / t), split="validation")
        ds = load_dataset_split(spec).select(range(10))
        net = classifier(project, t).requires_grad_(False)
        tasks[t] = TaskModel(net, {n: "bert." + n for n in body},
                             lambda draw, ds=ds, spec=spec: list(encode_batches(tok, ds, spec, 4, 16)))
    objective = Objective(tasks, "cross_entropy", list(body))
    value, grad = objective(body, 0, list(TASKS))

    ref_grad = {n: torch.zeros_like(t) for n, t in body.items()}
    ref_value, ref_accuracy = 0.0, {}
    for t in TASKS:
        net = classifier(project, t, body)
        hits = 0
        for row in rows(project, t)[:10]:
            net.zero_grad()
            logits = net(**tok(row["text"], return_tensors="pt", truncation=True, max_length=16)).logits[0]
            one = -torch.log_softmax(logits, -1)[row["label"]]
            one.backward()
            ref_value += float(one.detach()) / 10 / len(TASKS)
            hits += int(int(logits.argmax()) == row["label"])
            for n, p in net.bert.named_parameters():
                if p.grad is not None:
                    ref_grad[n] += p.grad / 10 / len(TASKS)
        ref_accuracy[t] = hits / 10
    assert value == pytest.approx(ref_value, rel=1e-5)
    for n in body:
        torch.testing.assert_close(grad[n], ref_grad[n], rtol=1e-4, atol=1e-7)
    assert objective.accuracy() == pytest.approx(ref_accuracy, abs=1e-12)


def test_unlabelled_and_out_of_range_labels_are_not_counted():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, -1, 3])  # right, wrong, unlabelled, not a class
    assert correct_and_labelled(logits, labels) == (1, 2)
