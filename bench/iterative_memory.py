"""Peak memory of the iterative merge steps (AdaMerging, Frank-Wolfe hard and soft), in copies of the body.

Builds a BERT body (hidden 384, 4 layers: 7.1M parameters, 27 MB in fp32) with four classifier
models around it, each with a small labelled task, then runs each step in its own process (the
step forced; the task vectors it reads are computed, one tensor at a time, by the first step that
needs them) and reads that process's peak resident memory from wait4. The baseline is a process
that imports fmerge, plans the recipe, loads one task classifier and one task's data (which loads
`datasets` and pyarrow, ~75 MB resident whatever the model's size): the peak above it, divided by
the body's size, is the number of body copies the step holds at once.

    .venv/bin/python bench/iterative_memory.py [--label after]

prints a table and writes bench/results/iterative_memory-<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work" / "iterative_memory"
WORDS = "good great fine bad awful poor cat dog fish red blue green one two three four".split()
TASKS = {"sentiment": [["good", "great"], ["bad", "awful"]], "animal": [["cat"], ["dog"], ["fish"]],
         "color": [["red"], ["blue", "green"]], "number": [["one", "two"], ["three", "four"]]}
CONFIG = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536,
              max_position_embeddings=64)
STEPS = {
    "adamerging": "{kind: adamerging, steps: 3, batch_size: 8, examples: 16, max_length: 16}",
    "frank_wolfe": "{kind: frank_wolfe, max_iters: 2, dataset_size: 8, max_length: 16}",
    "frank_wolfe_soft": "{kind: frank_wolfe_soft, max_iters: 1, ada_iters: 2, dataset_size: 8, max_length: 16}",
}


def build() -> Path:
    """The base, the four models and their data, written once under bench/work/."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    if (WORK / "recipe.yaml").is_file():
        return WORK / "recipe.yaml"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(WORK / "base")
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=len(vocab), **CONFIG))
    base.save_pretrained(WORK / "base")
    data, entries = [], []
    for seed, (name, classes) in enumerate(TASKS.items()):
        rng = random.Random(seed)
        (WORK / "data" / name).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", 32), ("validation", 32), ("test", 32)):
            rows = []
            for _ in range(n):
                label = rng.randrange(len(classes))
                words = [rng.choice(classes[label]) for _ in range(3)] + [rng.choice(WORDS) for _ in range(2)]
                rows.append(json.dumps({"text": " ".join(words), "label": label}))
            (WORK / "data" / name / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        torch.manual_seed(10 + seed)
        model = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), num_labels=len(classes), **CONFIG))
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.bert.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(WORK / "models" / name)
        data.append(f"  {name}: {{path: data/{name}}}")
        entries.append(f"  {name}: {{path: models/{name}, data: {name}}}")
    steps = "\n".join(f"  {name}: {spec}" for name, spec in STEPS.items())
    (WORK / "recipe.yaml").write_text("base: base\nstore: store\nseed: 0\ndata:\n" + "\n".join(data)
                                      + "\nmodels:\n" + "\n".join(entries) + "\nsteps:\n" + steps + "\n")
    return WORK / "recipe.yaml"


CHILD = """
import sys
from rich.console import Console
from fmerge import executor
from fmerge.api import load_recipe
from fmerge.runtime import Runtime
from fmerge.store import Store
r = load_recipe(sys.argv[1])
rt = Runtime(r, Store(r.resolve(r.spec.store)), Console(quiet=True))
step = sys.argv[2]
if step == "baseline":
    from fmerge.tasks import build_task_model, load_subset
    for s in r.steps:
        executor.plan_step(rt, s)
    build_task_model(rt, "sentiment")
    load_subset(rt, "sentiment", "validation", None, 0)
else:
    executor.run(rt, only=[step], force=[step])
"""


def peak_mb(recipe: Path, step: str) -> tuple[float, float]:
    """(peak resident MB, wall seconds) of one child process running `step`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(recipe), step],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"step {step} failed:\n{proc.stderr.read().decode()}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="after")
    args = parser.parse_args()
    recipe = build()
    params = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(WORK / "base" / "model.safetensors")).values())
    body_mb = params * 4 / 2**20
    baseline, _ = peak_mb(recipe, "baseline")
    rows = []
    for step in STEPS:
        peak, wall = peak_mb(recipe, step)
        rows.append({"step": step, "peak_mb": round(peak, 1), "above_baseline_mb": round(peak - baseline, 1),
                     "body_copies": round((peak - baseline) / body_mb, 2), "wall_s": round(wall, 1)})
    print(f"body: {params / 1e6:.1f}M parameters, {body_mb:.1f} MB fp32; baseline peak {baseline:.0f} MB")
    print(f"{'step':<18} {'peak MB':>8} {'above base':>11} {'body copies':>12} {'wall s':>7}")
    for r in rows:
        print(f"{r['step']:<18} {r['peak_mb']:>8.0f} {r['above_baseline_mb']:>11.0f} {r['body_copies']:>12.2f} "
              f"{r['wall_s']:>7.1f}")
    out = ROOT / "results" / f"iterative_memory-{args.label}.json"
    out.write_text(json.dumps({"label": args.label, "params": params, "body_mb": round(body_mb, 1),
                               "baseline_mb": round(baseline, 1), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
