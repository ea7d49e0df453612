"""Plot the per-step loss and accuracy that AdaMerging / Frank-Wolfe recorded in their artifacts (meta `trace`).

    .venv/bin/python bench/iterative_curves.py --store artifacts --out docs/adamerging_curves.png \
        "cross-entropy, lr 1e-2=026b625dae42" "entropy, lr 1e-2=835d8b034ca6"

Each LABEL=KEY names an artifact (a unique key prefix is enough); the figures come from the store,
so the plot shows what the runs did, nothing recomputed. Left panel: each step's mean loss on the
examples it drew from the adaptation split; right panel: the merged model's accuracy on those same
examples (trace key `accuracy`, the mean over tasks), where the run recorded it: artifacts made
before traces had accuracy, runs on causal LMs and runs on unlabelled data have none, and are left
out of that panel only. Also writes the curves as JSON next to the picture.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curves_of(trace: list[dict]) -> dict[str, list[float] | None]:
    """The loss per step and, if every step recorded one, the accuracy per step (else None)."""
    accuracy = [t.get("accuracy") for t in trace]
    return {"loss": [t["loss"] for t in trace],
            "accuracy": accuracy if trace and all(a is not None for a in accuracy) else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=KEY")
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--out", default="bench/results/iterative_curves.png")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from fmerge.api import open_store

    store = open_store(args.store)
    curves = {}
    for run in args.runs:
        label, _, key = run.rpartition("=")
        curves[label] = c = curves_of(store.open(key).meta["trace"])
        accuracy = (f", accuracy {c['accuracy'][0]:.3f} -> {c['accuracy'][-1]:.3f}" if c["accuracy"]
                    else ", no accuracy recorded")
        print(f"{label}: {len(c['loss'])} steps, loss {c['loss'][0]:.3f} -> {c['loss'][-1]:.3f}{accuracy}")
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, c in curves.items():
        marker = "o" if len(c["loss"]) <= 30 else None  # a run of a few steps stays visible
        line, = loss_ax.plot(range(len(c["loss"])), c["loss"], label=label, marker=marker, markersize=3)
        if c["accuracy"]:
            acc_ax.plot(range(len(c["accuracy"])), c["accuracy"], label=label, color=line.get_color(),
                        marker=marker, markersize=3)
    loss_ax.set_ylabel("loss, adaptation split")
    acc_ax.set_ylabel("accuracy, same examples")
    if not any(c["accuracy"] for c in curves.values()):
        acc_ax.text(0.5, 0.5, "no run recorded accuracy", ha="center", va="center", transform=acc_ax.transAxes)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("each step: one batch per task drawn from the adaptation split, the mean over tasks", fontsize=9)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(curves, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
