"""The K-FAC factors against a plain per-example loop, and the kfac step on a tiny project.

The reference runs one unpadded example at a time with hooks that keep every linear layer's input
and output: A sums a aᵀ over the example's tokens, G sums, per log-likelihood term (weighted as the
estimator weighs it), g gᵀ of the output gradients that one backward pass of that term gives.
Both in float64, as fmerge accumulates them, so that the factors are positive semi-definite.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _fisher_dist_worker import tiny_bert
from test_fisher import LAYOUTS, classifier_terms, make_examples, pad_batches
from fmerge.errors import FmergeError
from fmerge.kfac import kfac_factors


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def loop_kfac(model, examples, terms):
    """Per example: hooks keep each nn.Linear's input and output; one backward pass per term."""
    model.eval()
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    a_sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    g_sums = {n: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for n, m in linears.items()}
    rows = {n: 0 for n in linears}
    for e in examples:
        seen = {}
        handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
                   for n, m in linears.items()]
        logits = model(**{k: e[k][None] for k in ("input_ids", "token_type_ids") if k in e}).logits[0]
        for h in handles:
            h.remove()
        for n, (x, _) in seen.items():
            x = x.detach().reshape(-1, x.shape[-1]).double()
            a_sums[n] += x.T @ x
            rows[n] += x.shape[0]
        names = list(seen)
        for weight, term in terms(logits, e):
            grads = torch.autograd.grad(term, [seen[n][1] for n in names], retain_graph=True, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    g = g.reshape(-1, g.shape[-1]).double()
                    g_sums[n] += weight * (g.T @ g)
    return {n: (a_sums[n] / rows[n], g_sums[n] / len(examples)) for n in linears}


@pytest.mark.parametrize("estimator,samples", [("exact", 1), ("empirical", 1), ("sampled", 3)])
def test_factors_equal_the_per_example_loop(estimator, samples):
    model = tiny_bert(hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    model.bert.embeddings.requires_grad_(False)
    examples = make_examples()
    reference = loop_kfac(model, examples, classifier_terms(estimator, samples, seed=5))
    model.train()  # the estimator must switch dropout off, and restore the mode and the flags
    for batch_size, chunk_size, extra in LAYOUTS:
        sums = kfac_factors(model, pad_batches(examples, batch_size, extra), estimator, samples=samples, seed=5,
                            chunk_size=chunk_size)
        assert (sums.count, sums.examples) == (len(examples), len(examples))
        factors = sums.factors()
        assert factors.keys() == reference.keys()
        for n, (a_ref, g_ref) in reference.items():
            a, g = factors[n]
            torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6 * float(a_ref.abs().max()))
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6 * float(g_ref.abs().max()) + 1e-12)
            for k in (a, g):  # positive semi-definite up to float64 rounding (fp32 sums: about -1e-7 × largest)
                values = torch.linalg.eigvalsh(k)
                assert float(values.min()) >= -1e-12 * float(values.max())
        assert model.training and not any(p.requires_grad for p in model.bert.embeddings.parameters())


def test_input_factor_is_the_gram_per_row():
    from fmerge.gram import gram_matrices

    model = tiny_bert(hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    examples = make_examples()
    grams = gram_matrices(model, pad_batches(examples, 4, 2))
    factors = kfac_factors(model, pad_batches(examples, 4, 2), "exact")
    for n, g in grams.grams.items():
        assert factors.rows[n] == grams.rows[n]
        # the Gram is summed in fp32, A in float64: equal to fp32 rounding
        torch.testing.assert_close(factors.factors()[n][0], g.double() / grams.rows[n], rtol=1e-6, atol=1e-7)


def test_estimator_errors_are_clear():
    model = tiny_bert(hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    with pytest.raises(FmergeError, match="fusionbench"):
        kfac_factors(model, [], "fusionbench")
    with pytest.raises(FmergeError, match="no examples"):
        kfac_factors(model, [], "exact").factors()


# --- the kfac step and a MaTS merge on a tiny project ------------------------------------------

STEPS = """
  kfac: {kind: kfac, models: [sentiment, animal], examples: 8, max_length: 16, batch_size: 4, chunk_size: 3}
  fishers: {kind: fisher, models: [sentiment, animal], examples: 8, max_length: 16}
  mats: {kind: merge, method: mats, models: [sentiment, animal], kfac: kfac, fisher: fishers}
"""


def test_kfac_step_and_mats_merge(tmp_path):
    from _iterative_project import HEADER, build, run
    from fmerge.data import encode_batches
    from fmerge.tasks import build_task_model, data_spec, load_subset, load_tokenizer

    project = build(tmp_path)
    recipe = project / "mats.yaml"
    recipe.write_text(HEADER + STEPS)
    rt, states, _ = run(recipe)
    assert states == {"kfac": "computed", "fishers": "computed", "mats": "computed"}
    arts = {p.label: rt.store.open(p.key) for p in rt.planned["kfac"]}
    layer = "bert.encoder.layer.0.attention.self.query.weight"

    # the stored factors: the per-example loop on the same rows, one unpadded example at a time
    p = rt.planned["kfac"][0]
    model = build_task_model(rt, p.label)
    rows = load_subset(rt, p.extra["data"], p.params["split"], p.params["examples"], p.params["seed"]).rows
    spec = data_spec(rt, p.extra["data"], p.params["split"])
    examples = []
    for b in encode_batches(load_tokenizer(rt, p.label), rows, spec, 1, 16):
        examples.append({"input_ids": b["input_ids"][0]})
    a_ref, g_ref = loop_kfac(model, examples, classifier_terms("exact"))[layer]
    torch.testing.assert_close(arts[p.label].get("kfac_a/" + layer), a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(arts[p.label].get("kfac_g/" + layer), g_ref, rtol=1e-4, atol=1e-9)
    assert arts[p.label].meta["examples"] == 8 and arts[p.label].meta["estimator"] == "exact"

    assert arts[p.label].dtype("kfac_a/" + layer) == torch.float64

    # at the default parameters, every merged linear layer (base naming) is the damped Kronecker
    # system solved densely here, δ = 1e-2 (the K-FAC default), though 8 examples leave factors singular
    merged = rt.store.open(rt.planned["mats"][0].key)
    models = ("sentiment", "animal")

    def damp(k):
        return k + 1e-2 * k.diagonal().mean() * torch.eye(k.shape[0], dtype=torch.float64)

    layers = [n.removeprefix("kfac_a/") for n in arts["sentiment"].names()
              if n.startswith("kfac_a/bert.")]  # the classifier heads are each model's own, not merged
    pooler = arts["sentiment"].get("kfac_a/bert.pooler.dense.weight")
    assert int(torch.linalg.matrix_rank(pooler)) < pooler.shape[0]  # rank-deficient: 8 [CLS] rows
    records = merged.meta["diagnostics"]["mats"]
    for layer in layers:
        ref = layer.removeprefix("bert.")
        a = [damp(arts[m].get("kfac_a/" + layer)) for m in models]
        g = [damp(arts[m].get("kfac_g/" + layer)) for m in models]
        w = [rt.source(m).get(layer).double() for m in models]
        m_dense = sum(torch.kron(x, y) for x, y in zip(a, g))
        rhs = sum(torch.kron(x, y) @ wi.T.reshape(-1) for x, y, wi in zip(a, g, w))
        expect = torch.linalg.solve(m_dense, rhs)
        got = merged.view("weights/").get(ref).double().T.reshape(-1)
        assert float((got - expect).norm() / expect.norm()) <= 1e-3, layer
        true_residual = float((rhs - m_dense @ got).norm() / rhs.norm())
        assert records[ref]["residual"] == pytest.approx(true_residual, rel=1e-6), layer
        assert records[ref]["residual"] < 1e-6 < records[ref]["residual_init"]
    # a bias has no K-FAC factors: the damped diagonal Fisher system (δ = 1e-2 of the tensor's mean Fisher)
    bias = "encoder.layer.0.attention.self.value.bias"
    fishers = {p.label: rt.store.open(p.key) for p in rt.planned["fishers"]}
    f = [fishers[m].get("fisher/bert." + bias).double() for m in models]
    f = [x + 1e-2 * x.mean() for x in f]
    b = [rt.source(m).get("bert." + bias).double() for m in models]
    torch.testing.assert_close(merged.view("weights/").get(bias).double(), (f[0] * b[0] + f[1] * b[1]) / (f[0] + f[1]),
                               rtol=1e-6, atol=1e-7)
    assert records[bias]["curvature"] == "diagonal"


def test_recipe_errors_name_the_kfac_key(tmp_path):
    from _iterative_project import HEADER, build
    from fmerge.api import load_recipe

    recipe = build(tmp_path) / "bad.yaml"
    for steps, message in [
        ("  m: {kind: merge, method: mats, params: {curvature: kfac}}\n",
         r"steps.m: method 'mats' needs K-FAC factors: add 'kfac: <name"),
        ("  k: {kind: kfac}\n  m: {kind: merge, method: task_arithmetic, kfac: k}\n",
         r"steps.m.kfac: method 'task_arithmetic' does not use K-FAC"),
        ("  k: {kind: kfac, estimator: exakt}\n", r"steps.k.estimator: unknown K-FAC estimator 'exakt'; did you mean 'exact'"),
        ("  m: {kind: merge, method: mats, params: {curvature: gram, init: mats}}\n", r"'init' cannot be 'mats'"),
    ]:
        recipe.write_text(HEADER + steps)
        with pytest.raises(FmergeError, match=message):
            load_recipe(recipe)
