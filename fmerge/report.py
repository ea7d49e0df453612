"""Evaluation results as tables: rows are base, individual models and merges; columns tasks."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table


def results_table(results: list[dict], title: str) -> Table:
    """Accuracy per task; a language-modelling task shows perplexity instead (marked, and left
    out of the averages, which are over accuracies)."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    metric = {r["task"]: r.get("metric", "accuracy") for r in results}
    value = {(r["variant"], r["task"]): r[metric[r["task"]]] for r in results}
    acc = {key: a for key, a in value.items() if metric[key[1]] == "accuracy"}
    chosen = {r["variant"]: r["selected_on"] for r in results if r.get("selected_on")}
    split = results[0]["split"] if results else ""
    caption = None
    if chosen:
        caption = (f"* chosen among a sweep's variants by average accuracy on split "
                   f"'{', '.join(sorted(set(chosen.values())))}', reported on '{split}'")
    what = "accuracy" + ("; perplexity (lower is better) where marked" if "perplexity" in metric.values() else "")
    table = Table(title=f"{title}: {what} on split '{split}'", caption=caption)
    table.add_column("model")
    for t in tasks:
        table.add_column(escape(t) + (" (perplexity)" if metric[t] == "perplexity" else ""), justify="right")
    table.add_column("avg", justify="right")
    table.add_column("normalized", justify="right")
    for v in variants:
        row = [acc.get((v, t)) for t in tasks]
        have = [a for a in row if a is not None]
        avg = sum(have) / len(have) if have else None
        norm = [a / acc[("individual", t)] for a, t in zip(row, tasks)
                if a is not None and acc.get(("individual", t))]
        cells = [value.get((v, t)) for t in tasks]
        table.add_row(escape(v) + (" *" if v in chosen else ""), *[f"{a:.3f}" if a is not None else "-" for a in cells],
                      f"{avg:.3f}" if avg is not None else "-",
                      f"{sum(norm) / len(norm):.3f}" if norm else "-")
    return table


def sweep_table(sweep: dict) -> Table:
    """A sweep's variants with their selection-split scores under the metric that chose; the chosen
    one marked."""
    tasks, metric = sweep["tasks"], sweep["metric"]
    best = "highest" if metric == "accuracy" else "lowest"
    table = Table(title=f"sweep of {sweep['group']}: {metric} on split '{sweep['split']}' "
                        f"(chosen by {best} average)")
    table.add_column("variant")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("avg", justify="right")
    for i, v in enumerate(sweep["variants"]):
        row = [sweep[metric][t][i] for t in tasks]
        mark = " [bold green]← chosen[/]" if v == sweep["chosen"] else ""
        table.add_row(escape(v) + mark, *[f"{a:.3f}" for a in row], f"{sum(row) / len(row):.3f}")
    return table
