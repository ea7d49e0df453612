"""The artifact store's write and read throughput against safetensors, for the same tensors.

Takes the tensors of a Llama-shaped model (bench/merge.py's shapes, random values) and writes them
(1) into a store artifact as zarr arrays (how statistics are kept: one array per tensor,
checksummed, committed by rename), (2) into a store artifact as safetensors files (how a merge's
weights are kept since issue 14: checksummed and SHA-256'd as they are written, what an export
links) and (3) as a plain safetensors file with fmerge's streaming writer (no checksum, no store),
then reads each back tensor by tensor, cold (these files evicted from the page cache) and warm.
Prints a table and writes bench/results/store-<size>-<dtype>.json. The issue's target: the merge's
store write (2) at >= 0.8 GB/s.

    .venv/bin/python bench/store.py [--size 200M] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import os
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from merge import evict, layout_of, llama_shape, machine, parse_size  # noqa: E402

from fmerge.io import ModelDir, write_weight_files  # noqa: E402
from fmerge.store import Store  # noqa: E402


def files_under(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file()]


def read_back(source, names) -> float:
    start = time.perf_counter()
    for n in names:
        source.get(n)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="200M")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "store")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    layout = [(n, dtype, d) for n, d in layout_of(llama_shape(parse_size(args.size)))]
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(d, generator=gen).to(dt) for n, dt, d in layout}  # made before any timing
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    store = Store(args.work / "store")
    # Each write starts with no dirty pages of an earlier one: writes back to back are otherwise
    # throttled by the kernel's writeback of the previous one (0.39 against 1.4 GB/s for dd here).
    os.sync()
    start = time.perf_counter()
    writer = store.writer("bench" + "0" * 27, "bench", {}, {}, 1)
    for n, t in tensors.items():
        writer.write("weights/" + n, t)
    artifact = writer.commit({})
    store_write = time.perf_counter() - start

    os.sync()
    start = time.perf_counter()
    writer = store.writer("bench" + "1" * 27, "bench", {}, {}, 1)
    with writer.safetensors("weights/", layout, {"format": "pt"}, 5 * 10**9) as files:
        for n, t in tensors.items():
            files.write(n, t)
    st_artifact = writer.commit({})
    st_store_write = time.perf_counter() - start

    os.sync()
    start = time.perf_counter()
    (args.work / "st").mkdir()
    write_weight_files(args.work / "st", layout, iter(tensors.items()), {"format": "pt"})
    st_write = time.perf_counter() - start

    names = list(tensors)
    rows = {}
    for label, write, root in (("store (zarr)", store_write, artifact.path),
                               ("store (safetensors)", st_store_write, st_artifact.path),
                               ("safetensors", st_write, args.work / "st")):
        evict(files_under(root))
        for key in (artifact.key, st_artifact.key):  # each read checks every tensor's checksum
            store._verified.pop(key, None)
        src = ModelDir(root) if label == "safetensors" else store.open(root.name).view("weights/")
        cold = read_back(src, names)
        warm = read_back(src, names)
        rows[label] = {"write_s": round(write, 3), "read_cold_s": round(cold, 3), "read_warm_s": round(warm, 3),
                       "write_gb_per_s": round(nbytes / write / 1e9, 2), "read_cold_gb_per_s": round(nbytes / cold / 1e9, 2),
                       "read_warm_gb_per_s": round(nbytes / warm / 1e9, 2)}
    result = {"size": args.size, "dtype": args.dtype, "tensors": len(tensors), "bytes": nbytes,
              "parameters": sum(math.prod(d) for _, _, d in layout), "machine": machine(), "rows": rows}
    out = ROOT / "bench" / "results" / f"store-{args.size}-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{len(tensors)} tensors, {nbytes / 1e9:.2f} GB {args.dtype}")
    print(f"{'format':20} {'write s':>8} {'GB/s':>6} {'read cold s':>12} {'GB/s':>6} {'read warm s':>12} {'GB/s':>6}")
    for label, r in rows.items():
        print(f"{label:20} {r['write_s']:8.2f} {r['write_gb_per_s']:6.2f} {r['read_cold_s']:12.2f} "
              f"{r['read_cold_gb_per_s']:6.2f} {r['read_warm_s']:12.2f} {r['read_warm_gb_per_s']:6.2f}")
    merge_write = rows["store (safetensors)"]["write_gb_per_s"]
    print(f"target: a merge's store write >= 0.8 GB/s: {merge_write} GB/s "
          f"({'met' if merge_write >= 0.8 else 'not met'} at this size and load)")
    print(f"wrote {out}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
