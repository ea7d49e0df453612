"""Reading safetensors models in pieces: the content hash (the cache keys' input: BLAKE3 over
names, dtypes, shapes and bytes, streamed through one buffer) equals the formula written out here,
and a conversion read piece by piece equals a whole one."""

from __future__ import annotations

import blake3
import pytest
import torch
from safetensors.torch import load_file, save_file

from fmerge import io
from fmerge.errors import ModelError


def formula(tensors: dict[str, torch.Tensor]) -> str:
    h = blake3.blake3()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest(length=16)


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(37, 11, generator=g).to(torch.bfloat16), "a.bias": torch.randn(5, generator=g),
            "c.ids": torch.arange(7), "empty": torch.zeros(0, 3)}


def test_streamed_hash_equals_the_formula_in_small_and_large_blocks(tmp_path, monkeypatch):
    save_file(tensors(), str(tmp_path / "model.safetensors"))
    expected = formula(load_file(str(tmp_path / "model.safetensors")))
    assert io.content_hash(io.ModelDir(tmp_path)) == expected
    monkeypatch.setattr(io, "_READ_BLOCK", 64)  # every tensor read in several pieces
    assert io.content_hash(io.ModelDir(tmp_path)) == expected


def test_one_changed_byte_changes_the_hash_and_resharding_does_not(tmp_path):
    t = tensors()
    (tmp_path / "one").mkdir()
    save_file(t, str(tmp_path / "one" / "model.safetensors"))
    before = io.content_hash(io.ModelDir(tmp_path / "one"))
    (tmp_path / "two").mkdir()
    save_file({k: v for k, v in t.items() if k < "b"}, str(tmp_path / "two" / "model-00001-of-00002.safetensors"))
    save_file({k: v for k, v in t.items() if k >= "b"}, str(tmp_path / "two" / "model-00002-of-00002.safetensors"))
    assert io.content_hash(io.ModelDir(tmp_path / "two")) == before
    t["a.bias"][3] += 1
    save_file(t, str(tmp_path / "one" / "model.safetensors"))
    assert io.content_hash(io.ModelDir(tmp_path / "one")) != before


def test_get_as_converts_piece_by_piece_exactly_like_a_whole_conversion(tmp_path, monkeypatch):
    t = tensors() | {"h": torch.randn(300, 7).half(), "f": torch.randn(33)}
    save_file(t, str(tmp_path / "model.safetensors"))
    model = io.ModelDir(tmp_path)
    monkeypatch.setattr(io._STAGING, "block", torch.empty(40, dtype=torch.uint8), raising=False)  # 40-byte pieces
    for name, want in t.items():
        got = model.get_as(name, torch.float32)
        assert got.dtype == torch.float32 and got.shape == want.shape and torch.equal(got, want.float()), name
    f = model.get_as("f", torch.float32)
    f += 1  # a fresh tensor: the file and the next read are untouched
    assert torch.equal(model.get_as("f", torch.float32), t["f"])


def test_a_file_cut_short_after_opening_is_refused_by_name_on_every_read_path(tmp_path):
    save_file(tensors(), str(tmp_path / "model.safetensors"))
    model = io.ModelDir(tmp_path, label="m")
    size = (tmp_path / "model.safetensors").stat().st_size
    with open(tmp_path / "model.safetensors", "r+b") as fh:
        fh.truncate(size - 40)  # the last tensor in the file loses its bytes
    last = max(model.names(), key=lambda n: model._entries[n].end)
    for read in (lambda: model.get(last), lambda: model.get_as(last, torch.float64),
                 lambda: io.content_hash(model)):
        with pytest.raises(ModelError, match=r"Model 'm': .*model\.safetensors ended while reading tensor "
                                             rf"'{last}' \(truncated\?\)"):
            read()
