"""The `eval` step: accuracy and macro-F1 per task for the base, each fine-tuned model and merges.

Each (weights, task, settings) result is its own artifact, so re-evaluating an unchanged model is
free. A merged body is evaluated on each task through that task's own head.
"""

from __future__ import annotations

import csv
import json
import re

import torch
from pydantic import Field

from ..data import encode_batches
from ..merging import align_names
from ..recipe import BASE, Strict
from ..store import make_key
from ..tasks import build_classifier, data_spec, load_examples, load_tokenizer, task_data
from . import Planned, StepKind, register

VERSION = 1


class EvalConfig(Strict):
    merges: list[str] = Field([], description="merge steps to evaluate")
    individual: bool = Field(True, description="also evaluate each fine-tuned model on its own task")
    base: bool = Field(True, description="also evaluate the base body with each task's head")
    split: str | None = Field(None, description="data split (default: each task's test split)")
    limit: int | None = Field(None, ge=1, description="seeded subset of at most this many rows")
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
        seed = cfg.seed if cfg.seed is not None else rt.recipe.spec.seed
        variants = ([("base", "base:" + rt.model_hash(BASE))] if cfg.base else []) + \
                   [(m, rt.planned[m][0].key) for m in cfg.merges]
        planned = []
        for task in self.models_used(cfg, rt.recipe):
            data = task_data(rt, task, ("steps", name))
            split = cfg.split or rt.recipe.spec.data[data].test_split
            _, rows, fingerprint, labels = load_examples(rt, data, split, cfg.limit, seed)
            rows_for = variants + ([("individual", "model:" + rt.model_hash(task))] if cfg.individual else [])
            for variant, weights in rows_for:
                params = {"split": split, "limit": cfg.limit, "max_length": cfg.max_length, "seed": seed}
                inputs = {"weights": weights, "task_model": rt.model_hash(task), "data": fingerprint}
                planned.append(Planned(name, f"{variant}|{task}", "eval", make_key("eval", params, inputs, VERSION),
                                       inputs, params, VERSION, {"rows": rows, "labels": labels, "data": data}))
        return planned

    def compute(self, rt, name, cfg, todo):
        for p in todo:
            variant, task = p.label.split("|")
            model = build_classifier(rt, task, self._body(rt, variant, task))
            spec = data_spec(rt, p.extra["data"], p.params["split"])
            tok = load_tokenizer(rt, task)
            preds, golds = [], []
            with torch.no_grad():
                for batch in encode_batches(tok, p.extra["rows"], spec, cfg.batch_size, cfg.max_length, p.extra["labels"]):
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
        results = [rt.store.open(p.key).meta for p in planned]
        rt.results[name] = results
        if not cfg.output:
            return None
        out = rt.recipe.resolve(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        with open(out / "results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["variant", "task", "split", "accuracy", "macro_f1", "n"], extrasaction="ignore")
            w.writeheader()
            w.writerows(results)
        return f"results in {out}"


def _is_head(rt, name: str) -> bool:
    return any(re.search(p, name) for p in rt.recipe.spec.heads)

