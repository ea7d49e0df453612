"""A λ-only change of the demo's Fisher merge against reading that merge's inputs once.

Issue 14's target: recomputing the demo's exact-Fisher merge after a change of λ alone (the four
fine-tunes and their Fishers cached) takes at most 1.5x the time to read its inputs once. Uses
`recipes/demo.yaml` and its store (`make demo` first). Each run merges a λ the store has never
seen (a seeded random weight for one model), so nothing is served from the cache; it times

- the merge step in process (planning from cached artifacts, the merge, the store write), and
- reading every input once: each model's tensors (four fine-tunes and the base) and every tensor
  of the four Fisher artifacts, through the same readers the merge uses,

then prints both and their ratio (of wall time, and of CPU time, which other jobs on a shared
machine disturb less) and writes bench/results/lambda_rerun*.json. The CLI's start-up
(`bench/startup.py`) comes on top of either. `--cold` drops the inputs' pages from the page cache
(only those files) before each of the two timings. Like the CLI, it allocates large tensors in
transparent huge pages (THP_MEM_ALLOC_ENABLE=1) and keeps the cyclic GC off through start-up.

`--synthetic` needs no demo: it builds (once, in bench/work/lambda-rerun/) a project of the same
size from transformers configs with random weights: a MiniLM-shaped BERT base (22.7M parameters,
fp32, a word-level tokenizer), four classifiers fine-tuned from it (the base plus seeded noise) and
their exact Fishers on a few seeded examples (the Fisher's values do not change what a merge costs;
each is a zarr array per tensor of the same size as the demo's).

    .venv/bin/python bench/lambda_rerun.py [--repeat 3] [--cold] [--synthetic]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

# as the CLI runs a merge (cli.main): large tensors in transparent huge pages (read before torch
# loads), and the cyclic GC off through start-up, then on with start-up's objects frozen
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
gc.disable()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _common import evict  # noqa: E402
from merge import machine  # noqa: E402

from rich.console import Console  # noqa: E402

from fmerge import executor  # noqa: E402
from fmerge.api import load_recipe  # noqa: E402
from fmerge.recipe import BASE  # noqa: E402
from fmerge.runtime import Runtime  # noqa: E402
from fmerge.store import Store  # noqa: E402

DEMO = ROOT / "recipes" / "demo.yaml"
SYNTHETIC = ROOT / "bench" / "work" / "lambda-rerun"
# all-MiniLM-L6-v2's shape
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)
TASKS = {"t0": 3, "t1": 5, "t2": 7, "t3": 4}  # the demo's four tasks' class counts


def build_synthetic(root: Path) -> Path:
    """The synthetic project (see the module docstring); returns its recipe. Built once."""
    recipe = root / "recipe.yaml"
    if recipe.exists():
        return recipe
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(MINILM["vocab_size"] - 5)]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(root / "base")
    torch.manual_seed(0)
    base = BertModel(BertConfig(**MINILM))
    base.save_pretrained(root / "base")
    rng = random.Random(0)
    for i, (task, classes) in enumerate(TASKS.items()):
        model = BertForSequenceClassification(BertConfig(**MINILM, num_labels=classes))
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.bert.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / "models" / task)
        (root / "data" / task).mkdir(parents=True)
        for split in ("train", "validation", "test"):
            rows = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(12)), "label": rng.randrange(classes)})
                    for _ in range(32)]
            (root / "data" / task / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    data = "".join(f"  {t}: {{path: data/{t}}}\n" for t in TASKS)
    models_ = "".join(f"  {t}: {{path: models/{t}, data: {t}}}\n" for t in TASKS)
    recipe.write_text(f"""name: lambda-rerun-synthetic
base: base
store: artifacts
seed: 0
data:
{data}models:
{models_}steps:
  fisher_exact: {{kind: fisher, estimator: exact, examples: 4, batch_size: 4, max_length: 16}}
  fisher: {{kind: merge, method: fisher, fisher: fisher_exact}}
""")
    return recipe


def runtime(recipe_file: Path, lam: list[float]) -> Runtime:
    recipe = load_recipe(recipe_file, sets=[f"fisher.params.lambda={json.dumps(lam)}"])
    return Runtime(recipe, Store(recipe.resolve(recipe.spec.store)), Console(quiet=True))


def input_sources(rt: Runtime) -> list:
    """Every tensor source the merge reads: the models, the base and the Fisher artifacts (planned
    first, so that models a step makes, the demo's fine-tunes, are bound to their artifacts)."""
    fishers = executor.plan_step(rt, "fisher_exact")
    executor.plan_step(rt, "fisher")
    sources = [rt.source(m) for m in [*rt.recipe.models, BASE]]
    return sources + [rt.store.open(d.key) for d in fishers]


def input_files(rt: Runtime) -> list[Path]:
    def artifact_files(key: str) -> list[Path]:
        return [Path(dirpath) / f for dirpath, _, names in os.walk(rt.store.path(key)) for f in names]

    files = []
    for d in executor.plan_step(rt, "fisher_exact"):
        files += artifact_files(d.key)
    executor.plan_step(rt, "fisher")
    for m in [*rt.recipe.models, BASE]:
        step = rt.spec(m).from_step
        files += artifact_files(rt.output_of(step)) if step is not None else rt.source(m).weight_files()
    return files


def read_inputs(rt: Runtime) -> tuple[float, float, int]:
    """Seconds (wall, CPU) and bytes to read every tensor the merge reads, one after another,
    through the same readers the merge uses (the store's `get` checks each Fisher tensor against
    its checksum)."""
    sources = input_sources(rt)
    start, cpu, size = time.perf_counter(), time.process_time(), 0
    for src in sources:
        for name in src.names():
            size += src.get(name).nbytes
    return time.perf_counter() - start, time.process_time() - cpu, size


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before each timing")
    ap.add_argument("--synthetic", action="store_true", help="a MiniLM-sized project of random weights, not the demo")
    ap.add_argument("--label", default="", help="added to the JSON file's name (e.g. before, after)")
    args = ap.parse_args()
    recipe = DEMO
    if args.synthetic:
        recipe = build_synthetic(SYNTHETIC)
        rt = runtime(recipe, [1.0] * len(TASKS))
        executor.run(rt, only=["fisher_exact"])  # the Fishers, computed once (cached afterwards)
    executor.resume_gc()  # what the executor does before it first computes
    rng = random.Random(args.seed)
    rows = []
    for _ in range(args.repeat):
        lam = [1.0, 1.0, 1.0, round(rng.uniform(1.5, 2.5), 6)]
        rt = runtime(recipe, lam)
        files = input_files(rt)
        if args.cold:
            evict(files)
        reads, reads_cpu, size = read_inputs(runtime(recipe, lam))
        if args.cold:
            evict(files)
        load_at = load()
        start, cpu = time.perf_counter(), time.process_time()
        (report,) = [r for r in executor.run(rt, only=["fisher"]) if r.step == "fisher"]
        merge, merge_cpu = time.perf_counter() - start, time.process_time() - cpu
        if report.state != "computed":
            raise SystemExit(f"λ {lam} was served from the cache ({report.state}); run again (another seed)")
        rows.append({"lambda": lam, "merge_s": round(merge, 3), "read_inputs_s": round(reads, 3),
                     "input_gb": round(size / 1e9, 3), "ratio": round(merge / reads, 2),
                     "merge_cpu_s": round(merge_cpu, 3), "read_inputs_cpu_s": round(reads_cpu, 3),
                     "cpu_ratio": round(merge_cpu / reads_cpu, 2), "load": load_at})
        print(f"λ {lam}: merge {merge:.2f} s, reading its inputs once {reads:.2f} s ({size / 1e9:.2f} GB), "
              f"ratio {merge / reads:.2f}; CPU {merge_cpu:.2f} s against {reads_cpu:.2f} s, ratio "
              f"{merge_cpu / reads_cpu:.2f} (load {load_at})", flush=True)
        if args.synthetic:  # the bench's own store: each merge removed again, so it does not grow
            rt.store.remove(rt.planned["fisher"][0].key)
    median = statistics.median(r["ratio"] for r in rows)
    cpu_median = statistics.median(r["cpu_ratio"] for r in rows)
    print(f"median ratio {median} (target <= 1.5: {'met' if median <= 1.5 else 'NOT met'}); median CPU ratio "
          f"{cpu_median}")
    name = "lambda_rerun" + ("-synthetic" if args.synthetic else "") + ("-cold" if args.cold else "")
    out = ROOT / "bench" / "results" / (name + (f"-{args.label}" if args.label else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "recipe": str(recipe), "cold": args.cold, "rows": rows,
                               "median_ratio": median, "median_cpu_ratio": cpu_median, "target": "merge <= 1.5 x reading inputs once"},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
