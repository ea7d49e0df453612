"""One Frank-Wolfe iteration on the demo's MiniLM tasks: batched gradients against the
one-example-at-a-time loop FusionBench uses, on the same examples.

Uses the demo recipe's fine-tuned models from the store (run `make demo` first, or at least its
finetune steps); fine-tunes nothing itself. Both variants compute the gradient of the same loss
(mean over tasks of the mean cross-entropy on `--dataset-size` validation examples per task) at
the task-arithmetic merge, then the same oracle and update; the gradients must agree to 1e-5
(max |difference| relative to the largest |gradient| entry of the body).

    .venv/bin/python bench/frank_wolfe.py [--dataset-size 32] [--chunk-size 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fmerge.executor import plan_step, selected_steps  # noqa: E402
from fmerge.methods.frank_wolfe import oracle_scores, select, step_size_at  # noqa: E402
from fmerge.api import parse_recipe  # noqa: E402
from fmerge.recipe import BASE  # noqa: E402
from fmerge.runtime import Runtime  # noqa: E402
from fmerge.steps import step_kinds  # noqa: E402
from fmerge.store import Store  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "frank_wolfe.json"


def one_iteration(step, rt, cfg, p, plan, models, tasks, chunk_size):
    """Gradient at x_0, oracle, update: (seconds of each part, loss, gradient)."""
    cfg = cfg.model_copy(update={"chunk_size": chunk_size})
    base = step.weights(rt, BASE, plan)
    raw = [step.weights(rt, m, plan) for m in models]
    x = step.initial_point(rt, cfg, "fw_bench", plan, base, raw)
    objective = step.objective(rt, cfg, p, plan, (cfg.loss,), cfg.dataset_size)
    objective(x, 0, tasks[:1])  # warm-up (first-call allocations), not timed
    t0 = time.perf_counter()
    loss, grad = objective(x, 0, tasks)
    t1 = time.perf_counter()
    choice = select(oracle_scores(grad, x, raw, raw, plan.merge, cfg.oracle), cfg.granularity)
    gamma = step_size_at(0, cfg.step_size)
    for j, n in enumerate(plan.merge):
        x[n].add_(raw[choice[j]][n] - x[n], alpha=gamma)
    t2 = time.perf_counter()
    return {"gradient_s": t1 - t0, "oracle_update_s": t2 - t1, "total_s": t2 - t0}, loss, grad, models[choice[0]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset-size", type=int, default=32, help="examples per task")
    ap.add_argument("--chunk-size", type=int, default=32, help="examples per batched forward/backward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    demo = ROOT / "recipes" / "demo.yaml"
    text = demo.read_text().split("\nsteps:")[0] + "\nsteps:\n" + "".join(
        line + "\n" for line in demo.read_text().split("\nsteps:")[1].splitlines() if line.startswith("  ft_"))
    text += (f"  fw_bench: {{kind: frank_wolfe, dataset_size: {args.dataset_size}, max_iters: 1, "
             f"max_length: 64, chunk_size: {args.chunk_size}}}\n")
    recipe = parse_recipe(text, demo)
    rt = Runtime(recipe, Store(recipe.resolve(recipe.spec.store)), Console(file=io.StringIO()), args.device)
    for s in selected_steps(recipe, ["fw_bench"]):
        planned = plan_step(rt, s)
        if s.startswith("ft_") and not rt.store.has(planned[0].key):
            # A fine-tune of this step from an earlier fmerge version (its key covered other
            # things) is as good a model for timing: use the newest one rather than retrain.
            older = sorted((i for i in rt.store.list() if i.kind == "finetune" and i.attrs["meta"].get("step") == s),
                           key=lambda i: i.created)
            if not older:
                sys.exit(f"The demo's fine-tuned model '{s}' is not in {rt.store.root}: run `make demo` first.")
            planned[0].key = older[-1].key
    step, cfg, (p,) = step_kinds()["frank_wolfe"], recipe.steps["fw_bench"], rt.planned["fw_bench"]
    plan = step.tensor_plan(rt, cfg)
    models, tasks = step.candidates(cfg, recipe), step.task_names(cfg, recipe)

    batched, loss_b, grad_b, pick_b = one_iteration(step, rt, cfg, p, plan, models, tasks, args.chunk_size)
    looped, loss_l, grad_l, pick_l = one_iteration(step, rt, cfg, p, plan, models, tasks, 1)
    # Relative to the largest gradient entry of the whole body: some tensors (attention key
    # biases) have an exactly zero gradient in exact arithmetic, so rounding noise of 1e-10 is
    # all they hold and a per-tensor ratio would compare noise with noise.
    scale = max(float(grad_l[n].abs().max()) for n in plan.merge)
    worst = max(float((grad_b[n] - grad_l[n]).abs().max()) for n in plan.merge) / scale
    l2 = (sum(float((grad_b[n] - grad_l[n]).double().pow(2).sum()) for n in plan.merge)
          / sum(float(grad_l[n].double().pow(2).sum()) for n in plan.merge)) ** 0.5
    assert worst <= 1e-5, f"batched and looped gradients differ: {worst:.2e} relative"
    assert pick_b == pick_l and abs(loss_b - loss_l) <= 1e-5 * abs(loss_l)

    table = Table(title=f"one Frank-Wolfe iteration, all-MiniLM-L6-v2, {len(tasks)} tasks x "
                        f"{args.dataset_size} examples, {args.device}, {args.threads} thread(s)")
    for col in ("gradient", "gradient (s)", "oracle + update (s)", "iteration (s)"):
        table.add_column(col, justify="right")
    table.add_row(f"batched (chunks of {args.chunk_size})", *(f"{batched[k]:.2f}" for k in ("gradient_s", "oracle_update_s", "total_s")))
    table.add_row("one example at a time", *(f"{looped[k]:.2f}" for k in ("gradient_s", "oracle_update_s", "total_s")))
    Console().print(table)
    ratio = looped["total_s"] / batched["total_s"]
    print(f"speed-up of the iteration: {ratio:.1f}x; gradient difference: max {worst:.1e} of the largest entry, "
          f"relative L2 {l2:.1e}; "
          f"loss {loss_b:.4f}; both chose '{pick_b}'")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "frank_wolfe one iteration", "model": "all-MiniLM-L6-v2 (demo fine-tunes)", "tasks": tasks,
        "dataset_size": args.dataset_size, "chunk_size": args.chunk_size, "device": args.device,
        "threads": args.threads, "batched": batched, "one_example_at_a_time": looped, "speedup": ratio,
        "max_abs_gradient_difference_over_max_abs_gradient": worst, "relative_l2_gradient_difference": l2, "loss": loss_b, "chosen": pick_b,
        "torch": torch.__version__, "machine": platform.platform(),
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
