"""Evaluation results as a table: rows are base, individual models and merges; columns tasks."""

from __future__ import annotations

from rich.table import Table


def results_table(results: list[dict], title: str) -> Table:
    tasks = list(dict.fromkeys(r["task"] for r in results))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    acc = {(r["variant"], r["task"]): r["accuracy"] for r in results}
    split = results[0]["split"] if results else ""
    table = Table(title=f"{title}: accuracy on split '{split}'")
    table.add_column("model")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("avg", justify="right")
    table.add_column("normalized", justify="right")
    for v in variants:
        row = [acc.get((v, t)) for t in tasks]
        have = [a for a in row if a is not None]
        avg = sum(have) / len(have) if have else None
        norm = [a / acc[("individual", t)] for a, t in zip(row, tasks)
                if a is not None and acc.get(("individual", t))]
        table.add_row(v, *[f"{a:.3f}" if a is not None else "-" for a in row],
                      f"{avg:.3f}" if avg is not None else "-",
                      f"{sum(norm) / len(norm):.3f}" if norm else "-")
    return table
