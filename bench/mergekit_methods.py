"""fmerge against mergekit 0.1.5 on the methods fmerge reads from mergekit configs beyond linear and
TIES: slerp, nuslerp, model_stock, breadcrumbs(_ties), della(_linear) and passthrough slices.

Uses bench/merge.py's random Llama-shaped bf16 models (a base and three "fine-tunes"), writes one
mergekit config per method with `dtype: float32` (both tools then compute and write fp32, so the
outputs can be compared bit for bit), and runs the *same* file through `mergekit-yaml` and
`fmerge run`, each cold (fresh store, inputs evicted from the page cache) under /usr/bin/time -v.
DELLA is random in both tools with different generators: its outputs are not expected to agree.
Prints a table and writes bench/results/mergekit-methods-<size>.json.

    bash bench/setup_mergekit.sh            # once: mergekit 0.1.5 in bench/.venv-mergekit
    .venv/bin/python bench/mergekit_methods.py --size 20M
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from merge import FMERGE, LAYERS, MERGEKIT, RESULTS, ROOT, compare, layout_of, llama_shape, machine, make_models, parse_size, timed

from _common import evict

CONFIGS = {
    "slerp": """merge_method: slerp
base_model: {base}
models:
  - model: {m1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    "nuslerp": """merge_method: nuslerp
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.4}}
  - model: {m2}
    parameters: {{weight: 0.6}}
""",
    "model_stock": """merge_method: model_stock
base_model: {base}
models:
  - model: {m1}
  - model: {m2}
  - model: {m3}
""",
    "breadcrumbs": """merge_method: breadcrumbs
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.4, density: 0.9, gamma: 0.01}}
  - model: {m2}
    parameters: {{weight: 0.3, density: 0.9, gamma: 0.01}}
  - model: {m3}
    parameters: {{weight: 0.3, density: 0.9, gamma: 0.01}}
""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 1.0, density: 0.5, gamma: 0.01}}
  - model: {m2}
    parameters: {{weight: 1.0, density: 0.5, gamma: 0.01}}
  - model: {m3}
    parameters: {{weight: 1.0, density: 0.5, gamma: 0.01}}
parameters: {{normalize: true}}
""",
    "della": """merge_method: della
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}
  - model: {m2}
    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}
  - model: {m3}
    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}
""",
    "della_linear": """merge_method: della_linear
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.4, density: 0.5, epsilon: 0.1}}
  - model: {m2}
    parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}
""",
    "passthrough": f"""merge_method: passthrough
slices:
  - sources:
      - model: {{m1}}
        layer_range: [0, {LAYERS}]
  - sources:
      - model: {{m2}}
        layer_range: [{LAYERS // 2}, {LAYERS}]
""",
}
RANDOM = ("della", "della_linear")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="20M", help="total parameters per model, e.g. 20M, 1.1B")
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work", help="models and outputs go here")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both tools")
    args = ap.parse_args()
    if not MERGEKIT.exists():
        sys.exit(f"{MERGEKIT} is missing: run `bash bench/setup_mergekit.sh` first.")
    shape = llama_shape(parse_size(args.size))
    n_params = sum(math.prod(d) for _, d in layout_of(shape))
    folder = args.work / f"llama-{args.size}"
    print(f"models: {n_params / 1e6:.0f}M parameters each, bf16, {shape}", flush=True)
    paths = make_models(folder / "models", shape)
    inputs = sorted(f for p in paths.values() for f in p.glob("*.safetensors"))
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    rows = []
    for method in args.methods:
        config = folder / f"{method}.yml"
        config.write_text(CONFIGS[method].format(**{k: str(v) for k, v in paths.items()}) + "dtype: float32\n")
        row: dict = {"method": method}
        for tool in ("mergekit", "fmerge"):
            target = folder / f"{method}-{tool}"
            for stale in (target, folder / f"{method}-merged", folder / "store"):
                shutil.rmtree(stale, ignore_errors=True)  # the bench's own outputs: every run is cold
            evict(inputs)
            if tool == "mergekit":
                cmd = [MERGEKIT, config, target, "--no-cuda", "--quiet", "--no-copy-tokenizer", "-j", args.threads]
            else:
                cmd = [FMERGE, "run", config, "--store", folder / "store", "--device", "cpu"]
            row[tool] = timed(cmd, env)
            if tool == "fmerge":
                os.replace(folder / f"{method}-merged", target)
            print(f"{method}: {tool} {row[tool]}", flush=True)
        row["time_ratio_mergekit_over_fmerge"] = round(row["mergekit"]["seconds"] / row["fmerge"]["seconds"], 2)
        row["outputs"] = compare(folder / f"{method}-fmerge", folder / f"{method}-mergekit")
        row["random"] = method in RANDOM
        row["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows.append(row)
        for tool in ("mergekit", "fmerge"):
            shutil.rmtree(folder / f"{method}-{tool}", ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"mergekit-methods-{args.size}.json"
    if path.exists():  # a run of some methods keeps the earlier rows of the others (each row says when)
        earlier = json.loads(path.read_text())
        if earlier.get("threads") == args.threads:
            rows += [r for r in earlier["rows"] if r["method"] not in args.methods]
    rows.sort(key=lambda r: list(CONFIGS).index(r["method"]))
    result = {"size": args.size, "parameters_per_model": n_params, "shape": shape, "inputs": "bfloat16",
              "compute_and_output": "float32", "threads": args.threads, "machine": machine(), "rows": rows}
    path.write_text(json.dumps(result, indent=2))
    print(f"\n{n_params / 1e6:.0f}M-parameter models, {args.threads} threads, fp32 compute and output")
    print(f"{'method':17} {'mergekit s':>10} {'fmerge s':>9} {'mk/fm':>6} {'MK RSS GB':>9} {'FM RSS GB':>9} "
          f"{'equal':>8} {'max diff':>9}")
    for r in rows:
        print(f"{r['method']:17} {r['mergekit']['seconds']:10.1f} {r['fmerge']['seconds']:9.1f} "
              f"{r['time_ratio_mergekit_over_fmerge']:6.2f} {r['mergekit']['peak_rss_gb']:9.2f} "
              f"{r['fmerge']['peak_rss_gb']:9.2f} {r['outputs']['equal_fraction']:8.4f} "
              f"{r['outputs']['max_abs_diff']:9.2g}" + ("  (random: not comparable)" if r["random"] else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
