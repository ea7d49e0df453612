"""slerp, nuslerp, model_stock, breadcrumbs, della and layer stacking against formulas written
plainly here (Python loops over coordinates, rows and pairs, in float64), plus the mistakes each
refuses. mergekit itself is compared in tests/test_mergekit_parity.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fmerge.errors import FmergeError
from fmerge.methods import MergeContext, TensorGroup, get_method
from fmerge.methods.base import tensor_seed
from fmerge.methods.breadcrumbs import breadcrumbs_mask
from fmerge.methods.della import keep_probabilities, magprune

from conftest import write_recipe


def run(method: str, params: dict, base, models, names=None, seed=0, name="w"):
    m = get_method(method)
    p = m.Params.model_validate(params)
    ctx = MergeContext(names or [f"m{i}" for i in range(len(models))], seed=seed)
    m.validate(p, ctx)
    group = TensorGroup(name, base.clone() if base is not None else None, [t.clone() for t in models])
    return m.merge(group, p, ctx)


def refused(method: str, params: dict, n_models: int) -> str:
    m = get_method(method)
    with pytest.raises(FmergeError) as info:
        m.validate(m.Params.model_validate(params), MergeContext([f"m{i}" for i in range(n_models)]))
    return str(info.value)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def ref_slerp(t, v0, v1, threshold=0.9995):
    """Textbook slerp of two flat lists, linear where |cos Ω| > threshold."""
    n0, n1 = math.sqrt(dot(v0, v0)), math.sqrt(dot(v1, v1))
    cos = max(-1.0, min(1.0, dot(v0, v1) / (n0 * n1)))
    if abs(cos) > threshold:
        return [(1 - t) * a + t * b for a, b in zip(v0, v1)]
    omega = math.acos(cos)
    return [(math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega) for a, b in zip(v0, v1)]


def vec(values):
    return torch.tensor(values, dtype=torch.float64)


def flat(t):
    return t.double().flatten().tolist()


# ----------------------------------------------------------------------------- slerp

def test_slerp_is_the_textbook_formula_per_tensor():
    torch.manual_seed(0)
    base, model = torch.randn(6, 5), torch.randn(6, 5)
    for t in (0.0, 0.3, 0.5, 1.0):
        got = run("slerp", {"t": t}, base, [model])
        want = vec(ref_slerp(t, flat(base), flat(model))).reshape(6, 5)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_slerp_of_parallel_tensors_is_linear():
    base = torch.randn(4, 3)
    got = run("slerp", {"t": 0.25}, base, [2.5 * base])
    torch.testing.assert_close(got, 0.75 * base + 0.25 * 2.5 * base)


def test_slerp_takes_one_model():
    assert "exactly one model" in refused("slerp", {"t": 0.5}, 2)


# ----------------------------------------------------------------------------- nuslerp

def ref_nuslerp_vectors(t, v0, v1):
    """mergekit's nuslerp of two vectors: the angle of the unit vectors, the raw vectors combined."""
    u0 = [x / max(math.sqrt(dot(v0, v0)), 1e-7) for x in v0]
    u1 = [x / max(math.sqrt(dot(v1, v1)), 1e-7) for x in v1]
    cos = max(-1.0, min(1.0, dot(u0, u1)))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * a + t * b for a, b in zip(v0, v1)]
    omega = math.acos(cos)
    return [(math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega) for a, b in zip(v0, v1)]


@pytest.mark.parametrize("over", ["tensor", "rows", "columns"])
@pytest.mark.parametrize("task_vectors", [True, False])
def test_nuslerp_interpolates_each_vector(over, task_vectors):
    torch.manual_seed(1)
    base, m1, m2 = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    got = run("nuslerp", {"weight": [1.0, 3.0], "over": over, "task_vectors": task_vectors}, base, [m1, m2])
    t = 3.0 / 4.0
    a, b = (m1 - base, m2 - base) if task_vectors else (m1, m2)
    a, b = a.double(), b.double()
    want = torch.zeros(4, 6, dtype=torch.float64)
    if over == "tensor":
        want = vec(ref_nuslerp_vectors(t, a.flatten().tolist(), b.flatten().tolist())).reshape(4, 6)
    elif over == "rows":
        for r in range(4):
            want[r] = vec(ref_nuslerp_vectors(t, a[r].tolist(), b[r].tolist()))
    else:
        for c in range(6):
            want[:, c] = vec(ref_nuslerp_vectors(t, a[:, c].tolist(), b[:, c].tolist()))
    if task_vectors:
        want += base.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_nuslerp_weights_summing_to_zero_take_the_midpoint():
    base, m1 = torch.zeros(3), torch.tensor([1.0, 0.0, 0.0])
    got = run("nuslerp", {"weight": [1.0, -1.0]}, base, [m1, 2 * m1])  # parallel: linear at t = 0.5
    torch.testing.assert_close(got, torch.tensor([1.5, 0.0, 0.0]))


def test_nuslerp_takes_two_models():
    assert "exactly two models" in refused("nuslerp", {}, 3)


# ----------------------------------------------------------------------------- model_stock

def ref_model_stock(base, models):
    w0 = flat(base)
    taus = [[x - b for x, b in zip(flat(m), w0)] for m in models]
    cosines = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            norms = math.sqrt(dot(taus[i], taus[i])) * math.sqrt(dot(taus[j], taus[j]))
            cosines.append(max(-1.0, min(1.0, dot(taus[i], taus[j]) / max(norms, 1e-6))))
    cos, n = sum(cosines) / len(cosines), len(models)
    t = 0.0 if abs(1 + (n - 1) * cos) < 1e-6 else n * cos / (1 + (n - 1) * cos)
    average = [sum(col) / n for col in zip(*(flat(m) for m in models))]
    return [t * a + (1 - t) * b for a, b in zip(average, w0)]


def test_model_stock_is_the_papers_interpolation():
    torch.manual_seed(2)
    base = torch.randn(5, 4)
    shared = torch.randn(5, 4)
    models = [base + shared + 0.5 * torch.randn(5, 4) for _ in range(3)]
    got = run("model_stock", {}, base, models)
    torch.testing.assert_close(got.double(), vec(ref_model_stock(base, models)).reshape(5, 4), rtol=1e-5, atol=1e-6)


def test_model_stock_filter_wise_takes_t_per_row():
    torch.manual_seed(3)
    base, models = torch.randn(3, 4), [torch.randn(3, 4) for _ in range(2)]
    got = run("model_stock", {"filter_wise": True}, base, models)
    for r in range(3):
        want = ref_model_stock(base[r], [m[r] for m in models])
        torch.testing.assert_close(got[r].double(), vec(want), rtol=1e-5, atol=1e-6)


def test_model_stock_keeps_the_base_where_task_vectors_cancel():
    base, tau = torch.randn(6), torch.randn(6)
    got = run("model_stock", {}, base, [base + tau, base - tau])  # cos = −1: 1 + (N − 1)·cos = 0
    torch.testing.assert_close(got, base)


def test_model_stock_needs_two_models():
    assert "at least two models" in refused("model_stock", {}, 1)


# ----------------------------------------------------------------------------- breadcrumbs

def ref_band(values, density, gamma):
    """Indices kept by rule exact: by magnitude, largest first, ties by lowest index; drop the top
    ⌊γn⌋ (fewer if needed to keep k = ⌈density·n⌉), keep the next k."""
    n = len(values)
    k = math.ceil(round(density * n, 9))
    top = min(math.floor(round(gamma * n, 9)), n - k)
    order = sorted(range(n), key=lambda j: (-abs(values[j]), j))
    return set(order[top:top + k])


def ref_band_mergekit(values, density, gamma):
    """mergekit 0.1.5's magnitude_outliers: its ascending torch.sort, the band below the top."""
    n = len(values)
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    ascending = torch.sort(torch.tensor([abs(v) for v in values], dtype=torch.float32)).indices.tolist()
    return set(ascending[bottom:bottom + keep])


@pytest.mark.parametrize("rule", ["exact", "mergekit"])
@pytest.mark.parametrize("density, gamma", [(0.5, 0.1), (0.3, 0.0), (0.9, 0.2), (0.25, 0.05)])
def test_breadcrumbs_keeps_the_band_below_the_outliers(rule, density, gamma):
    torch.manual_seed(4)
    tau = torch.randint(-6, 7, (7, 9)).float() / 4  # many equal magnitudes
    mask = breadcrumbs_mask(tau, density, gamma, rule)
    ref = ref_band if rule == "exact" else ref_band_mergekit
    assert set(mask.flatten().nonzero().flatten().tolist()) == ref(tau.flatten().tolist(), density, gamma)


def ref_ties_coordinate(entries, weights, merge):
    """rule exact's sign election at one coordinate: entries already scaled by λ·w."""
    total = sum(entries)
    sign = (total > 0) - (total < 0)
    agree = [(e, w) for e, w in zip(entries, weights) if e != 0 and ((e > 0) - (e < 0)) == sign]
    if sign == 0 or not agree:
        return 0.0
    mixed = sum(e for e, _ in agree)
    return mixed / sum(w for _, w in agree) if merge == "mean" else mixed


@pytest.mark.parametrize("combine, merge", [("task_arithmetic", "sum"), ("task_arithmetic", "mean"), ("ties", "mean"),
                                            ("ties", "sum")])
def test_breadcrumbs_combines_like_the_formula(combine, merge):
    torch.manual_seed(5)
    base = torch.randn(5, 6)
    models = [base + torch.randn(5, 6) for _ in range(3)]
    weights, lam, density, gamma = [0.5, 1.0, 0.25], 0.8, 0.6, 0.1
    got = run("breadcrumbs", {"density": density, "gamma": gamma, "weight": weights, "lambda": lam,
                              "combine": combine, "merge": merge}, base, models)
    taus = [flat(m - base) for m in models]
    kept = [ref_band(t, density, gamma) for t in taus]
    want = []
    for j, b in enumerate(flat(base)):
        entries = [lam * w * t[j] if j in k else 0.0 for t, k, w in zip(taus, kept, weights)]
        if combine == "ties":
            want.append(b + ref_ties_coordinate(entries, weights, merge))
        else:
            want.append(b + sum(entries) / (sum(weights) if merge == "mean" else 1))
    torch.testing.assert_close(got.double().flatten(), vec(want), rtol=1e-5, atol=1e-6)


def test_breadcrumbs_rescale_keeps_the_l1_norm():
    torch.manual_seed(6)
    base, model = torch.zeros(8, 8), torch.randn(8, 8)
    got = run("breadcrumbs", {"density": 0.5, "gamma": 0.1, "rescale": True}, base, [model])
    mask = torch.zeros(64)
    mask[list(ref_band(flat(model), 0.5, 0.1))] = 1
    kept = model.flatten() * mask
    torch.testing.assert_close(got.flatten(), kept * (model.abs().sum() / kept.abs().sum()))


def test_mean_with_weights_summing_to_zero_is_refused():
    assert "sum of the weights" in refused("breadcrumbs", {"weight": [1.0, -1.0], "merge": "mean"}, 2)


# ----------------------------------------------------------------------------- della

def test_della_keep_probabilities_rise_with_magnitude_rank_per_row():
    torch.manual_seed(7)
    tau = torch.randn(3, 5)
    probs = keep_probabilities(tau, 0.5, 0.2)
    for r in range(3):
        row = tau[r].tolist()
        order = sorted(range(5), key=lambda j: (abs(row[j]), j))
        for rank, j in enumerate(order):
            assert probs[r, j].item() == pytest.approx(0.3 + 0.4 * rank / 4)
    assert keep_probabilities(torch.tensor([2.0]), 0.5, 0.2).item() == pytest.approx(0.3)  # a one-entry row


def test_della_mask_is_the_documented_draw_and_rescale_is_per_entry():
    torch.manual_seed(8)
    base, model = torch.randn(4, 10), torch.randn(4, 10)
    got = run("della", {"density": 0.5, "epsilon": 0.1, "seed": 3}, base, [model], names=["a"], name="layer.w")
    tau = model - base
    probs = keep_probabilities(tau, 0.5, 0.1)
    generator = torch.Generator().manual_seed(tensor_seed(3, "layer.w", 0))
    keep = torch.rand(tau.shape, generator=generator) < probs
    torch.testing.assert_close(got, base + torch.where(keep, tau / probs, 0.0))


def test_della_rescale_is_unbiased():
    torch.manual_seed(9)
    tau = torch.randn(3, 6)
    mean = sum(magprune(tau, 0.4, 0.2, seed, rescale=True) for seed in range(3000)) / 3000
    torch.testing.assert_close(mean, tau, atol=0.15 * tau.abs().max().item(), rtol=0)


def test_della_ties_combines_the_pruned_task_vectors():
    torch.manual_seed(10)
    base = torch.randn(3, 4)
    models = [base + torch.randn(3, 4) for _ in range(2)]
    got = run("della", {"density": 0.6, "epsilon": 0.2, "weight": [1.0, 0.5], "seed": 1}, base, models, name="t")
    pruned = [flat(magprune(m - base, 0.6, 0.2, tensor_seed(1, "t", i), True)) for i, m in enumerate(models)]
    want = [b + ref_ties_coordinate([p[j] * w for p, w in zip(pruned, (1.0, 0.5))], [1.0, 0.5], "mean")
            for j, b in enumerate(flat(base))]
    torch.testing.assert_close(got.double().flatten(), vec(want), rtol=1e-5, atol=1e-6)


def test_della_density_and_epsilon_must_stay_inside_0_1():
    msg = refused("della", {"density": 0.2, "epsilon": 0.25}, 1)
    assert "density 0.2 ± epsilon 0.25" in msg and "between 0 and 1" in msg


# ----------------------------------------------------------------------------- layer stacking (passthrough slices)

def make_llamas(root, layers=3):
    """Two Llama-named checkpoints (a few tensors per layer, random values) with their config.json."""
    from safetensors.torch import save_file

    paths = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        tensors = {"model.embed_tokens.weight": torch.randn(32, 8), "model.norm.weight": torch.randn(8),
                   "lm_head.weight": torch.randn(32, 8)}
        for layer in range(layers):
            for part, shape in (("self_attn.o_proj.weight", (8, 8)), ("mlp.up_proj.weight", (16, 8)),
                                ("input_layernorm.weight", (8,))):
                tensors[f"model.layers.{layer}.{part}"] = torch.randn(shape)
        paths[name] = root / name
        paths[name].mkdir()
        save_file(tensors, str(paths[name] / "model.safetensors"), metadata={"format": "pt"})
        (paths[name] / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers,
                                                             "hidden_size": 8}))
    return paths


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_passthrough_slices_stack_and_renumber_layers(tmp_path):
    from fmerge import executor
    from fmerge.api import load_recipe
    from fmerge.runtime import Runtime
    from fmerge.store import Store

    paths = make_llamas(tmp_path)
    config = write_recipe(tmp_path, f"""merge_method: passthrough
slices:
  - sources: [{{model: {paths['a']}, layer_range: [0, 2]}}]
  - sources: [{{model: {paths['b']}, layer_range: [1, 3], parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}}}]
  - sources: [{{model: {paths['a']}, layer_range: [2, 3]}}]
dtype: float32
""", "stack.yml")
    executor.run(Runtime(load_recipe(config), Store(tmp_path / "store")))
    out, a, b = weights(tmp_path / "stack-merged"), weights(paths["a"]), weights(paths["b"])
    # hand-built: output layer -> (source weights, source layer, scale of o_proj)
    plan = {0: (a, 0, 1.0), 1: (a, 1, 1.0), 2: (b, 1, 0.5), 3: (b, 2, 0.5), 4: (a, 2, 1.0)}
    want = {"model.embed_tokens.weight": a["model.embed_tokens.weight"],  # the first slice's model
            "model.norm.weight": a["model.norm.weight"], "lm_head.weight": a["lm_head.weight"]}  # the last's
    for layer, (src, i, scale) in plan.items():
        for name, t in src.items():
            prefix = f"model.layers.{i}."
            if name.startswith(prefix):
                want[f"model.layers.{layer}.{name[len(prefix):]}"] = t * scale if "o_proj" in name else t
    assert sorted(out) == sorted(want)
    for name, t in want.items():
        assert torch.equal(out[name], t), name
    assert json.loads((tmp_path / "stack-merged" / "config.json").read_text())["num_hidden_layers"] == 5


@pytest.mark.parametrize("slices, expected", [
    ("  - sources: [{{model: {a}, layer_range: [0, 4]}}]\n", "goes past the model's 3 layers"),
    ("  - sources: [{{model: {a}, layer_range: [2, 1]}}]\n", "0 ≤ start < end"),
    ("  - sources: [{{model: {a}, layer_range: [0, 1]}}, {{model: {b}, layer_range: [0, 1]}}]\n", "one source per slice"),
    ("  - sources: [{{model: {a}, layers: [0, 1]}}]\n", "needs 'model' and 'layer_range'"),
    ("  - sources: [{{model: {a}, layer_range: [0, 1], parameters: {{weight: 1}}}}]\n", "only 'scale'"),
])
def test_bad_slices_are_named(tmp_path, slices, expected):
    from fmerge.api import load_recipe

    paths = make_llamas(tmp_path)
    config = write_recipe(tmp_path, "merge_method: passthrough\nslices:\n" + slices.format(**paths), "bad.yml")
    with pytest.raises(FmergeError) as info:
        load_recipe(config)
    assert expected in str(info.value) and "bad.yml:" in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
     "      - {{model: {b}, layer_range: [0, 2]}}\nparameters: {{t: 0.5}}\n", "cover all of their model's layers"),
    ("merge_method: passthrough\nmodels:\n  - model: {a}\n", "has no 'slices'"),
    ("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {b}\n", "slerp needs 't'"),
    ("merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\ntokenizer_source: union\n",
     "embedding and output rows would have to be re-mapped"),
    ("merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\ntokenizer: {{source: union}}\n",
     "'tokenizer' block is not supported"),
])
def test_mergekit_configs_fmerge_refuses_say_why(tmp_path, text, expected):
    from fmerge.api import load_recipe

    paths = make_llamas(tmp_path)
    config = write_recipe(tmp_path, text.format(**paths), "bad.yml")
    with pytest.raises(FmergeError) as info:
        load_recipe(config)
    assert expected in str(info.value)
