"""An export written in `out_dtype` says so: every floating tensor in that dtype, config.json too."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from conftest import ZOO_RECIPE, fmerge_cli, write_recipe


def tensors(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def test_out_dtype_reaches_every_float_tensor_and_the_config(tmp_path, zoo):
    from transformers import AutoConfig

    text = ZOO_RECIPE.replace("    export: out/ties", "    export: out/ties\n    out_dtype: bfloat16")
    text += "  plain:\n    kind: merge\n    method: simple_average\n    export: out/plain\n"
    fmerge_cli("run", write_recipe(tmp_path, text), cwd=tmp_path)

    written = tensors(tmp_path / "out" / "ties")
    base = tensors(zoo["base"])
    floats = {n: t.dtype for n, t in written.items() if t.is_floating_point()}
    assert floats and set(floats.values()) == {torch.bfloat16}, floats
    for n, t in written.items():  # integer buffers keep their dtype and values
        if not t.is_floating_point():
            assert t.dtype == base[n].dtype and torch.equal(t, base[n])
    config = json.loads((tmp_path / "out" / "ties" / "config.json").read_text())
    assert "bfloat16" in {config.get("dtype"), config.get("torch_dtype")}
    assert AutoConfig.from_pretrained(tmp_path / "out" / "ties").dtype == torch.bfloat16
    # the base's own config is untouched, and an export without out_dtype copies it as it is
    assert (zoo["base"] / "config.json").read_bytes() == (tmp_path / "out" / "plain" / "config.json").read_bytes()
    assert {t.dtype for t in tensors(tmp_path / "out" / "plain").values() if t.is_floating_point()} == {torch.float32}
