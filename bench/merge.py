"""fmerge against mergekit on the same LLM merges: wall time, peak memory, and the disk's read limit.

Makes a base and three "fine-tuned" Llama-shaped models with random bf16 weights (TinyLlama's
shape at the default ~1.1B parameters: 22 layers, vocabulary 32000, grouped-query attention;
--size scales the width), writes one mergekit config per method, and runs the *same* config file
through `mergekit-yaml` (from bench/.venv-mergekit) and `fmerge run` (fmerge reads mergekit
configs), each under /usr/bin/time -v with the input files evicted from the page cache first
(posix_fadvise DONTNEED on these files only). Also times a plain sequential read of the same
input files, cold and warm, so each merge is placed against the disk limit, and compares the two
outputs tensor by tensor. Prints a table and writes bench/results/merge-<size>.json.

    bash bench/setup_mergekit.sh            # once: mergekit 0.1.5 in bench/.venv-mergekit
    .venv/bin/python bench/merge.py                       # ~1.1B parameters (needs ~25 GB disk)
    .venv/bin/python bench/merge.py --size 50M --methods linear ties
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fmerge.io import write_weight_files  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MERGEKIT = ROOT / "bench" / ".venv-mergekit" / "bin" / "mergekit-yaml"
FMERGE = ROOT / ".venv" / "bin" / "fmerge"
VOCAB, LAYERS = 32000, 22

CONFIGS = {
    "linear": """merge_method: linear
models:
  - model: {m1}
    parameters: {{weight: 0.4}}
  - model: {m2}
    parameters: {{weight: 0.3}}
  - model: {m3}
    parameters: {{weight: 0.3}}
dtype: bfloat16
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{density: 0.2, weight: 1.0}}
  - model: {m2}
    parameters: {{density: 0.2, weight: 1.0}}
  - model: {m3}
    parameters: {{density: 0.2, weight: 1.0}}
parameters: {{normalize: true, lambda: 1.0}}
dtype: bfloat16
""",
}

# The same TIES as an fmerge recipe: fmerge's own rule (exactly ⌈density·n⌉ kept, lowest index
# among equal magnitudes) instead of `rule: mergekit`, which a mergekit config gets so as to
# reproduce mergekit's bytes, and which must run mergekit's full argsort of every task vector.
NATIVE = {
    "ties": """base: {base}
models: {{m1: {m1}, m2: {m2}, m3: {m3}}}
steps:
  ties: {{kind: merge, method: ties, params: {{density: 0.2, weight: 1.0, lambda: 1.0, merge: mean}},
         export: {out}}}
""",
}

from _common import evict  # noqa: E402  (bench/ is on sys.path when a script runs)

def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMB]?)", text.upper())
    if not m:
        sys.exit(f"--size {text}: use e.g. 50M or 1.1B")
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2)])


def llama_shape(params: int) -> dict:
    """TinyLlama's proportions (intermediate 2.75·h, 8 query heads per KV head) at about `params`."""
    # params ≈ 2·V·h + L·(2h² + 2h·h/8 + 3h·2.75h) = L·10.75·h² + 2V·h
    a, b = LAYERS * 10.75, 2 * VOCAB
    h = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    h = max(64, int(round(h / 64)) * 64)
    heads = h // 64
    return {"hidden_size": h, "intermediate_size": int(round(2.75 * h / 64)) * 64, "num_hidden_layers": LAYERS,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 8), "vocab_size": VOCAB}


def layout_of(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (kv, h))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_models(folder: Path, shape: dict) -> dict[str, Path]:
    """Base = N(0, 0.02) (norms 1); model i = base + N(0, 0.002), all bf16, written tensor by tensor."""
    paths = {name: folder / name for name in ("base", "m1", "m2", "m3")}
    if all((p / "model.safetensors").exists() or (p / "model.safetensors.index.json").exists() for p in paths.values()):
        return paths
    layout = layout_of(shape)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "rope_theta": 10000.0, **shape}

    def tensors(index: int):
        for name, dims in layout:
            seed = zlib.crc32(name.encode())
            g = torch.Generator().manual_seed(seed)
            base = torch.ones(dims) if name.endswith("norm.weight") else torch.randn(dims, generator=g) * 0.02
            if index:
                g.manual_seed(seed + 7919 * index)
                base += torch.randn(dims, generator=g) * 0.002
            yield name, base.to(torch.bfloat16)

    for index, (name, path) in enumerate(paths.items()):
        shutil.rmtree(path, ignore_errors=True)  # bench's own work folder
        path.mkdir(parents=True)
        write_weight_files(path, [(n, torch.bfloat16, d) for n, d in layout], tensors(index), {"format": "pt"})
        (path / "README.md").write_text(f"random bf16 Llama-shaped model for bench/merge.py ({name})\n")
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return paths


def weight_files(paths) -> list[Path]:
    return sorted(f for p in paths for f in p.glob("*.safetensors"))


def read_all(files: list[Path]) -> float:
    """Seconds to read every byte once, 16 MiB at a time."""
    start = time.perf_counter()
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run under /usr/bin/time -v; wall seconds and peak RSS (GB) from its report."""
    proc = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"seconds": round(seconds, 2), "peak_rss_gb": round(rss_kb / 1e6, 3)}


def compare(a: Path, b: Path) -> dict:
    """Per-tensor agreement of two merged models (bf16): share of equal entries, largest difference."""
    from fmerge.io import ModelDir

    x, y = ModelDir(a), ModelDir(b)
    equal = total = 0
    worst = 0.0
    for name in x.names():
        s, t = x.get(name).float(), y.get(name).float()
        equal += int((s == t).sum())
        total += s.numel()
        worst = max(worst, float((s - t).abs().max()))
    return {"equal_fraction": round(equal / total, 6), "max_abs_diff": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1.1B", help="total parameters per model, e.g. 50M, 1.1B")
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work", help="models and outputs go here")
    ap.add_argument("--tools", nargs="+", default=["fmerge", "mergekit"], choices=["fmerge", "mergekit"])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both tools")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = ap.parse_args()
    if "mergekit" in args.tools and not MERGEKIT.exists():
        sys.exit(f"{MERGEKIT} is missing: run `bash bench/setup_mergekit.sh` first (or --tools fmerge).")

    shape = llama_shape(parse_size(args.size))
    n_params = sum(math.prod(d) for _, d in layout_of(shape))
    folder = args.work / f"llama-{args.size}"
    print(f"models: {n_params / 1e6:.0f}M parameters each, bf16, {shape}", flush=True)
    start = time.perf_counter()
    paths = make_models(folder / "models", shape)
    print(f"models ready in {time.perf_counter() - start:.0f}s", flush=True)
    inputs = weight_files(paths.values())
    input_bytes = sum(f.stat().st_size for f in inputs)
    evict(inputs)
    cold_by_model = {}
    for name, path in paths.items():  # each model's files alone: linear reads no base
        cold_by_model[name] = read_all(weight_files([path]))
    cold = sum(cold_by_model.values())
    warm = read_all(inputs)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    for method in args.methods:
        config = folder / f"{method}.yml"
        config.write_text(CONFIGS[method].format(**{k: str(v) for k, v in paths.items()}))
        out = {}
        for tool in args.tools:
            target = folder / f"{method}-{tool}"
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(folder / f"{method}-merged", ignore_errors=True)
            store = folder / "store"
            shutil.rmtree(store, ignore_errors=True)  # a cold run: no cached artifact, no cached hash
            evict(inputs)
            if tool == "mergekit":
                cmd = [MERGEKIT, config, target, "--no-cuda", "--quiet", "--no-copy-tokenizer", "-j", args.threads]
            else:
                cmd = [FMERGE, "run", config, "--store", store, "--device", "cpu"]
            print(f"{method}: {tool} ...", flush=True)
            out[tool] = timed(cmd, env)
            if tool == "fmerge":
                os.replace(folder / f"{method}-merged", target)
            print(f"{method}: {tool} {out[tool]}", flush=True)
            if tool == "fmerge" and method in NATIVE:
                recipe = folder / f"{method}-native.yaml"
                recipe.write_text(NATIVE[method].format(out=folder / f"{method}-fmerge-native",
                                                        **{k: str(v) for k, v in paths.items()}))
                shutil.rmtree(folder / f"{method}-fmerge-native", ignore_errors=True)
                shutil.rmtree(store, ignore_errors=True)
                evict(inputs)
                print(f"{method}: fmerge, its own rule ...", flush=True)
                out["fmerge_native"] = timed([FMERGE, "run", recipe, "--store", store, "--device", "cpu"], env)
                print(f"{method}: fmerge, its own rule {out['fmerge_native']}", flush=True)
        row = {"method": method, **out}
        if "fmerge" in out and "mergekit" in out:
            row["time_ratio_mergekit_over_fmerge"] = round(out["mergekit"]["seconds"] / out["fmerge"]["seconds"], 2)
            row["rss_ratio_fmerge_over_mergekit"] = round(out["fmerge"]["peak_rss_gb"] / out["mergekit"]["peak_rss_gb"], 2)
            row["outputs"] = compare(folder / f"{method}-fmerge", folder / f"{method}-mergekit")
            if "fmerge_native" in out:
                row["native_time_ratio_mergekit_over_fmerge"] = round(out["mergekit"]["seconds"] / out["fmerge_native"]["seconds"], 2)
                row["native_rss_ratio_fmerge_over_mergekit"] = round(out["fmerge_native"]["peak_rss_gb"] / out["mergekit"]["peak_rss_gb"], 2)
                row["native_outputs"] = compare(folder / f"{method}-fmerge-native", folder / f"{method}-mergekit")
        rows.append(row)
        if not args.keep:
            for tool in [*args.tools, "fmerge-native"]:
                shutil.rmtree(folder / f"{method}-{tool}", ignore_errors=True)

    result = {
        "size": args.size, "parameters_per_model": n_params, "shape": shape, "dtype": "bfloat16",
        "input_bytes": input_bytes, "read_cold_s": round(cold, 2), "read_warm_s": round(warm, 2),
        "read_cold_gb_per_s": round(input_bytes / cold / 1e9, 2), "read_warm_gb_per_s": round(input_bytes / warm / 1e9, 2),
        "read_cold_s_by_model": {k: round(v, 2) for k, v in cold_by_model.items()},
        "threads": args.threads, "machine": machine(), "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"merge-{args.size}.json"
    result["targets"] = target_lines(result)
    path.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {path}")


def machine() -> dict:
    mem = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")), "0")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    if MERGEKIT.exists():
        pip = MERGEKIT.parent / "pip"
        shown = subprocess.run([pip, "show", "mergekit"], capture_output=True, text=True).stdout
        versions["mergekit"] = next((line.split()[1] for line in shown.splitlines() if line.startswith("Version")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(int(mem) / 1e6, 1), **versions}


def print_table(r: dict) -> None:
    gb = r["input_bytes"] / 1e9
    print(f"\n{r['parameters_per_model'] / 1e6:.0f}M-parameter bf16 models, 4 input files {gb:.2f} GB; "
          f"plain read {r['read_cold_s']}s cold ({r['read_cold_gb_per_s']} GB/s), {r['read_warm_s']}s warm")
    print(f"{'method':8} {'tool':13} {'wall s':>8} {'peak RSS GB':>12} {'x read':>7}")
    for row in r["rows"]:
        for tool in ("fmerge", "fmerge_native", "mergekit"):
            if tool in row:
                t = row[tool]
                print(f"{row['method']:8} {tool:13} {t['seconds']:8.1f} {t['peak_rss_gb']:12.2f} "
                      f"{t['seconds'] / r['read_cold_s']:7.1f}")
        if "time_ratio_mergekit_over_fmerge" in row:
            print(f"{'':8} mergekit/fmerge time {row['time_ratio_mergekit_over_fmerge']}x, fmerge/mergekit memory "
                  f"{row['rss_ratio_fmerge_over_mergekit']}x, outputs equal {row['outputs']['equal_fraction']:.4f} "
                  f"(max diff {row['outputs']['max_abs_diff']:.2g})")
        if "native_time_ratio_mergekit_over_fmerge" in row:
            print(f"{'':8} fmerge's own rule: mergekit/fmerge time {row['native_time_ratio_mergekit_over_fmerge']}x, "
                  f"memory {row['native_rss_ratio_fmerge_over_mergekit']}x, outputs equal "
                  f"{row['native_outputs']['equal_fraction']:.4f} (max diff {row['native_outputs']['max_abs_diff']:.2g})")
    print("\ntargets (issue 14; at 1.1B on a quiet machine):")
    for line in target_lines(r):
        print("  " + line)


# (method, what, value of a row, goal, True if the value must be at least the goal)
TARGETS = [
    ("linear", "mergekit/fmerge time", lambda r, row: row.get("time_ratio_mergekit_over_fmerge"), 1.5, True),
    ("linear", "share of the inputs' cold read bandwidth (its three models; no base)",
     lambda r, row: round(sum(v for k, v in r["read_cold_s_by_model"].items() if k != "base")
                          / row["fmerge"]["seconds"], 2) if "fmerge" in row else None, 0.6, True),
    ("ties", "mergekit/fmerge time (mergekit config: rule mergekit, mergekit's bytes)",
     lambda r, row: row.get("time_ratio_mergekit_over_fmerge"), 4.0, True),
    ("ties", "mergekit/fmerge time (fmerge recipe: fmerge's own rule)",
     lambda r, row: row.get("native_time_ratio_mergekit_over_fmerge"), 4.0, True),
    ("linear", "fmerge/mergekit peak RSS", lambda r, row: row.get("rss_ratio_fmerge_over_mergekit"), 0.2, False),
    ("ties", "fmerge/mergekit peak RSS", lambda r, row: row.get("rss_ratio_fmerge_over_mergekit"), 0.2, False),
    ("ties", "fmerge/mergekit peak RSS (fmerge's own rule)",
     lambda r, row: row.get("native_rss_ratio_fmerge_over_mergekit"), 0.2, False),
]


def target_lines(r: dict) -> list[str]:
    """Each target of the issue against this run's figure: met, not met, or not measured."""
    rows = {row["method"]: row for row in r["rows"]}
    lines = []
    for method, what, value_of, goal, at_least in TARGETS:
        value = value_of(r, rows[method]) if method in rows else None
        sign = ">=" if at_least else "<="
        if value is None:
            verdict = "not measured in this run"
        else:
            verdict = f"{value} -> {'met' if (value >= goal if at_least else value <= goal) else 'NOT met'}"
        lines.append(f"{method:6} {what} {sign} {goal}: {verdict}")
    lines.append("store write >= 0.8 GB/s: measured by bench/store.py")
    return lines


if __name__ == "__main__":
    main()
