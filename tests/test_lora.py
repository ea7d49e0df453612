"""PEFT LoRA adapter folders: applied to the base as W + B·A·scale (checked against a Python loop
over the product), merged as whole models, never factor by factor; what cannot be applied is refused.

The adapters are written here the way PEFT saves them (adapter_config.json, adapter_model.safetensors
with `base_model.model.<module>.lora_A.weight` names): peft itself need not be installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmerge.errors import FmergeError, ModelError
from fmerge.io import ModelDir
from fmerge.lora import LoraMerged

PROJ = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


def make_base(root: Path) -> Path:
    torch.manual_seed(0)
    tensors = {EMBED: torch.randn(10, 6), PROJ: torch.randn(5, 6), "model.layers.0.self_attn.q_proj.bias": torch.randn(5),
               "model.norm.weight": torch.randn(6), "lm_head.weight": torch.randn(3, 6)}
    path = root / "base"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    return path


def make_adapter(root: Path, name: str, seed: int, r: int = 2, alpha: float = 8, **config) -> Path:
    """A LoRA adapter on q_proj (and whatever `config['extra']` adds), saved as PEFT saves it."""
    torch.manual_seed(seed)
    extra = config.pop("extra", {})
    tensors = {f"base_model.model.{PROJ[:-len('.weight')]}.lora_A.weight": torch.randn(r, 6),
               f"base_model.model.{PROJ[:-len('.weight')]}.lora_B.weight": torch.randn(5, r), **extra}
    path = root / name
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                          "target_modules": ["q_proj"], **config}))
    return path


def ref_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> list[list[float]]:
    """ΔW[i][j] = Σ_k B[i][k]·A[k][j]·scale, one entry at a time."""
    return [[sum(b[i, k].item() * a[k, j].item() for k in range(a.shape[0])) * scale for j in range(a.shape[1])]
            for i in range(b.shape[0])]


def factors(adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(adapter / "adapter_model.safetensors"))
    stem = f"base_model.model.{PROJ[:-len('.weight')]}"
    return t[f"{stem}.lora_A.weight"], t[f"{stem}.lora_B.weight"]


def adapted(base: Path, adapter: Path) -> LoraMerged:
    return LoraMerged(ModelDir(base), ModelDir(adapter), "lora")


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_is_b_times_a_times_alpha_over_r(tmp_path, rslora):
    base = make_base(tmp_path)
    adapter = make_adapter(tmp_path, "lora", 1, r=3, alpha=6, use_rslora=rslora)
    a, b = factors(adapter)
    scale = 6 / math.sqrt(3) if rslora else 6 / 3
    got = adapted(base, adapter).get(PROJ)
    want = load_file(str(base / "model.safetensors"))[PROJ].double() + torch.tensor(ref_delta(a, b, scale), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_fan_in_fan_out_and_embedding_factors_are_transposed(tmp_path):
    base = make_base(tmp_path)
    torch.manual_seed(2)
    a_conv, b_conv = torch.randn(2, 5), torch.randn(6, 2)  # Conv1D layout: weight stored in × out
    a_emb, b_emb = torch.randn(2, 10), torch.randn(6, 2)  # PEFT's lora_embedding_A: r × vocabulary
    adapter = tmp_path / "lora"
    adapter.mkdir()
    stem = f"base_model.model.{PROJ[:-len('.weight')]}"
    save_file({f"{stem}.lora_A.weight": a_conv, f"{stem}.lora_B.weight": b_conv,
               "base_model.model.model.embed_tokens.lora_embedding_A": a_emb,
               "base_model.model.model.embed_tokens.lora_embedding_B": b_emb}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "fan_in_fan_out": True}))
    src, base_w = adapted(base, adapter), load_file(str(base / "model.safetensors"))
    want_proj = torch.tensor(ref_delta(a_conv, b_conv, 2.0)).T  # (out × in) = (B·A)ᵀ
    torch.testing.assert_close(src.get(PROJ) - base_w[PROJ], want_proj, rtol=1e-5, atol=1e-5)
    want_emb = torch.tensor(ref_delta(a_emb, b_emb, 2.0)).T
    torch.testing.assert_close(src.get(EMBED) - base_w[EMBED], want_emb, rtol=1e-5, atol=1e-5)


def test_saved_modules_replace_the_bases_tensors(tmp_path):
    base = make_base(tmp_path)
    head, bias = torch.randn(3, 6), torch.randn(5)
    adapter = make_adapter(tmp_path, "lora", 3, extra={"base_model.model.lm_head.weight": head,
                                                       "base_model.model.model.layers.0.self_attn.q_proj.bias": bias})
    src = adapted(base, adapter)
    assert torch.equal(src.get("lm_head.weight"), head)
    assert torch.equal(src.get("model.layers.0.self_attn.q_proj.bias"), bias)
    assert torch.equal(src.get("model.norm.weight"), load_file(str(base / "model.safetensors"))["model.norm.weight"])


def test_base_layer_tensors_stand_for_the_bases(tmp_path):
    """PEFT saves a LoRA layer's own tensors as `<module>.base_layer.*` (a bias with `bias: lora_only`,
    an adapted embedding saved whole): they replace the base's, and ΔW adds to the saved weight."""
    base = make_base(tmp_path)
    torch.manual_seed(4)
    bias, embed = torch.randn(5), torch.randn(10, 6)
    a_emb, b_emb = torch.randn(2, 10), torch.randn(6, 2)
    adapter = make_adapter(tmp_path, "lora", 5, r=2, alpha=8, extra={
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": bias,
        "base_model.model.model.embed_tokens.base_layer.weight": embed,
        "base_model.model.model.embed_tokens.lora_embedding_A": a_emb,
        "base_model.model.model.embed_tokens.lora_embedding_B": b_emb})
    src, base_w = adapted(base, adapter), load_file(str(base / "model.safetensors"))
    a, b = factors(adapter)
    want_proj = base_w[PROJ].double() + torch.tensor(ref_delta(a, b, 4.0), dtype=torch.float64)
    torch.testing.assert_close(src.get(PROJ).double(), want_proj, rtol=1e-6, atol=1e-6)
    assert torch.equal(src.get("model.layers.0.self_attn.q_proj.bias"), bias)
    want_emb = embed.double() + torch.tensor(ref_delta(a_emb, b_emb, 4.0), dtype=torch.float64).T
    torch.testing.assert_close(src.get(EMBED).double(), want_emb, rtol=1e-6, atol=1e-6)
    assert src.dtype(EMBED) == torch.float32 and src.dtype("model.layers.0.self_attn.q_proj.bias") == bias.dtype


def test_two_adapters_merge_as_whole_models_not_factor_by_factor(tmp_path):
    from fmerge import executor
    from fmerge.api import merge_recipe
    from fmerge.runtime import Runtime
    from fmerge.store import Store

    base = make_base(tmp_path)
    l1, l2 = make_adapter(tmp_path, "l1", 1), make_adapter(tmp_path, "l2", 2)
    out = tmp_path / "out"
    executor.run(Runtime(merge_recipe("simple_average", [l1, l2], base, out=out), Store(tmp_path / "store")))
    merged, base_w = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    (a1, b1), (a2, b2) = factors(l1), factors(l2)
    deltas = [torch.tensor(ref_delta(a, b, 8 / 2)) for a, b in ((a1, b1), (a2, b2))]
    torch.testing.assert_close(merged[PROJ], base_w[PROJ] + (deltas[0] + deltas[1]) / 2, rtol=1e-5, atol=1e-5)
    factor_average = torch.tensor(ref_delta((a1 + a2) / 2, (b1 + b2) / 2, 4.0))
    assert (merged[PROJ] - base_w[PROJ] - factor_average).abs().max() > 0.1
    for name in ("model.norm.weight", EMBED, "lm_head.weight"):
        assert torch.equal(merged[name], base_w[name]), name

    # lora_alpha shapes ΔW, so it is part of the adapted model's content key: no stale cache hit
    config = json.loads((l1 / "adapter_config.json").read_text())
    (l1 / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    executor.run(Runtime(merge_recipe("simple_average", [l1, l2], base, out=out), Store(tmp_path / "store")))
    deltas[0] = deltas[0] * 2
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))[PROJ],
                               base_w[PROJ] + (deltas[0] + deltas[1]) / 2, rtol=1e-5, atol=1e-5)


def test_an_adapter_as_the_base_is_refused(tmp_path):
    from fmerge import executor
    from fmerge.api import merge_recipe
    from fmerge.runtime import Runtime
    from fmerge.store import Store

    make_base(tmp_path)
    l1, l2 = make_adapter(tmp_path, "l1", 1), make_adapter(tmp_path, "l2", 2)
    with pytest.raises(ModelError) as info:
        executor.run(Runtime(merge_recipe("simple_average", [l1, l2], out=tmp_path / "o"), Store(tmp_path / "store")))
    assert "is a PEFT adapter" in str(info.value) and "cannot serve as the base" in str(info.value)
    assert "merge_and_unload" in str(info.value)


@pytest.mark.parametrize("config, extra, expected", [
    ({"use_dora": True}, {}, "use_dora is true"),
    ({"peft_type": "IA3"}, {}, "peft_type is 'IA3'"),
    ({"alpha_pattern": {"q_proj": 32}}, {}, "alpha_pattern is set"),
    ({"lora_alpha": 0}, {}, "'lora_alpha' is 0"),
    ({}, {"base_model.model.model.layers.7.mlp.lora_A.weight": torch.zeros(2, 6)}, "match no tensor of the base"),
    ({"fan_in_fan_out": True}, {}, "does not fit this base"),
])
def test_adapters_that_cannot_be_applied_are_refused(tmp_path, config, extra, expected):
    base = make_base(tmp_path)
    settings = {"r": 2, "alpha": 8, **config}
    adapter = make_adapter(tmp_path, "lora", 1, r=settings.pop("r"), alpha=settings.pop("alpha"), extra=extra,
                           **{k: v for k, v in settings.items() if k != "lora_alpha"})
    if "lora_alpha" in config:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": config["lora_alpha"]}))
    with pytest.raises(FmergeError) as info:
        adapted(base, adapter).get(PROJ)
    assert expected in str(info.value) and "'lora'" in str(info.value)
