"""Pictures of results: a sweep's accuracy per task and on average against the swept value."""

from __future__ import annotations

from pathlib import Path


def sweep_plot(sweep: dict, path: Path) -> None:
    """One line per task and a bold average, the chosen variant marked; numeric x when one
    number is swept, else the variants' names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = sweep["swept"]
    values = next(iter(swept.values())) if len(swept) == 1 else None
    numeric = values is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(sweep["variants"])))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    tasks, metric = sweep["tasks"], sweep["metric"]
    for task in tasks:
        ax.plot(xs, sweep[metric][task], marker="o", linewidth=1, alpha=0.7, label=task)
    avg = [sum(sweep[metric][t][i] for t in tasks) / len(tasks) for i in range(len(xs))]
    ax.plot(xs, avg, marker="o", color="black", linewidth=2.5, label="average")
    if sweep["chosen"] in sweep["variants"]:
        i = sweep["variants"].index(sweep["chosen"])
        ax.scatter([xs[i]], [avg[i]], s=220, facecolors="none", edgecolors="red", linewidths=2, zorder=5,
                   label="chosen")
    if numeric:
        ax.set_xlabel(next(iter(swept)))
    else:
        ax.set_xticks(xs, [v[len(sweep["group"]):] for v in sweep["variants"]], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{metric} ({sweep['split']} split)")
    ax.set_title(f"sweep of {sweep['group']}: chosen on {sweep['split']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
