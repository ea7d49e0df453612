"""mergekit configs read by `fmerge run`, checked against mergekit's documented semantics.

Tiny Llama-shaped models (3 layers, bf16) are merged through the whole pipeline; the expected
tensors are computed densely here, one tensor at a time, from mergekit's definitions: a list is
interpolated over layer depth t = layer / (layers − 1) (t = 0 outside the layers), a `{filter,
value}` list takes the first entry whose filter is a substring of the tensor name, and
linear = Σ wθ / Σ w; TIES = θ0 + λ·Σ_agree w·trim(τ) / Σ_agree w; DARE-TIES the same with random
drop (fmerge's documented mask) and 1/density rescale, summed (normalize: false). Converted
configs use `rule: mergekit`, so mergekit's own trim and sign election are written out here (see
magnitude_trim, consensus), ties at the cut and exactly zero sign sums included (bf16 makes both
frequent).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fmerge.errors import FmergeError
from fmerge.methods.base import tensor_seed
from fmerge.api import load_recipe

from conftest import fmerge_cli, write_recipe

LAYERS = 3


def make_llama_zoo(root: Path, cfg=None, noise: float = 0.01, dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """A random Llama base (`cfg`; default hidden 16, LAYERS layers) and three fine-tunes m1..m3
    (base + noise·N(0, 1)) in `dtype`, saved under root; {name: directory}."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = cfg or LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(dtype)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i in range(1, 4):
        model = LlamaForCausalLM(cfg).to(dtype)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        paths[f"m{i}"] = root / f"m{i}"
        model.save_pretrained(paths[f"m{i}"])
    return paths


@pytest.fixture(scope="module")
def llama_zoo(tmp_path_factory) -> dict[str, Path]:
    return make_llama_zoo(tmp_path_factory.mktemp("llama"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# ----------------------------------------------------------------------------- mergekit semantics, plainly

def depth(name: str) -> float:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) / (LAYERS - 1)
    return 0.0


def setting(value, name: str):
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        for entry in value:
            if "filter" not in entry or entry["filter"] in name:
                return setting(entry["value"], name)
        raise AssertionError("no filter matched")
    if isinstance(value, list):
        scaled = depth(name) * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        return (1 - (scaled - i0)) * value[i0] + (scaled - i0) * value[i1]
    return value


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit 0.1.5's magnitude trim: k = max(1, ⌊density·n⌋), the first k of a descending
    argsort of the fp32 magnitudes on the CPU (its order among tied magnitudes included)."""
    k = max(1, int(density * tau.numel()))
    kept = torch.zeros(tau.numel(), dtype=torch.bool)
    kept[torch.argsort(tau.abs().flatten().float(), descending=True)[:k]] = True
    return torch.where(kept.reshape(tau.shape), tau, 0.0)


def consensus(deltas: list[torch.Tensor], ws: list[float], normalize: bool) -> torch.Tensor:
    # mergekit elects + where the weighted deltas sum to exactly 0 (frequent with bf16 inputs)
    sign = torch.where(sum(deltas) >= 0, 1.0, -1.0)
    mixed = sum(torch.where(torch.sign(d) == sign, d, 0.0) for d in deltas)
    if not normalize:
        return mixed
    divisor = sum(torch.where(torch.sign(d) == sign, w, 0.0) for d, w in zip(deltas, ws))
    return mixed / torch.where(divisor == 0, 1.0, divisor)


def assert_bf16_of(got: torch.Tensor, expected_fp32: torch.Tensor, name: str) -> None:
    """Written in bf16, equal to the fp32 result rounded to bf16 (one ulp of slack for fp32 order)."""
    assert got.dtype == torch.bfloat16, name
    want = expected_fp32.to(torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6, msg=name)
    assert (got == want).float().mean() > 0.95, f"{name}: bf16 output is not the rounded fp32 merge"


def run_config(tmp_path: Path, text: str, name: str = "merge.yml") -> dict[str, torch.Tensor]:
    from fmerge import executor
    from fmerge.runtime import Runtime
    from fmerge.store import Store

    config = write_recipe(tmp_path, text, name)
    executor.run(Runtime(load_recipe(config), Store(tmp_path / "store")))
    return weights(tmp_path / f"{Path(name).stem}-merged")


def inputs(zoo):
    return weights(zoo["base"]), [weights(zoo[f"m{i}"]) for i in (1, 2, 3)]


# ----------------------------------------------------------------------------- three example configs

LINEAR = """
models:
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: [0.2, 1.0]}}
  - model: {m3}
    parameters:
      weight:
        - filter: mlp
          value: 2.0
        - value: 0.3
merge_method: linear
"""


def test_linear_with_gradient_and_filter(tmp_path, llama_zoo):
    got = run_config(tmp_path, LINEAR.format(**llama_zoo))
    base, models = inputs(llama_zoo)
    assert set(got) == set(base)
    ws = [0.5, [0.2, 1.0], [{"filter": "mlp", "value": 2.0}, {"value": 0.3}]]
    for name in base:
        w = [setting(v, name) for v in ws]
        expected = sum(wi * m[name].float() for wi, m in zip(w, models)) / sum(w)
        assert_bf16_of(got[name], expected, name)


TIES = """
models:
  - model: {base}
  - model: {m1}
    parameters:
      density: [0.25, 0.75]
      weight: 1.0
  - model: {m2}
    parameters:
      density: 0.5
      weight: [0.0, 0.5, 1.0]
  - model: {m3}
    parameters:
      density:
        - filter: mlp
          value: 0.75
        - value: 0.25
      weight:
        - filter: self_attn
          value: 0.5
        - value: 1.0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
  lambda: 0.9
dtype: bfloat16
"""


def test_ties_with_layer_gradient_and_filters(tmp_path, llama_zoo):
    got = run_config(tmp_path, TIES.format(**llama_zoo))
    base, models = inputs(llama_zoo)
    densities = [[0.25, 0.75], 0.5, [{"filter": "mlp", "value": 0.75}, {"value": 0.25}]]
    ws = [1.0, [0.0, 0.5, 1.0], [{"filter": "self_attn", "value": 0.5}, {"value": 1.0}]]
    checked_gradient = False
    for name in base:
        b = base[name].float()
        d = [setting(v, name) for v in densities]
        w = [setting(v, name) for v in ws]
        checked_gradient |= d[0] == 0.5  # the middle layer: interpolated, not an end point
        deltas = [wi * magnitude_trim(m[name].float() - b, di) for wi, di, m in zip(w, d, models)]
        expected = b + 0.9 * consensus(deltas, w, normalize=True)
        assert_bf16_of(got[name], expected, name)
        assert torch.equal(got[name], expected.to(torch.bfloat16)), f"{name}: not mergekit's rule bit for bit"
    assert checked_gradient


DARE_TIES = """
models:
  - model: {m1}
    parameters: {{density: 0.6, weight: 0.5}}
  - model: {m2}
    parameters: {{density: 0.4, weight: 0.3}}
  - model: {m3}
    parameters: {{density: [0.5, 0.9], weight: 0.2}}
merge_method: dare_ties
base_model: {base}
parameters:
  lambda: 1.5
dtype: bfloat16
"""


def test_dare_ties(tmp_path, llama_zoo):
    got = run_config(tmp_path, DARE_TIES.format(**llama_zoo))
    base, models = inputs(llama_zoo)
    densities, ws = [0.6, 0.4, [0.5, 0.9]], [0.5, 0.3, 0.2]
    for name in base:
        b = base[name].float()
        deltas = []
        for i, (dv, w, m) in enumerate(zip(densities, ws, models)):
            density = setting(dv, name)
            generator = torch.Generator().manual_seed(tensor_seed(0, name, i))  # fmerge's documented mask
            keep = torch.rand(b.shape, generator=generator) >= 1 - density
            # rule: mergekit: w scales each delta before the vote, λ the merged delta after
            deltas.append(w * torch.where(keep, (m[name].float() - b) / density, 0.0))
        expected = b + 1.5 * consensus(deltas, ws, normalize=False)  # dare_ties: normalize false by default
        assert_bf16_of(got[name], expected, name)


# ----------------------------------------------------------------------------- strictness

def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(FmergeError) as info:
        load_recipe(write_recipe(tmp_path, text, "bad.yml"))
    return str(info.value)


def test_misspelt_parameter_is_an_error_with_did_you_mean(tmp_path, llama_zoo):
    text = TIES.format(**llama_zoo).replace("      density: 0.5\n", "      densty: 0.5\n")
    msg = load_error(tmp_path, text)
    assert "densty" in msg and "did you mean 'density'" in msg and "bad.yml:" in msg
    proc = fmerge_cli("run", tmp_path / "bad.yml", "--store", tmp_path / "store", check=False)
    assert proc.returncode == 2 and "did you mean 'density'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("edit, expected", [
    (("  int8_mask: true\n", "  normalise: true\n"), "did you mean 'normalize'"),
    (("merge_method: ties", "merge_method: tise"), "did you mean 'ties'"),
    (("merge_method: ties", "merge_method: sce"), "does not share"),
    (("dtype: bfloat16", "dtype: bfloat16\nslices: []"), "'slices' together with 'models' is not supported"),
    (("dtype: bfloat16", "dtipe: bfloat16"), "did you mean 'dtype'"),
    (("      weight: 1.0\n", "      weight: 1.0\n      lambda: 2\n"), "top-level 'parameters'"),
    (("      density: 0.5\n", "      density: 1.5\n"), "less than or equal to 1"),
    (("      density: 0.5\n", "      density: [0.5, x]\n"), "list of numbers"),
])
def test_config_mistakes_are_named(tmp_path, llama_zoo, edit, expected):
    text = TIES.format(**llama_zoo)
    assert edit[0] in text
    assert expected in load_error(tmp_path, text.replace(edit[0], edit[1], 1))


def test_missing_weight_is_an_error(tmp_path, llama_zoo):
    text = "models:\n  - model: {m1}\n  - model: {m2}\nmerge_method: linear\n".format(**llama_zoo)
    assert "has no 'weight'" in load_error(tmp_path, text)


# ----------------------------------------------------------------------------- pieces the configs rely on

def test_layer_positions_follow_mergekit():
    from fmerge.merging import layer_positions

    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight",
             "model.layers.4.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"]
    assert layer_positions(names) == {names[0]: 0.0, names[1]: 0.0, names[2]: 0.5, names[3]: 1.0,
                                      names[4]: 0.0, names[5]: 0.0}
    assert layer_positions(["encoder.layer.0.attention.self.query.weight"]) == {
        "encoder.layer.0.attention.self.query.weight": 1.0}  # one layer: t = 1, as mergekit


def test_radix_select_matches_sorting():
    from fmerge.methods.ties import kth_largest

    gen = torch.Generator().manual_seed(0)
    cases = [torch.rand(1000, generator=gen), torch.zeros(7), torch.tensor([3.0, 3.0, 1e-42, 0.0, 1e30]),
             (torch.randint(0, 5, (999,), generator=gen) / 4.0), torch.rand(513, generator=gen) * 1e-40]
    for values in cases:
        ordered = sorted(values.tolist(), reverse=True)
        for k in {1, 2, len(ordered) // 3 + 1, len(ordered) - 1, len(ordered)} - {0}:
            assert kth_largest(values, k).item() == ordered[k - 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method, params", [
    ("ties", {"density": 0.3, "weight": [1.0, 0.5, 2.0]}),
    ("dare", {"p": 0.4, "combine": "ties", "weight": [1.0, 0.5, 2.0]}),
    ("task_arithmetic", {"lambda": 0.7, "weight": [1.0, 0.5, 2.0]}),
    ("weighted_average", {"weights": [1.0, 0.5, 2.0]}),
])
def test_cuda_merges_match_cpu(method, params):
    from fmerge.methods import MergeContext, TensorGroup, get_method

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(257, 129, generator=gen)
    models = [base + 0.01 * torch.randn(257, 129, generator=gen) for _ in range(3)]
    m = get_method(method)
    p = m.Params(**params)
    ctx = MergeContext(["a", "b", "c"])
    cpu = m.merge(TensorGroup("w", base.clone(), [t.clone() for t in models]), p, ctx)
    cuda = m.merge(TensorGroup("w", base.cuda(), [t.cuda() for t in models]), p, ctx)
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-6, atol=1e-7)


def test_ties_result_is_the_same_when_it_may_reuse_the_inputs():
    from fmerge.methods import MergeContext, TensorGroup, get_method

    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 32, generator=gen)
    models = [base + 0.01 * torch.randn(64, 32, generator=gen) for _ in range(3)]
    m = get_method("ties")
    p, ctx = m.Params(density=0.3, weight=[1.0, 0.5, 2.0]), MergeContext(["a", "b", "c"])
    kept = [t.clone() for t in models]
    pure = m.merge(TensorGroup("w", base, models), p, ctx)
    assert all(torch.equal(a, b) for a, b in zip(models, kept))  # not owned: inputs untouched
    assert torch.equal(m.merge(TensorGroup("w", base, [t.clone() for t in models], models_owned=True), p, ctx), pure)


def test_vocabulary_mismatch_is_named_and_exclude_takes_the_base_rows(tmp_path, llama_zoo):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=72, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "wide")
    recipe = f"base: {llama_zoo['base']}\nmodels: {{a: {llama_zoo['m1']}, b: {tmp_path / 'wide'}}}\nstore: store\n" \
             "steps:\n  m: {kind: merge, method: task_arithmetic, params: {lambda: 0.5}, export: out}\n"
    write_recipe(tmp_path, recipe)
    proc = fmerge_cli("run", tmp_path / "recipe.yaml", check=False)
    assert proc.returncode == 2 and "vocab_size is 64 in base, 64 in a, 72 in b" in " ".join(proc.stderr.split())
    recipe += "allow_crimes: true\n"  # merged as a crime, the embedding rows still do not fit:
    write_recipe(tmp_path, recipe)
    proc = fmerge_cli("run", tmp_path / "recipe.yaml", check=False)
    assert proc.returncode == 2 and "model.embed_tokens.weight" in proc.stderr and "vocabulary" in proc.stderr
    write_recipe(tmp_path, recipe + "exclude: [embed_tokens, lm_head]\n")
    fmerge_cli("run", tmp_path / "recipe.yaml")
    out, base = weights(tmp_path / "out"), weights(llama_zoo["base"])
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])
