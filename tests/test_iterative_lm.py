"""AdaMerging and Frank-Wolfe on causal LMs: the token-level objective's value and gradient
against a plain loop over sequences and tokens, and both steps run through a recipe, their
results recomputed by hand from that loop (Adam and the Frank-Wolfe update written out).

Two "fine-tunes" of a tiny Llama (hidden 16, 2 layers, tied embeddings) and two jsonl text tasks,
one with a prompt column whose tokens are not scored."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fmerge import executor
from fmerge.api import load_recipe
from fmerge.errors import DataError, RecipeError
from fmerge.recipe import BASE
from fmerge.runtime import Runtime
from fmerge.store import Store
from test_lm_eval import make_tiny_lm, save_tokenizer, write_jsonl

STORIES = ["the cat sat on the mat", "a dog ran to the park and it saw a bird", "the sky is blue",
           "a big red car is fast", "the small house is green"]
QUESTIONS = [("what is", "the capital of france"), ("where is", "rome"), ("who saw", "the bird in a tree"),
             ("is paris", "a city"), ("what is the capital of", "italy")]

HEADER = """
base: base
store: store
seed: 0
data:
  stories: {splits: {validation: stories.jsonl}, task: causal_lm}
  questions: {splits: {validation: questions.jsonl}, prompt: prompt}
models:
  alpha: {path: alpha, data: stories}
  beta: {path: beta, data: questions}
steps:
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The base, two perturbed copies of it (safetensors directories with the tokenizer), the data."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("iterative_lm")
    make_tiny_lm(root / "base", seed=0)
    for seed, name in enumerate(("alpha", "beta"), start=1):
        model = AutoModelForCausalLM.from_pretrained(root / "base")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        save_tokenizer(root / name)
    write_jsonl(root / "stories.jsonl", [{"text": t} for t in STORIES])
    write_jsonl(root / "questions.jsonl", [{"prompt": p, "text": " " + t} for p, t in QUESTIONS])
    return root


def runtime(project, steps: str) -> Runtime:
    (project / "lm.yaml").write_text(HEADER + steps)
    recipe = load_recipe(project / "lm.yaml")
    return Runtime(recipe, Store(recipe.resolve(recipe.spec.store)))


def sequences(project, task: str) -> list[tuple[list[int], int]]:
    """(token ids, index of the first scored token) per row, written out: BOS, then the prompt's
    tokens (not scored), then the text's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(project / "base")
    words = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if task == "alpha":
        return [([tok.bos_token_id, *words(t)], 1) for t in STORIES]
    return [([tok.bos_token_id, *words(p), *words(t)], 1 + len(words(p))) for p, t in QUESTIONS]


@functools.cache
def reference_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def loop_loss_and_grad(project, task: str, body: dict[str, torch.Tensor], loss: str):
    """The task's mean token loss at θ = body and its gradient: a fresh model loaded with θ, one
    unpadded sequence at a time, each scored token's −log p(token | before) (or the entropy of
    the next-token distribution) added up by a Python loop, divided by the token count."""
    model = reference_model(project / task)
    missing, _ = model.load_state_dict(body, strict=False)
    assert not [n for n in missing if n != "lm_head.weight"]  # every tensor is θ's (lm_head is tied)
    params = dict(model.named_parameters())
    total, count = 0.0, 0
    for ids, first in sequences(project, task):
        log_p = torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0], -1)
        for t in range(first, len(ids)):
            row = log_p[t - 1]
            total = total + (-row[ids[t]] if loss == "cross_entropy" else -(row.exp() * row).sum())
            count += 1
    mean = total / count
    grads = torch.autograd.grad(mean, [params[n] for n in body])
    return float(mean.detach()), dict(zip(body, grads))


def two_task_loss_and_grad(project, body, loss):
    """The objective over both tasks: the mean of their mean token losses."""
    a, b = (loop_loss_and_grad(project, t, body, loss) for t in ("alpha", "beta"))
    return (a[0] + b[0]) / 2, {n: (a[1][n] + b[1][n]) / 2 for n in body}


def weights(project, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(project / name / "model.safetensors")


# -- the objective ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["cross_entropy", "entropy"])
def test_token_objective_equals_a_loop_over_sequences_and_tokens(project, loss):
    rt = runtime(project, f"  ada: {{kind: adamerging, loss: {loss}, batch_size: 5, chunk_size: 2}}\n")
    (p,) = executor.plan_step(rt, "ada")
    kind, cfg = rt.recipe.kinds["adamerging"], rt.recipe.steps["ada"]
    plan = kind.tensor_plan(rt, cfg)
    base = kind.weights(rt, BASE, plan)
    objective = kind.objective(rt, cfg, p, plan, (loss,), 5)
    assert "model.embed_tokens.weight" in plan.merge and "lm_head.weight" not in plan.merge  # tied
    g = torch.Generator().manual_seed(3)
    theta = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    for task in ("alpha", "beta"):
        value, grad = objective(theta, 0, [task])
        ref_value, ref_grad = loop_loss_and_grad(project, task, theta, loss)
        assert value == pytest.approx(ref_value, rel=1e-5)
        for n in plan.merge:
            torch.testing.assert_close(grad[n], ref_grad[n], rtol=1e-4, atol=1e-6)
    # prompt tokens are not scored: a loss over every token would differ
    scored = sum(len(ids) - first for ids, first in sequences(project, "beta"))
    assert scored < sum(len(ids) - 1 for ids, _ in sequences(project, "beta"))


# -- the steps, end to end ---------------------------------------------------------------------------


def test_adamerging_on_lms_equals_adam_written_out(project):
    rt = runtime(project, """
  ada: {kind: adamerging, granularity: task, loss: cross_entropy, steps: 3, lr: 0.05, batch_size: 5,
        chunk_size: 2, max_length: 32}
""")
    assert {r.step: r.state for r in executor.run(rt)} == {"ada": "computed"}
    art = rt.store.open(rt.planned["ada"][0].key)
    assert art.meta["models"] == ["alpha", "beta"]
    base = weights(project, "base")
    names = art.meta["tensors"]
    taus = [{n: weights(project, m)[n] - base[n] for n in names} for m in ("alpha", "beta")]

    # Adam (β 0.9, 0.999; ε 1e-8) on the two coefficients, each gradient ⟨∂L/∂θ, τ_i⟩ from the loop
    coeffs, m, v, lr = [0.3, 0.3], [0.0, 0.0], [0.0, 0.0], 0.05
    for step in range(1, 4):
        theta = {n: base[n] + coeffs[0] * taus[0][n] + coeffs[1] * taus[1][n] for n in names}
        value, grad = two_task_loss_and_grad(project, theta, "cross_entropy")
        g = [sum(float((grad[n].double() * tau[n].double()).sum()) for n in names) for tau in taus]
        record = art.meta["trace"][step - 1]
        assert record["loss"] == pytest.approx(value, rel=1e-5)
        assert record["grad_norm"] == pytest.approx(math.hypot(*g), rel=1e-4)
        assert "accuracy" not in record and "task_accuracy" not in record  # a causal LM's has none
        before = list(coeffs)
        for i in range(2):
            m[i] = 0.9 * m[i] + 0.1 * g[i]
            v[i] = 0.999 * v[i] + 0.001 * g[i] ** 2
            update = lr * (m[i] / (1 - 0.9 ** step)) / (math.sqrt(v[i] / (1 - 0.999 ** step)) + 1e-8)
            coeffs[i] = min(max(coeffs[i] - update, 0.0), 1.0)
        if step == 1:  # Adam's first step moves each coefficient by lr against its gradient's sign
            assert [c - b for c, b in zip(coeffs, before)] == pytest.approx([-lr * math.copysign(1, x) for x in g])
    learned = art.get("coefficients")
    torch.testing.assert_close(learned, torch.tensor(coeffs, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    layer = "model.layers.1.mlp.down_proj.weight"
    expect = base[layer] + learned[0] * taus[0][layer] + learned[1] * taus[1][layer]
    torch.testing.assert_close(art.view("weights/").get(layer), expect, rtol=1e-5, atol=1e-6)


def cosine_scores(grad, candidates, names) -> list[float]:
    """FusionBench's oracle written out: Σ over tensors of cos(g_p, θ_s,p), tensors whose gradient
    norm is at most float32's epsilon times the largest left out."""
    norms = {n: float(grad[n].double().norm()) for n in names}
    voting = [n for n in names if norms[n] > torch.finfo(torch.float32).eps * max(norms.values())]
    return [sum(float(torch.dot(grad[n].double().flatten(), c[n].double().flatten()) /
                      (grad[n].double().norm() * c[n].double().norm())) for n in voting) for c in candidates]


def test_frank_wolfe_on_lms_equals_the_update_written_out(project):
    rt = runtime(project, """
  fw: {kind: frank_wolfe, init: base, max_iters: 2, step_size: 0.5, dataset_size: 5, chunk_size: 4,
       max_length: 32}
""")
    assert {r.step: r.state for r in executor.run(rt)} == {"fw": "computed"}
    art = rt.store.open(rt.planned["fw"][0].key)
    trace = art.meta["trace"]
    base = weights(project, "base")
    names = [n for n in base if n in art.names("weights/")]
    candidates = [weights(project, m) for m in ("alpha", "beta")]
    x = {n: base[n].clone() for n in names}
    for t in range(2):  # x ← x + γ_t (θ_s − x), γ_t = 2/(t+2)·0.5, s the oracle's pick at x
        value, grad = two_task_loss_and_grad(project, x, "cross_entropy")
        scores = cosine_scores(grad, candidates, names)
        assert abs(scores[0] - scores[1]) > 1e-3  # a clear pick, whatever the rounding
        pick = scores.index(min(scores))
        gamma = 2 / (t + 2) * 0.5
        assert trace[t]["chosen"] == ("alpha", "beta")[pick]
        assert trace[t]["loss"] == pytest.approx(value, rel=1e-5)
        assert trace[t]["step"] == pytest.approx(gamma)
        assert "accuracy" not in trace[t] and "task_accuracy" not in trace[t]
        x = {n: x[n] + gamma * (candidates[pick][n] - x[n]) for n in names}
    stored = art.view("weights/")
    for n in names:
        torch.testing.assert_close(stored.get(n), x[n], rtol=1e-5, atol=1e-6)


# -- mistakes ----------------------------------------------------------------------------------------


def with_data(project, name: str, old: str, new: str, entry: str, steps: str):
    """A variant of the recipe where model data `old` is replaced by a new entry `new`."""
    text = HEADER.replace(f"data: {old}}}", f"data: {new}}}").replace("data:\n", f"data:\n  {new}: {entry}\n", 1)
    (project / name).write_text(text + steps)
    return project / name


def test_multiple_choice_data_is_refused_naming_the_task(project):
    write_jsonl(project / "mc.jsonl", [{"text": "the sky is", "choices": ["blue", "red"], "label": 0}])
    recipe = with_data(project, "mc.yaml", "questions", "mc", "{splits: {validation: mc.jsonl}, choices: choices}",
                       "  ada: {kind: adamerging}\n")
    with pytest.raises(RecipeError, match="task 'beta' has multiple-choice data \\('mc'\\).*causal_lm data entry"):
        load_recipe(recipe)


def test_a_draw_with_no_token_to_predict_is_refused_naming_the_data(project):
    write_jsonl(project / "empty.jsonl", [{"text": ""}, {"text": ""}])
    recipe = load_recipe(with_data(project, "empty.yaml", "stories", "empty",
                                   "{splits: {validation: empty.jsonl}, task: causal_lm}",
                                   "  ada: {kind: adamerging, steps: 1, tasks: [alpha]}\n"))
    rt = Runtime(recipe, Store(recipe.resolve(recipe.spec.store)))
    with pytest.raises(DataError, match="Task 'alpha'.*data 'empty' \\(split 'validation'\\).*no token to predict"):
        executor.run(rt)
