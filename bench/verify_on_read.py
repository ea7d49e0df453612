"""What verifying every artifact read costs: reads with and without checksums, and hash speeds.

Builds a store with artifacts of realistic sizes (a merge of a MiniLM-L6-shaped model, 22.7M fp32
parameters, ~91 MB; three Fisher diagonals of the same shapes; an eval result with meta only;
random values made locally), or measures an existing store (`--store DIR`, opened read-only,
nothing in it is changed). For every artifact it times reading all tensors

  - before:     what fmerge did before this check existed: each tensor through zarr's reader,
                copied, nothing hashed,
  - unverified: `Artifact.get` with hashing skipped (its one-chunk-file reader, no zarr),
  - verified:   `Artifact.get` hashing each tensor against its recorded checksum,
  - check+use:  what `fmerge run` does with a cached artifact: `Store.check` (reads and hashes
                the whole artifact when the executor decides it is cached) and then the step's
                reads, which skip the hash because the check is remembered for the process,
  - check+use, no memo: the same with the reads hashing again,

warm (page cache filled) and cold (these files evicted with posix_fadvise, nothing else touched),
and the throughput of the candidate checksums (blake2b-128 from hashlib, xxh3_128 from `xxhash`,
blake3 from `blake3` on one thread and on all cores, if installed) over `--hash-mb` MB.
Prints a table and writes bench/results/verify_on_read.json.

    .venv/bin/python bench/verify_on_read.py [--store DIR] [--repeat 3] [--hash-mb 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fmerge.store import Artifact, Store  # noqa: E402


from _common import evict  # noqa: E402  (bench/ is on sys.path when a script runs)

def minilm_layout() -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of sentence-transformers/all-MiniLM-L6-v2 (BertModel, 22.7M parameters)."""
    h, inter, layers = 384, 1536, 6
    out = [("embeddings.word_embeddings.weight", (30522, h)), ("embeddings.position_embeddings.weight", (512, h)),
           ("embeddings.token_type_embeddings.weight", (2, h)), ("embeddings.LayerNorm.weight", (h,)),
           ("embeddings.LayerNorm.bias", (h,))]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out += [(p + m + ".weight", (h, h)), (p + m + ".bias", (h,))]
        out += [(p + "attention.output.LayerNorm.weight", (h,)), (p + "attention.output.LayerNorm.bias", (h,)),
                (p + "intermediate.dense.weight", (inter, h)), (p + "intermediate.dense.bias", (inter,)),
                (p + "output.dense.weight", (h, inter)), (p + "output.dense.bias", (h,)),
                (p + "output.LayerNorm.weight", (h,)), (p + "output.LayerNorm.bias", (h,))]
    return out + [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]


def build(store: Store) -> None:
    gen = torch.Generator().manual_seed(0)
    layout = minilm_layout()
    artifacts = [("merge0", "merge", "weights/"), ("fisher0", "fisher", "fisher/"), ("fisher1", "fisher", "fisher/"),
                 ("fisher2", "fisher", "fisher/")]
    for key, kind, prefix in artifacts:
        w = store.writer(key + "0" * 26, kind, {}, {}, 1)
        for name, shape in layout:
            t = torch.randn(shape, generator=gen)
            w.write(prefix + name, t.abs() if kind == "fisher" else t)
        w.commit({"step": key})
    store.writer("eval0" + "0" * 27, "eval", {}, {}, 1).commit({"step": "eval", "accuracy": 0.5})


def files_of(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file()]


def read_all(store: Store, key: str, mode: str) -> float:
    start = time.perf_counter()
    if mode == "before":
        art = Artifact(store.path(key), verified=True)
        for name in art.names():
            torch.from_numpy(np.asarray(art.group[name][...]).copy())
        return time.perf_counter() - start
    if mode == "unverified":
        art = Artifact(store.path(key), verified=True)  # hashing skipped: the old behaviour
    elif mode == "verified":
        store._verified.pop(key, None)
        art = store.open(key)
    else:
        store._verified.pop(key, None)
        assert store.check(key) == "", key
        art = store.open(key) if mode == "check+use" else Artifact(store.path(key))
    for name in art.names():
        art.get(name)
    return time.perf_counter() - start


def hash_speeds(mb: int, repeat: int) -> dict[str, float]:
    """GB/s of each candidate over `mb` MB of random bytes (best of `repeat`)."""
    buf = np.random.default_rng(0).integers(0, 256, mb * 2**20, dtype=np.uint8)
    view = memoryview(buf)
    candidates = {"blake2b_128 (hashlib)": lambda: hashlib.blake2b(view, digest_size=16).hexdigest()}
    try:
        import xxhash

        candidates["xxh3_128 (xxhash)"] = lambda: xxhash.xxh3_128(view).hexdigest()
        candidates["xxh3_64 (xxhash)"] = lambda: xxhash.xxh3_64(view).hexdigest()
    except ImportError:
        pass
    try:
        import blake3

        candidates["blake3 (1 thread)"] = lambda: blake3.blake3(view).hexdigest()
        candidates[f"blake3 ({os.cpu_count()} threads)"] = lambda: blake3.blake3(
            view, max_threads=blake3.blake3.AUTO).hexdigest()
    except ImportError:
        pass
    candidates["memcpy (numpy copy, for scale)"] = lambda: buf.copy()
    out = {}
    for name, fn in candidates.items():
        best = min(_timed(fn) for _ in range(repeat))
        out[name] = round(buf.nbytes / best / 1e9, 2)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, help="measure this existing store (read-only) instead of building one")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "verify_on_read")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many reads per figure")
    ap.add_argument("--hash-mb", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "verify_on_read.json")
    args = ap.parse_args()

    if args.store is not None:
        store = Store.open_existing(args.store)
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        store = Store.create_or_open(args.work / "store")
        build(store)
    modes = ("before", "unverified", "verified", "check+use", "check+use, no memo")
    rows = []
    for info in store.list():
        files = files_of(info.path)
        row = {"key": info.key, "kind": info.kind, "tensors": len(info.attrs.get("tensors", [])),
               "bytes": sum(f.stat().st_size for f in files),
               "algorithm": info.attrs.get("checksum_algorithm", "blake2b_128")}
        for mode in modes:
            read_all(store, info.key, mode)  # warm the page cache
            row[f"{mode} warm s"] = round(min(read_all(store, info.key, mode) for _ in range(args.repeat)), 4)
            cold = []
            for _ in range(args.repeat):
                evict(files)
                cold.append(read_all(store, info.key, mode))
            row[f"{mode} cold s"] = round(min(cold), 4)
        rows.append(row)

    total = {f"{m} {t} s": round(sum(r[f"{m} {t} s"] for r in rows), 4) for m in modes for t in ("warm", "cold")}
    total["bytes"] = sum(r["bytes"] for r in rows)
    overhead = {t: {m: round(total[f"{m} {t} s"] / total[f"before {t} s"] - 1, 3) for m in modes[1:]}
                for t in ("warm", "cold")}
    result = {
        "machine": {"cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name")), ""), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "store": str(store.root), "artifacts": rows, "total": total,
        "change_vs_before": overhead,
        "hash_gb_per_s": hash_speeds(args.hash_mb, args.repeat), "hash_mb": args.hash_mb,
    }

    for t in ("warm", "cold"):
        print(f"\nseconds to read every tensor, {t}")
        print(f"{'artifact':14} {'kind':7} {'MB':>7} " + " ".join(f"{m:>19}" for m in modes))
        for r in rows + [{"key": "all", "kind": "", **total}]:
            print(f"{r['key'][:12]:14} {r['kind']:7} {r['bytes'] / 1e6:7.1f} "
                  + " ".join(f"{r[f'{m} {t} s']:>19.4f}" for m in modes))
        print(f"change vs before ({t}): " + ", ".join(f"{m} {v * 100:+.0f}%" for m, v in overhead[t].items()))
    print(f"checksum throughput over {args.hash_mb} MB: "
          + ", ".join(f"{k} {v} GB/s" for k, v in result["hash_gb_per_s"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
