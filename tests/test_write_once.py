"""Merged weights are written once: as the safetensors files they leave in, inside the store
artifact, checksummed as they go out; the export hard-links them. A cached artifact whose files'
stamps are unchanged is trusted without being read; any change through the file system makes the
store read it whole again. The merge driver reads ahead and writes behind in threads."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from conftest import fmerge_cli, write_recipe
from fmerge import executor, store as store_module
from fmerge.api import load_recipe
from fmerge.errors import FmergeError, RecipeError
from fmerge.export import read_manifest
from fmerge.io import ModelDir, parse_byte_size
from fmerge.merging import readahead, write_behind
from fmerge.runtime import Runtime
from fmerge.store import Store

RECIPE = """
base: zoo/base
models:
  a: zoo/task0
  b: zoo/task1
store: store
steps:
  avg:
    kind: merge
    method: simple_average
    export: out/avg
"""


def run(path, sets=None):
    recipe = load_recipe(path, sets)
    rt = Runtime(recipe, Store(recipe.resolve(recipe.spec.store)))
    (report,) = executor.run(rt)
    return report, rt.store


def average_by_hand(zoo) -> dict[str, torch.Tensor]:
    """The simple average of the body tensors, written plainly: base names, models prefixed `bert.`."""
    base, a, b = (load_file(str(zoo[m] / "model.safetensors")) for m in ("base", "task0", "task1"))
    return {n: ((a["bert." + n].float() + b["bert." + n].float()) / 2).to(t.dtype) for n, t in base.items()}


def test_the_export_links_the_files_the_merge_wrote_into_the_store(tmp_path, zoo):
    report, store = run(write_recipe(tmp_path, RECIPE))
    assert report.state == "computed"
    art = store.open(report.keys[0])
    files = art.files("weights/")
    assert list(files) == ["model.safetensors"]
    stored, record = files["model.safetensors"]
    exported = tmp_path / "out" / "avg" / "model.safetensors"
    assert os.stat(exported).st_ino == os.stat(stored).st_ino  # one file, written once
    assert record["xxh3_128"] == xxhash.xxh3_128(exported.read_bytes()).hexdigest()
    assert read_manifest(tmp_path / "out" / "avg")["files"]["model.safetensors"]["xxh3_128"] == record["xxh3_128"]
    expected = average_by_hand(zoo)
    got = load_file(str(exported))
    assert got.keys() == expected.keys()
    for n, t in expected.items():
        assert torch.equal(got[n], t), n
        assert torch.equal(art.get("weights/" + n), t), n  # served from the same file, checked
    assert not any((art.path / "weights").glob("*"))  # no zarr copy of the weights


def test_out_shard_size_shards_the_output_and_transformers_loads_it(tmp_path, zoo):
    from transformers import BertModel

    path = write_recipe(tmp_path, RECIPE.replace("    export: out/avg", "    export: out/avg\n    out_shard_size: 20KB"))
    report, store = run(path)
    out = tmp_path / "out" / "avg"
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all((out / s).stat().st_size <= 20_000 + 4096 for s in shards)  # a header beyond the tensors
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    model = BertModel.from_pretrained(out)
    expected = average_by_hand(zoo)
    for n, t in model.state_dict().items():
        if n in expected:
            assert torch.equal(t, expected[n].to(t.dtype)), n
    # the size is part of the key: the default layout is another artifact
    default, _ = run(write_recipe(tmp_path, RECIPE, "default.yaml"))
    assert default.keys != report.keys


def test_a_size_that_is_not_one_is_refused_naming_the_key(tmp_path, zoo):
    path = write_recipe(tmp_path, RECIPE.replace("    export: out/avg", "    export: out/avg\n    out_shard_size: lots"))
    with pytest.raises(RecipeError, match=r"out_shard_size.*'lots' is not a size; write a positive number of bytes "
                                          r"with a unit, e.g. 2GB"):
        load_recipe(path)
    assert parse_byte_size("2GB", "x") == 2 * 10**9 and parse_byte_size("1GiB", "x") == 2**30
    assert parse_byte_size(512, "x") == 512
    with pytest.raises(RecipeError, match="'0MB' is not a size"):
        parse_byte_size("0MB", "x")


def test_fmerge_merge_takes_out_shard_size(tmp_path, zoo):
    out = tmp_path / "merged"
    fmerge_cli("merge", "--method", "simple_average", "--base", zoo["base"], "--model", zoo["task0"],
               "--model", zoo["task1"], "--out", out, "--out-shard-size", "20KB", "--store", tmp_path / "store")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert ModelDir(out).names() and (out / "model.safetensors.index.json").is_file()


class Reads:
    """Counts what the store reads of tensor bytes: whole files hashed, chunks and ranges read."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("_hash_file", "_read_single_chunk", "_read_range"):
            real = getattr(store_module, name)
            monkeypatch.setattr(store_module, name, self.counting(real))

    def counting(self, real):
        def wrapped(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)
        return wrapped


def test_a_cached_artifact_is_trusted_unread_until_a_file_of_it_changes(tmp_path, zoo, monkeypatch):
    path = write_recipe(tmp_path, RECIPE)
    report, store = run(path)
    key = report.keys[0]
    reads = Reads(monkeypatch)
    again, _ = run(path)
    assert again.state == "cached" and reads.count == 0  # not one byte of the artifact read

    os.utime(store.open(key).files("weights/")["model.safetensors"][0])  # `touch`: same bytes, new stamp
    fresh = Store(store.root)
    assert fresh.has_intact(key) and reads.count == 1  # read whole once, found intact, stamped again
    assert Store(store.root).has_intact(key) and reads.count == 1

    # a byte flipped through an ordinary write, the size unchanged
    stored = store.open(key).files("weights/")["model.safetensors"][0]
    data = bytearray(stored.read_bytes())
    data[-3] ^= 0x10
    with open(stored, "r+b") as fh:
        fh.write(data)
    bad = []
    assert not Store(store.root).has_intact(key, on_bad=bad.append)
    assert "safetensors/weights/model.safetensors" in bad[0].problem and bad[0].path.parent.name == "quarantine"


def test_a_zarr_artifact_is_checked_when_a_chunk_changes(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    writer = store.writer("ab" * 16, "stat", {}, {}, 1)
    writer.write("fisher/w", torch.arange(6.0))
    writer.commit()
    reads = Reads(monkeypatch)
    assert Store(store.root).has_intact("ab" * 16) and reads.count == 0  # stamped at commit
    chunk = store.path("ab" * 16) / "fisher" / "w" / "c" / "0"
    chunk.write_bytes(torch.tensor([9.0] + [1.0] * 5).numpy().tobytes())
    assert not Store(store.root).has_intact("ab" * 16) and reads.count > 0


def test_editing_the_exported_weights_in_place_is_caught_and_refused(tmp_path, zoo):
    path = write_recipe(tmp_path, RECIPE)
    report, store = run(path)
    exported = tmp_path / "out" / "avg" / "model.safetensors"
    data = bytearray(exported.read_bytes())
    data[-3] ^= 0x10
    with open(exported, "r+b") as fh:  # the same inode as the store's file
        fh.write(data)
    with pytest.raises(FmergeError, match=r"'model\.safetensors' in .* changed since fmerge wrote them .* so they are yours now"):
        run(path)
    # the corrupt artifact was moved aside and computed again; the user's edit is kept
    assert store.has_intact(report.keys[0])
    assert len(store.quarantined()) == 1 and exported.read_bytes() == bytes(data)
    assert os.stat(exported).st_ino != os.stat(store.open(report.keys[0]).files("weights/")["model.safetensors"][0]).st_ino


def test_an_artifact_of_zarr_weights_is_still_served_and_exported(tmp_path, zoo):
    """Merges written before they kept safetensors: the same key holding zarr arrays."""
    path = write_recipe(tmp_path, RECIPE)
    report, store = run(path)
    key = report.keys[0]
    old = store.open(key)
    tensors = {n: old.get("weights/" + n) for n in old.names("weights/")}
    attrs = old.attrs
    store.remove(key)
    writer = store.writer(key, "merge", attrs["inputs"], attrs["params"], attrs["algorithm_version"])
    for n, t in tensors.items():
        writer.write("weights/" + n, t)
    writer.commit(attrs["meta"])
    shutil.rmtree(tmp_path / "out")  # the user removes the export
    again, _ = run(path)
    assert again.state == "cached"
    got = load_file(str(tmp_path / "out" / "avg" / "model.safetensors"))
    assert all(torch.equal(got[n], t) for n, t in tensors.items())


def test_readahead_keeps_order_and_raises_where_the_failure_is():
    def items():
        yield from range(3)
        raise ValueError("item 3 is bad")

    seen = []
    with pytest.raises(ValueError, match="item 3 is bad"):
        for x in readahead(items()):
            seen.append(x)
    assert seen == [0, 1, 2]

    produced = []

    def endless():
        for i in range(1000):
            produced.append(i)
            yield i

    for x in readahead(endless()):
        if x == 5:
            break  # the consumer stops: the producer stops a few items later, not at 1000
    assert len(produced) <= 8


def test_write_behind_writes_in_order_and_raises_the_writers_failure():
    written = []
    write_behind(((str(i), torch.tensor(i)) for i in range(20)), lambda n, t: written.append((n, int(t))))
    assert written == [(str(i), i) for i in range(20)]

    def failing(name, tensor):
        if name == "3":
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_behind(((str(i), torch.tensor(i)) for i in range(20)), failing)


def test_a_read_buffer_is_handed_out_again_only_once_nothing_uses_its_memory():
    """merge_stream's recycled buffers: while any tensor made from a buffer lives (a dtype view, a
    reshape, a tensor over its numpy array, a slice), a request gets other memory; once the last
    one is gone, the same memory comes back; small requests never come from the pool."""
    import numpy as np

    from fmerge.merging import RecycledBuffers

    pool = RecycledBuffers()
    size = RecycledBuffers.SMALLEST * 2
    first = pool.take(size)
    address = first.data_ptr()
    made = [lambda t: t.view(torch.float32).reshape(2, -1), lambda t: torch.from_numpy(t.numpy().view(np.float32)),
            lambda t: t[size // 2:]]
    for make in made:
        kept = make(first)
        del first
        other = pool.take(size)
        assert other.data_ptr() != address  # still in use through `kept`
        second = other.data_ptr()
        del other
        del kept
        first = pool.take(size)
        assert first.data_ptr() == address  # nothing holds it: the same memory again
    assert len(pool.buffers) == 2  # the second buffer, freed each round, was taken again
    smaller = pool.take(size // 2 + 1)  # a free buffer large enough: the second, `first` lives
    assert smaller.data_ptr() == second
    del first
    assert pool.take(size // 2 + 1).data_ptr() == address
    assert len(pool.buffers) == 2
    tiny = pool.take(RecycledBuffers.SMALLEST - 1)
    assert all(tiny.data_ptr() != b.data_ptr() for b in pool.buffers)
