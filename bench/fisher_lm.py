"""Per-token Fisher of a causal LM: fmerge's engine against the plain loop (one backward pass per
predicted token), time and agreement, on randomly initialised Llama-shaped models built locally.

The loop runs each sequence unpadded and, for every predicted token, torch.autograd.grad of that
token's log-likelihood over all parameters, squared and summed; both are divided by the token
count. Its sampled tokens are drawn (with the engine's per-example generators) from CDFs formed
as the engine forms them, so that both square the same tokens; "moved draws" counts the tokens
that an unbatched forward pass with a row-by-row CDF would have drawn differently. Agreement: the largest elementwise |engine − loop|, and the largest per-tensor relative
error ‖engine − loop‖ / ‖loop‖. Sequences have different lengths and are right-padded in batches.

    .venv/bin/python bench/fisher_lm.py [--size tiny|small] [--device cpu|cuda] [--sequences 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fmerge.fisher import causal_lm_extras, example_generator, fisher_diagonal  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fisher_lm.json"
SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab, longest sequence
    "tiny": (32, 2, 2, 1, 64, 60, 12),
    "small": (256, 4, 4, 2, 688, 8000, 64),
}


def build(size: str, arch: str, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, longest = SIZES[size]
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                           n_positions=2 * longest, bos_token_id=0, eos_token_id=0,
                                           attn_implementation="eager"))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                             num_hidden_layers=layers, num_attention_heads=heads,
                                             num_key_value_heads=kv, tie_word_embeddings=False,
                                             attn_implementation="eager"))
    return model.to(device).eval(), vocab, longest


def sequences(n: int, vocab: int, longest: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (int(torch.randint(longest // 2, longest + 1, (), generator=g)),), generator=g)
            for _ in range(n)]


def batches(seqs: list[torch.Tensor], batch_size: int):
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(chunk):
            ids[row, :len(s)], mask[row, :len(s)] = s, 1
        yield {"input_ids": ids, "attention_mask": mask, "example_ids": torch.arange(start, start + len(chunk))}


def batched_cdfs(model, seqs, batch_size: int, device: str) -> list[torch.Tensor]:
    """Each sequence's next-token CDFs, formed as the engine forms them (same padded batches, one
    cumulative sum over all of a sequence's positions): the loop draws its sampled tokens from
    these, since with a big vocabulary many draws fall so near a CDF boundary that the rounding of
    an unbatched forward pass, or of a cumulative sum over one row, picks a neighbouring token."""
    out = []
    with torch.no_grad():
        for batch in batches(seqs, batch_size):
            inputs = {k: v.to(device) for k, v in batch.items() if k != "example_ids"}
            logits = model(**inputs, **causal_lm_extras(inputs, {"use_cache", "position_ids"})).logits
            for row, length in enumerate(inputs["attention_mask"].sum(1).tolist()):
                out.append(torch.softmax(logits[row, :length - 1].float(), -1).cumsum(-1))
    return out


def loop(model, seqs, estimator: str, device: str, cdfs=None) -> tuple[dict[str, torch.Tensor], int]:
    """The per-token Fisher, and how many sampled tokens a row-by-row cumulative sum would draw
    differently (the draws the comparison would otherwise disagree on)."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    tokens = moved = 0
    for i, s in enumerate(seqs):
        log_p = torch.log_softmax(model(input_ids=s[None].to(device), use_cache=False).logits[0].float(), -1)
        uniforms = torch.rand(len(s), 1, generator=example_generator(0, i)).to(device)
        for t in range(1, len(s)):
            if estimator == "empirical":
                y = int(s[t])
            else:
                cdf = cdfs[i][t - 1]
                y = min(int(torch.searchsorted(cdf, uniforms[t] * cdf[-1])), len(cdf) - 1)
                own = log_p[t - 1].detach().exp().cumsum(0)
                moved += y != min(int(torch.searchsorted(own, uniforms[t] * own[-1])), len(own) - 1)
            grads = torch.autograd.grad(log_p[t - 1, y], list(params.values()), retain_graph=True, allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    sums[n] += g.float() ** 2
            tokens += 1
    return {n: v / tokens for n, v in sums.items()}, moved


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): on a busy machine the CPU time of a
    one-thread run is the steadier figure."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    rows = []
    for arch in ("llama", "gpt2"):
        model, vocab, longest = build(args.size, arch, args.device)
        seqs = sequences(args.sequences, vocab, longest)
        for estimator in ("empirical", "sampled"):
            fs, engine_s, engine_cpu = timed(lambda: fisher_diagonal(model, batches(seqs, args.batch_size), estimator,
                                                         chunk_size=args.batch_size))
            cdfs = batched_cdfs(model, seqs, args.batch_size, args.device)
            (reference, moved), loop_s, loop_cpu = timed(lambda: loop(model, seqs, estimator, args.device, cdfs))
            mean = fs.mean()
            max_abs = max(float((mean[n] - r).abs().max()) for n, r in reference.items())
            max_rel = max(float((mean[n] - r).norm() / r.norm()) for n, r in reference.items() if r.norm() > 0)
            rows.append({"arch": arch, "estimator": estimator, "tokens": fs.count, "engine_s": engine_s,
                         "engine_cpu_s": engine_cpu, "loop_s": loop_s, "loop_cpu_s": loop_cpu, "max_abs_error": max_abs, "max_rel_error": max_rel,
                         "largest_entry": max(float(r.max()) for r in reference.values()),
                         "draws_moved_by_rounding": moved})
    print(f"size {args.size}, device {args.device}, {args.sequences} sequences, batch {args.batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'arch':6} {'estimator':10} {'tokens':>6} {'engine s':>9} {'cpu s':>7} {'loop s':>8} {'cpu s':>7} "
          f"{'max |err|':>10} {'max rel':>9} {'max F':>9} {'moved draws':>11}")
    for r in rows:
        print(f"{r['arch']:6} {r['estimator']:10} {r['tokens']:6d} {r['engine_s']:9.2f} {r['engine_cpu_s']:7.2f} "
              f"{r['loop_s']:8.2f} {r['loop_cpu_s']:7.2f} "
              f"{r['max_abs_error']:10.2e} {r['max_rel_error']:9.2e} {r['largest_entry']:9.2e} {r['draws_moved_by_rounding']:11d}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"size": args.size, "device": args.device, "sequences": args.sequences,
                                   "batch_size": args.batch_size, "machine": platform.machine(),
                                   "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
