"""The `eval` step: accuracy and macro-F1 per task for the base, each fine-tuned model and merges.

Each (weights, task, settings) result is its own artifact, so re-evaluating an unchanged model is
free. A merged body is evaluated on each task through that task's own head. A swept merge (see
fmerge/sweep.py) is chosen on the selection split and only the chosen variant is scored on the
test split, so the test split never influences the choice.
"""

from __future__ import annotations

import csv
import json
import re

import torch
from pydantic import Field

from ..merging import align_names
from ..progress import tensor_progress
from ..recipe import BASE, Strict
from ..store import make_key
from ..tasks import build_task_model, data_spec, load_subset, task_batches, task_data, task_inputs
from . import Planned, StepKind, register

VERSION = 1


class EvalConfig(Strict):
    merges: list[str] = Field([], description="merge steps to evaluate")
    individual: bool = Field(True, description="also evaluate each fine-tuned model on its own task")
    base: bool = Field(True, description="also evaluate the base body with each task's head")
    split: str | None = Field(None, description="data split reported (default: each task's test split)")
    limit: int | None = Field(None, ge=1, description="seeded subset of at most this many rows")
    select_split: str | None = Field(None, description="split on which swept merges are chosen (default: each "
                                     "task's validation split); the test split is never used to choose")
    select_limit: int | None = Field(None, ge=1, description="rows per task for choosing (default: limit)")
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(64, ge=2)
    seed: int | None = None
    models: list[str] | None = Field(None, description="tasks (models) to evaluate on (default: all)")
    output: str | None = Field(None, description="write results.json and results.csv in this directory")


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@register
class EvalStep(StepKind):
    kind = "eval"
    Config = EvalConfig

    def step_refs(self, cfg):
        return [("merges", m) for m in cfg.merges]

    def model_refs(self, cfg):
        return [("models", m) for m in cfg.models or []]

    def models_used(self, cfg, recipe):
        return cfg.models or list(recipe.models)

    def plan(self, rt, name, cfg):
        """Test-split items for the base, individual models and plain merges; for a swept merge,
        every variant on the selection split, and the winner on the test split once it is known."""
        seed = cfg.seed if cfg.seed is not None else rt.recipe.spec.seed
        sweeps = rt.recipe.sweeps
        plain = [("base", "base:" + rt.model_hash(BASE))] if cfg.base else []
        plain += [(m, rt.planned[m][0].key) for m in cfg.merges if m not in sweeps]
        planned = []
        tasks = self.models_used(cfg, rt.recipe)
        for task in tasks:
            rows = [*plain, *([("individual", "model:" + rt.model_hash(task))] if cfg.individual else [])]
            for variant, weights in rows:
                planned.append(self._item(rt, name, cfg, seed, variant, weights, task, "test"))
        for group in (m for m in cfg.merges if m in sweeps):
            select = [self._item(rt, name, cfg, seed, v.name, rt.planned[v.name][0].key, task, "select", group)
                      for v in sweeps[group] for task in tasks]
            planned += select
            winner = choose(rt, select)
            if winner is not None:
                planned += [self._item(rt, name, cfg, seed, winner, rt.planned[winner][0].key, task, "test", group)
                            for task in tasks]
        return planned

    def _item(self, rt, name, cfg, seed, variant, weights, task, role, group=None) -> Planned:
        data = task_data(rt, task, ("steps", name))
        entry = rt.recipe.spec.data[data]
        split = (cfg.split or entry.test_split) if role == "test" else (cfg.select_split or entry.validation_split)
        limit = cfg.limit if role == "test" else (cfg.select_limit or cfg.limit)
        sub = load_subset(rt, data, split, limit, seed)
        params = {"split": split, "limit": limit, "max_length": cfg.max_length, "seed": seed}
        inputs = {"weights": weights, "task_model": rt.model_hash(task), "data": sub.fingerprint,
                  **task_inputs(rt, task)}
        extra = {"rows": sub.rows, "labels": sub.labels, "data": data, "variant": variant, "task": task,
                 "role": role, "group": group}
        return Planned(name, f"{variant}|{task}|{split}", "eval", make_key("eval", params, inputs, VERSION),
                       inputs, params, VERSION, extra)

    def compute(self, rt, name, cfg, todo):
        with tensor_progress(rt.console, f"{name}: evaluate", len(todo)) as advance:
            for p in todo:
                self._evaluate(rt, name, cfg, p)
                advance()
        # The winners of sweeps whose selection just finished: evaluate them on the test split.
        for p in self.plan(rt, name, cfg):
            if not rt.store.has(p.key):
                self._evaluate(rt, name, cfg, p)

    def _evaluate(self, rt, name, cfg, p) -> None:
        variant, task = p.extra["variant"], p.extra["task"]
        model = build_task_model(rt, task, self._body(rt, variant, task))
        spec = data_spec(rt, p.extra["data"], p.params["split"])
        preds, golds = [], []
        with torch.no_grad():
            for batch in task_batches(rt, task, p.extra["rows"], spec, cfg.batch_size, cfg.max_length, p.extra["labels"]):
                inputs = {k: v.to(rt.device) for k, v in batch.items() if k not in ("labels", "example_ids")}
                preds.append(model(**inputs).logits.argmax(-1).cpu())
                golds.append(batch["labels"])
        pred, gold = torch.cat(preds), torch.cat(golds)
        result = {"accuracy": float((pred == gold).float().mean()), "macro_f1": macro_f1(pred, gold, model.config.num_labels),
                  "n": int(gold.numel()), "variant": variant, "task": task, "split": p.params["split"]}
        writer = rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version)
        writer.commit({"step": name, **result})

    def _body(self, rt, variant: str, task: str) -> dict[str, torch.Tensor] | None:
        """Weights replacing the task model's own body: the base's, or a merge's (model naming)."""
        if variant == "individual":
            return None
        src = rt.source(BASE) if variant == "base" else rt.store.open(rt.planned[variant][0].key).view("weights/")
        names = align_names(src.names(), rt.source(task).names())
        return {names[r]: src.get(r) for r in src.names() if r in names and not _is_head(rt, names[r])}

    def export(self, rt, name, cfg, planned):
        planned = self.plan(rt, name, cfg)  # now with every sweep's winner
        results, selection = [], []
        for p in planned:
            # Names come from this recipe: a cached result may have been computed under other names.
            row = {**rt.store.open(p.key).meta, "variant": p.extra["variant"], "task": p.extra["task"],
                   "group": p.extra["group"]}
            (results if p.extra["role"] == "test" else selection).append(row)
        for row in results:
            row["selected_on"] = selection_split(planned, row["group"])
        rt.results[name] = results
        sweeps = summarize_sweeps(rt, planned, selection)
        rt.sweep_results[name] = sweeps
        if not cfg.output:
            return None
        out = rt.recipe.resolve(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        with open(out / "results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["variant", "task", "split", "accuracy", "macro_f1", "n", "selected_on"],
                               extrasaction="ignore")
            w.writeheader()
            w.writerows(results)
        if sweeps:
            from ..plots import sweep_plot

            (out / "sweeps.json").write_text(json.dumps(sweeps, indent=2, default=str))
            for s in sweeps:
                sweep_plot(s, out / f"sweep_{s['group']}.png")
        return f"results in {out}"


def choose(rt, select: list[Planned]) -> str | None:
    """The variant with the best average accuracy on the selection split (first on ties), or None
    while some selection result is missing. Only selection-split artifacts are read."""
    if not select or not all(rt.store.has(p.key) for p in select):
        return None
    scores: dict[str, list[float]] = {}
    for p in select:
        scores.setdefault(p.extra["variant"], []).append(rt.store.open(p.key).meta["accuracy"])
    return max(scores, key=lambda v: sum(scores[v]) / len(scores[v]))


def selection_split(planned: list[Planned], group: str | None) -> str | None:
    splits = {p.params["split"] for p in planned if p.extra["group"] == group and p.extra["role"] == "select"}
    return ", ".join(sorted(splits)) if group else None


def summarize_sweeps(rt, planned: list[Planned], selection: list[dict]) -> list[dict]:
    """Per swept merge: each variant's swept values and selection-split accuracies, and the winner."""
    from ..sweep import swept_values

    summaries = []
    for group, variants in rt.recipe.sweeps.items():
        rows = [r for r in selection if r["group"] == group]
        if not rows:
            continue
        winner = next((p.extra["variant"] for p in planned if p.extra["group"] == group and p.extra["role"] == "test"), None)
        acc = {(r["variant"], r["task"]): r["accuracy"] for r in rows}
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        summaries.append({
            "group": group, "split": rows[0]["split"], "chosen": winner, "swept": swept_values(variants),
            "variants": [v.name for v in variants], "tasks": tasks,
            "accuracy": {t: [acc[(v.name, t)] for v in variants] for t in tasks},
        })
    return summaries


def _is_head(rt, name: str) -> bool:
    return any(re.search(p, name) for p in rt.recipe.spec.heads)

