"""The zarr artifact store: round trips, atomic commits, checksums, leftovers of killed writers."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fmerge.errors import FmergeError
from fmerge.store import Store, make_key


def test_round_trip_keeps_values_and_dtypes(tmp_path):
    store = Store(tmp_path / "s")
    tensors = {
        "weights/a.weight": torch.randn(3, 4),
        "weights/b.bias": torch.randn(5).to(torch.bfloat16),
        "weights/c": torch.randn(2, 2).to(torch.float16),
        "weights/ids": torch.arange(6, dtype=torch.int64),
        "weights/scalar": torch.tensor(2.5),
        "weights/empty": torch.zeros(0, 3),
    }
    w = store.writer("k1", "merge", {"x": 1}, {"p": 2}, 1)
    for name, t in tensors.items():
        w.write(name, t)
    art = w.commit({"note": "hi"})
    assert store.has("k1")
    assert art.names("weights/") == [n.split("/", 1)[1] for n in tensors]
    view = store.open("k1").view("weights/")
    for name, t in tensors.items():
        got = view.get(name.split("/", 1)[1])
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t)
    assert art.meta == {"note": "hi"} and art.attrs["params"] == {"p": 2}
    assert art.verify() == []


def test_key_depends_on_every_part():
    base = make_key("merge", {"a": 1}, {"m": "h"}, 1)
    assert base == make_key("merge", {"a": 1}, {"m": "h"}, 1)
    assert len({base, make_key("merge", {"a": 2}, {"m": "h"}, 1), make_key("merge", {"a": 1}, {"m": "g"}, 1),
                make_key("merge", {"a": 1}, {"m": "h"}, 2), make_key("fisher", {"a": 1}, {"m": "h"}, 1)}) == 5


def test_uncommitted_writer_leaves_nothing_listed(tmp_path):
    store = Store(tmp_path / "s")
    w = store.writer("k2", "merge", {}, {}, 1)
    w.write("weights/a", torch.ones(3))
    assert not store.has("k2") and list(store.list()) == []
    w.abort()
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_killed_writer_is_never_trusted_and_gc_removes_its_leftovers(tmp_path):
    root = tmp_path / "s"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from fmerge.store import Store
        w = Store({str(root)!r}).writer("k3", "merge", {{}}, {{}}, 1)
        w.write("weights/a", torch.ones(1000))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    store = Store(root)
    assert not store.has("k3") and list(store.list()) == []
    assert len(list((root / "tmp").iterdir())) == 1
    assert store.clean_tmp() == 1 and list((root / "tmp").iterdir()) == []


def test_clean_tmp_spares_a_live_writer(tmp_path):
    store = Store(tmp_path / "s")
    w = store.writer("k4", "merge", {}, {}, 1)  # this process is alive
    w.write("weights/a", torch.ones(2))
    assert store.clean_tmp() == 0
    w.commit()
    assert store.has("k4")


def test_verify_finds_a_flipped_byte(tmp_path):
    store = Store(tmp_path / "s")
    w = store.writer("k5", "merge", {}, {}, 1)
    w.write("weights/a", torch.arange(64, dtype=torch.float32))
    art = w.commit()
    chunk = next(p for p in (art.path / "weights" / "a").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert store.open("k5").verify() == ["weights/a"]


def test_open_by_unique_prefix_and_clear_error(tmp_path):
    store = Store(tmp_path / "s")
    store.writer("abcdef0123", "merge", {}, {}, 1).commit()
    assert store.open("abcd").key == "abcdef0123"
    with pytest.raises(FmergeError, match="No artifact 'zzzz'"):
        store.open("zzzz")


def test_unwritable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # fails for root too, unlike chmod
    with pytest.raises(FmergeError, match="cannot be created or written"):
        Store(blocker / "s")


def test_fast_single_chunk_reader_agrees_with_zarr(tmp_path):
    import numpy as np

    from fmerge.store import _read_single_chunk

    store = Store(tmp_path / "s")
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(6), "i8": torch.tensor([-1, 2], dtype=torch.int8), "u8": torch.tensor([7], dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
               "f64": torch.randn(2, 3, 4, dtype=torch.float64)}
    w = store.writer("k6", "merge", {}, {}, 1)
    for name, t in tensors.items():
        w.write("weights/" + name, t)
    art = w.commit()
    for name, t in tensors.items():
        fast = _read_single_chunk(art.path / "weights" / name)
        assert fast is not None, name  # every layout fmerge writes takes the fast path
        via_zarr = np.asarray(art.group["weights/" + name][...])
        assert fast.dtype == via_zarr.dtype and fast.shape == via_zarr.shape and np.array_equal(fast, via_zarr), name
        assert torch.equal(art.get("weights/" + name), t), name
