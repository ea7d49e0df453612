"""RegMean: the Gram estimator against a per-token loop, the merge against the dense closed form,
its jitter fall-back, and the gram step + merge through a tiny recipe (Grams cached across α)."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import tiny_bert_config
from test_pipeline import two_task_project, two_task_recipe
from fmerge import executor
from fmerge.errors import FmergeError
from fmerge.gram import IN_OUT, OUT_IN, gram_matrices, linear_layers
from fmerge.methods import MergeContext, TensorGroup, get_method
from fmerge.methods.regmean import RegMeanJitterWarning
from fmerge.api import load_recipe
from fmerge.runtime import Runtime
from fmerge.store import Store

LENGTHS = [5, 9, 3, 12, 7, 4]


def examples(seed: int = 3, vocab: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, vocab, (n,), generator=g),
             "token_type_ids": torch.randint(0, 2, (n,), generator=g)} for n in LENGTHS]


def padded_batches(exs: list[dict], batch_size: int, extra: int):
    """Right-padded batches (pad id 0); `extra` pads even each batch's longest example."""
    for start in range(0, len(exs), batch_size):
        chunk = exs[start : start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk) + extra
        ids, types, mask = (torch.zeros(len(chunk), width, dtype=torch.long) for _ in range(3))
        for row, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[row, :n], types[row, :n], mask[row, :n] = e["input_ids"], e["token_type_ids"], 1
        yield {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": torch.zeros(len(chunk))}


def loop_grams(model, exs: list[dict], token_types: bool = True):
    """Brute force: each example alone (no padding at all), each input row added as an outer product."""
    model.eval()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(args[0].detach()))
             for name, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
    grams, rows = {}, {}
    try:
        for e in exs:
            seen.clear()
            seen.update({name: [] for name, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")})
            inputs = {"input_ids": e["input_ids"][None]}
            if token_types:
                inputs["token_type_ids"] = e["token_type_ids"][None]
            with torch.no_grad():
                model(**inputs)
            for name, xs in seen.items():
                key = name + ".weight"
                for x in xs:
                    for row in x.reshape(-1, x.shape[-1]).double():
                        grams[key] = grams.get(key, 0) + torch.outer(row, row)
                        rows[key] = rows.get(key, 0) + 1
    finally:
        for h in hooks:
            h.remove()
    return grams, rows


def assert_grams_match(sums, ref_grams, ref_rows):
    assert set(sums.grams) == set(ref_grams)
    for name, ref in ref_grams.items():
        err = float((sums.grams[name].double() - ref).norm() / ref.norm())
        assert err < 1e-5, (name, err)
        assert sums.rows[name] == ref_rows[name], name


@pytest.mark.parametrize("batch_size,extra", [(6, 0), (2, 3), (4, 1)])
def test_bert_grams_equal_per_token_loop_and_ignore_padding(batch_size, extra):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    exs = examples()
    sums = gram_matrices(model, padded_batches(exs, batch_size, extra))
    ref_grams, ref_rows = loop_grams(model, exs)
    assert_grams_match(sums, ref_grams, ref_rows)
    assert sums.rows["bert.encoder.layer.0.attention.self.query.weight"] == sum(LENGTHS)  # tokens
    assert sums.rows["bert.pooler.dense.weight"] == sums.rows["classifier.weight"] == len(LENGTHS)  # examples
    assert set(sums.layouts.values()) == {OUT_IN} and sums.examples == len(LENGTHS)


def test_gpt2_conv1d_grams_equal_per_token_loop():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                 attn_implementation="eager"))
    exs = examples()
    batches = ({k: v for k, v in b.items() if k != "token_type_ids"} for b in padded_batches(exs, 4, 2))
    sums = gram_matrices(model, batches)
    ref_grams, ref_rows = loop_grams(model, exs, token_types=False)
    assert_grams_match(sums, ref_grams, ref_rows)
    assert sums.layouts["h.0.attn.c_attn.weight"] == IN_OUT
    assert sums.grams["h.0.mlp.c_proj.weight"].shape == (64, 64)  # in = 4 × n_embd, the weight is in × out


def test_grams_restore_training_mode_and_accept_a_filter():
    from transformers import BertModel

    model = BertModel(tiny_bert_config()).train()
    sums = gram_matrices(model, padded_batches(examples(), 3, 0), layer_filter=lambda n: "query" in n)
    assert model.training
    assert sorted(sums.grams) == [f"encoder.layer.{i}.attention.self.query.weight" for i in range(2)]
    assert len(linear_layers(model)) == 2 * 6 + 1


# ---------------------------------------------------------------------------------------------
# The merge against the dense closed form


def random_problem(n_models=3, n_in=6, n_out=4, rows=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n_out, n_in, generator=g) for _ in range(n_models)]  # nn.Linear: out × in
    xs = [torch.randn(rows, n_in, generator=g) * torch.linspace(0.2, 3, n_in) for _ in range(n_models)]
    return weights, xs


def regmean(weights, grams, *, layout="gram", rows=None, **params):
    method = get_method("regmean")
    stats = {layout: grams}
    if rows is not None:
        stats["gram_rows"] = [torch.tensor([float(r)]) for r in rows]
    group = TensorGroup("layer.weight", None, weights, stats)
    return method.merge(group, method.Params(**params), MergeContext([f"m{i}" for i in range(len(weights))]))


def closed_form(weights, grams, alpha, jitter=0.0):
    """(Σ G̃_i + λI) Wᵀ = Σ G̃_i W_iᵀ + λ W̄ᵀ, G̃ = α G + (1 − α) diag G, λ = jitter · mean diag Σ G̃,
    solved densely in float64."""
    shrunk = [alpha * g.double() + (1 - alpha) * torch.diag(torch.diag(g.double())) for g in grams]
    lhs = sum(shrunk)
    lam = jitter * float(lhs.diagonal().mean())
    rhs = sum(s @ w.double().T for s, w in zip(shrunk, weights)) + lam * torch.stack(weights).double().mean(0).T
    return torch.linalg.solve(lhs + lam * torch.eye(len(lhs), dtype=torch.float64), rhs).T


@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
def test_merge_equals_dense_closed_form(alpha):
    weights, xs = random_problem()
    grams = [x.T @ x for x in xs]
    merged = regmean(weights, grams, alpha=alpha)
    assert merged.shape == weights[0].shape and merged.dtype == torch.float32
    torch.testing.assert_close(merged.double(), closed_form(weights, grams, alpha), rtol=1e-5, atol=1e-6)


def test_alpha_one_is_least_squares_and_alpha_zero_a_per_input_weighted_average():
    weights, xs = random_problem()
    grams = [x.T @ x for x in xs]
    exact = regmean(weights, grams, alpha=1.0).double()
    # α = 1: the gradient of Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² vanishes at the merge
    grad = sum(x.double().T @ (x.double() @ (exact - w.double()).T) for x, w in zip(xs, weights))
    assert float(grad.abs().max()) < 1e-6 * float(sum(g.abs().max() for g in grams))
    # α = 0: column j is Σ_i G_i[j, j] W_i[:, j] / Σ_i G_i[j, j]
    diagonal = regmean(weights, grams, alpha=0.0)
    for j in range(weights[0].shape[1]):
        energy = [float(g[j, j]) for g in grams]
        expected = sum(e * w[:, j] for e, w in zip(energy, weights)) / sum(energy)
        torch.testing.assert_close(diagonal[:, j], expected, rtol=1e-5, atol=1e-6)
    assert float((exact - diagonal.double()).abs().max()) > 1e-2  # the off-diagonals matter here


def test_equal_grams_give_the_plain_average_and_tensors_without_grams_are_averaged():
    weights, xs = random_problem()
    same = [xs[0].T @ xs[0]] * 3
    average = torch.stack(weights).mean(0)
    for alpha in (0.0, 0.5, 1.0):
        torch.testing.assert_close(regmean(weights, same, alpha=alpha), average, rtol=1e-5, atol=1e-6)
    method = get_method("regmean")
    biases = [torch.randn(4) for _ in range(3)]
    out = method.merge(TensorGroup("layer.bias", None, biases), method.Params(), MergeContext(["a", "b", "c"]))
    torch.testing.assert_close(out, torch.stack(biases).mean(0))


def test_in_out_layout_of_conv1d_weights():
    weights, xs = random_problem()
    grams = [x.T @ x for x in xs]
    transposed = [w.T.contiguous() for w in weights]  # Conv1D stores in × out
    merged = regmean(transposed, grams, layout="gram_in_out", alpha=0.6)
    torch.testing.assert_close(merged.double(), closed_form(weights, grams, 0.6).T, rtol=1e-5, atol=1e-6)


def test_normalize_divides_each_gram_by_its_rows():
    weights, xs = random_problem()
    grams = [x.T @ x for x in xs]
    rows = [20, 5, 80]
    merged = regmean(weights, grams, rows=rows, alpha=0.6, normalize=True)
    expected = closed_form(weights, [g / r for g, r in zip(grams, rows)], 0.6)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(FmergeError, match="row count"):
        regmean(weights, grams, alpha=0.6, normalize=True)


def test_singular_gram_raises_the_jitter_and_dead_inputs_take_the_average():
    weights, xs = random_problem()
    dead = 2
    for x in xs:
        x[:, dead] = 0  # no model's data ever reaches input feature 2: Σ G is singular
    grams = [x.T @ x for x in xs]
    with pytest.warns(RegMeanJitterWarning, match="layer.weight.*jitter 1e-06"):
        merged = regmean(weights, grams, alpha=1.0, jitter=0.0)
    # the documented outcome: the ridge toward the plain average at the first rung, jitter 1e-6
    torch.testing.assert_close(merged.double(), closed_form(weights, grams, 1.0, 1e-6), rtol=1e-5, atol=1e-6)
    average = torch.stack(weights).double().mean(0)
    # so the dead input's column is the plain average, the others nearly the exact merge without it
    torch.testing.assert_close(merged[:, dead].double(), average[:, dead], rtol=1e-5, atol=1e-6)
    live = [j for j in range(weights[0].shape[1]) if j != dead]
    reduced = closed_form([w[:, live] for w in weights], [g[live][:, live] for g in grams], 1.0)
    torch.testing.assert_close(merged[:, live].double(), reduced, rtol=1e-3, atol=1e-3)
    # the default relative jitter (1e-8) already makes the system definite: no warning, a smaller bias
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = regmean(weights, grams, alpha=1.0)
    torch.testing.assert_close(default[:, dead].double(), average[:, dead], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(default[:, live].double(), reduced, rtol=1e-5, atol=1e-5)


def test_all_zero_grams_give_the_average_and_invalid_grams_an_error():
    weights, xs = random_problem()
    zeros = [torch.zeros(6, 6)] * 3
    torch.testing.assert_close(regmean(weights, zeros), torch.stack(weights).mean(0))
    bad = [xs[0].T @ xs[0], torch.full((6, 6), float("nan")), xs[2].T @ xs[2]]
    with pytest.raises(FmergeError, match="layer.weight.*NaN"):
        regmean(weights, bad)
    with pytest.raises(FmergeError, match="inputs"):
        regmean(weights, [torch.eye(5)] * 3)
    with pytest.raises(FmergeError, match="negative diagonal"):
        regmean(weights, [-torch.eye(6)] * 3)
    indefinite = torch.eye(6) + 2 * torch.eye(6).roll(1, 0) + 2 * torch.eye(6).roll(-1, 0)  # eigenvalue -3
    with pytest.raises(FmergeError, match="not solvable even with relative jitter 0.01"):
        regmean(weights, [indefinite] * 3, alpha=1.0)


# ---------------------------------------------------------------------------------------------
# Through a recipe: gram step, merge step, reuse of cached Grams


RECIPE = two_task_recipe("path: models/{}", """\
  grams: {kind: gram, examples: 24, max_length: 16, batch_size: 5}
  regmean: {kind: merge, method: regmean, gram: grams, params: {alpha: ALPHA}}
""")


def make_project(tmp_path, arch: str = "bert"):
    """Word-level tokenizer and two tasks as in test_pipeline; fine-tuned models are the base plus
    noise with a task head ('bert.' / 'transformer.' prefixed, as Hugging Face saves them)."""
    from transformers import (BertForSequenceClassification, BertModel, GPT2Config,
                              GPT2ForSequenceClassification, GPT2Model)

    from test_pipeline import WORDS

    two_task_project(tmp_path)
    vocab = 5 + len(WORDS)
    if arch == "gpt2":
        def config(**kw):
            return GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0,
                              attn_implementation="eager", **kw)

        torch.manual_seed(0)
        base = GPT2Model(config())
        base.save_pretrained(tmp_path / "base")  # replaces tiny_base's BERT weights, keeps its tokenizer
        classifier, body = (lambda labels: GPT2ForSequenceClassification(config(num_labels=labels))), "transformer"
    else:
        base = BertModel.from_pretrained(tmp_path / "base")
        classifier = lambda labels: BertForSequenceClassification(tiny_bert_config(vocab_size=vocab, num_labels=labels))
        body = "bert"
    for i, (name, labels) in enumerate((("sentiment", 2), ("animal", 3))):
        torch.manual_seed(10 + i)
        model = classifier(labels)
        getattr(model, body).load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in getattr(model, body).parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(tmp_path / "models" / name)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.replace("ALPHA", "0.6"))
    return recipe


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def run(recipe):
    r = load_recipe(recipe)
    rt = Runtime(r, Store(r.resolve(r.spec.store)))
    return rt, {rep.step: rep.state for rep in executor.run(rt)}


def test_recipe_gram_step_and_regmean_merge(project):
    from fmerge.data import encode_batches
    from fmerge.tasks import build_classifier, data_spec, load_subset, load_tokenizer

    rt, states = run(project)
    assert states == {"grams": "computed", "regmean": "computed"}
    grams = {p.label: rt.store.open(p.key) for p in rt.planned["grams"]}
    merged = rt.store.open(rt.planned["regmean"][0].key).view("weights/")

    # the step's Grams: every linear layer of the classifier, padding left out (same as unpadded batches)
    model = build_classifier(rt, "sentiment")
    art = grams["sentiment"]
    assert set(art.names("gram/")) == {n for n in linear_layers(model)}
    assert art.names("gram_in_out/") == []
    g = rt.planned["grams"][0]
    rows = load_subset(rt, g.extra["data"], g.params["split"], g.params["examples"], g.params["seed"]).rows
    spec = data_spec(rt, "sentiment", "train")
    one_by_one = gram_matrices(model, encode_batches(load_tokenizer(rt, "sentiment"), rows, spec, 1, 16))
    for name in ("bert.encoder.layer.1.output.dense.weight", "bert.pooler.dense.weight"):
        torch.testing.assert_close(art.get("gram/" + name), one_by_one.grams[name], rtol=1e-5, atol=1e-4)
        assert int(art.get("gram_rows/" + name)) == one_by_one.rows[name]
    assert art.meta["examples"] == 24

    # merged linear weight (base naming) = closed form from the stored Grams (model naming, 'bert.' prefix)
    ref = "encoder.layer.0.attention.self.query.weight"
    weights = [rt.source(m).get("bert." + ref) for m in ("sentiment", "animal")]
    g = [grams[m].get("gram/bert." + ref) for m in ("sentiment", "animal")]
    torch.testing.assert_close(merged.get(ref).double(), closed_form(weights, g, 0.6, 1e-8), rtol=1e-5, atol=1e-6)
    bias = "encoder.layer.0.attention.self.query.bias"
    torch.testing.assert_close(merged.get(bias), (rt.source("sentiment").get("bert." + bias)
                                                  + rt.source("animal").get("bert." + bias)) / 2)
    assert not any("classifier" in n for n in merged.names())

    # another α: only the merge is computed; every Gram comes from the store
    project.write_text(RECIPE.replace("ALPHA", "1.0"))
    rt2, states = run(project)
    assert states == {"grams": "cached", "regmean": "computed"}
    again = rt2.store.open(rt2.planned["regmean"][0].key).view("weights/")
    torch.testing.assert_close(again.get(ref).double(), closed_form(weights, g, 1.0, 1e-8), rtol=1e-5, atol=1e-6)


def test_recipe_with_gpt2_conv1d_layers(tmp_path):
    """Conv1D stores its weight in × out: its Grams go to gram_in_out/ and are solved without the
    transpose, under the base's naming ('h.0...') while the models say 'transformer.h.0...'."""
    rt, states = run(make_project(tmp_path, "gpt2"))
    assert states == {"grams": "computed", "regmean": "computed"}
    grams = {p.label: rt.store.open(p.key) for p in rt.planned["grams"]}
    assert "transformer.h.0.attn.c_attn.weight" in grams["animal"].names("gram_in_out/")
    assert grams["animal"].names("gram/") == ["score.weight"]  # the head: an nn.Linear
    merged = rt.store.open(rt.planned["regmean"][0].key).view("weights/")
    for ref in ("h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight"):
        weights = [rt.source(m).get("transformer." + ref).T for m in ("sentiment", "animal")]  # as out × in
        g = [grams[m].get("gram_in_out/transformer." + ref) for m in ("sentiment", "animal")]
        torch.testing.assert_close(merged.get(ref).double(), closed_form(weights, g, 0.6, 1e-8).T,
                                   rtol=1e-5, atol=1e-6)


def test_recipe_errors_name_the_gram_key(project):
    text = RECIPE.replace("ALPHA", "0.6")
    project.write_text(text.replace("gram: grams, ", ""))
    with pytest.raises(FmergeError, match=r"steps.regmean: method 'regmean' needs Gram matrices"):
        load_recipe(project)
    project.write_text(text.replace("method: regmean", "method: simple_average").replace(", params: {alpha: 0.6}", ""))
    with pytest.raises(FmergeError, match=r"steps.regmean.gram: method 'simple_average' does not use Gram"):
        load_recipe(project)
    project.write_text(text.replace("gram: grams", "gram: gramz"))
    with pytest.raises(FmergeError, match=r"no step named 'gramz'; did you mean 'grams'"):
        load_recipe(project)
    project.write_text(text.replace("alpha: 0.6", "alpha: 1.5"))
    with pytest.raises(FmergeError, match=r"steps.regmean.params.alpha"):
        load_recipe(project)
