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


def test_a_half_precision_task_next_to_an_fp32_base_exports_in_the_declared_dtype(tmp_path):
    """A task saved in fp16 beside an fp32 base: the merge and each task's classifier are written
    in the base's dtype (fp32), or in out_dtype, the head cast from the task's own; the averaged
    body equals the plain average of the two tasks' tensors computed here."""
    from transformers import BertForSequenceClassification

    from conftest import make_zoo
    from fmerge import api

    zoo = make_zoo(tmp_path / "zoo", n_models=2, num_labels=(2, 2))
    half = BertForSequenceClassification.from_pretrained(zoo["task1"]).to(torch.float16)
    half.save_pretrained(zoo["task1"])
    api.merge("simple_average", {"a": zoo["task0"], "b": zoo["task1"]}, base=zoo["base"], out=tmp_path / "out",
              store=tmp_path / "st")
    a, b, merged = tensors(zoo["task0"]), tensors(zoo["task1"]), tensors(tmp_path / "out")
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.float32}
    name = "encoder.layer.0.attention.self.query.weight"
    want = (a["bert." + name].double() + b["bert." + name].double()) / 2
    torch.testing.assert_close(merged[name].double(), want, rtol=1e-6, atol=1e-6)
    task = tensors(tmp_path / "out" / "b")
    assert {t.dtype for t in task.values() if t.is_floating_point()} == {torch.float32}
    assert torch.equal(task["classifier.weight"], b["classifier.weight"].float())
    torch.testing.assert_close(task["bert." + name], merged[name])
    assert json.loads((tmp_path / "out" / "b" / "config.json").read_text()).get("dtype") == "float32"

    api.merge("simple_average", {"a": zoo["task0"], "b": zoo["task1"]}, base=zoo["base"], out=tmp_path / "bf",
              out_dtype="bfloat16", store=tmp_path / "st")
    for directory in (tmp_path / "bf", tmp_path / "bf" / "a", tmp_path / "bf" / "b"):
        assert {t.dtype for t in tensors(directory).values() if t.is_floating_point()} == {torch.bfloat16}
