"""Plot the per-step loss that AdaMerging / Frank-Wolfe recorded in their artifacts (meta `trace`).

    .venv/bin/python bench/iterative_curves.py --store artifacts --out docs/adamerging_curves.png \
        "cross-entropy, lr 1e-2=026b625dae42" "entropy, lr 1e-2=835d8b034ca6"

Each LABEL=KEY names an artifact (a unique key prefix is enough); the figures come from the store,
so the plot shows what the runs did, nothing recomputed. Also writes the curves as JSON next to the
picture.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=KEY")
    ap.add_argument("--store", default="artifacts")
    ap.add_argument("--out", default="bench/results/iterative_curves.png")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmerge.api import open_store

    store = open_store(args.store)
    curves = {}
    for run in args.runs:
        label, _, key = run.rpartition("=")
        meta = store.open(key).meta
        curves[label] = [t["loss"] for t in meta["trace"]]
        print(f"{label}: {len(curves[label])} steps, loss {curves[label][0]:.3f} -> {curves[label][-1]:.3f}")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, losses in curves.items():
        ax.plot(range(len(losses)), losses, label=label)
    ax.set_xlabel("Adam step")
    ax.set_ylabel("loss, adaptation split")
    ax.set_title("each step: one batch per task, its mean loss", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(curves, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
