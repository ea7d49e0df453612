"""The `fisher` step: one diagonal-Fisher artifact per model, on a seeded subset of its task data."""

from __future__ import annotations

from difflib import get_close_matches

import torch
from pydantic import Field

from ..data import check_labels, encode_batches
from ..fisher import ESTIMATORS, fisher_diagonal
from ..errors import FmergeError
from ..recipe import Strict
from ..store import make_key
from ..tasks import build_classifier, data_spec, load_examples, load_tokenizer, task_data
from . import Planned, StepKind, register

VERSION = 1


class FisherConfig(Strict):
    estimator: str = Field("exact", description=f"one of {', '.join(ESTIMATORS)}")
    examples: int = Field(256, ge=1, description="seeded random subset of the task's rows")
    samples: int = Field(1, ge=1, description="draws per example for 'sampled'")
    split: str | None = Field(None, description="data split (default: the task's train split)")
    batch_size: int = Field(32, ge=1)
    chunk_size: int = Field(32, ge=1)
    max_length: int = Field(64, ge=2)
    seed: int | None = None
    models: list[str] | None = None


@register
class FisherStep(StepKind):
    kind = "fisher"
    Config = FisherConfig
    uses_base = False

    def model_refs(self, cfg):
        return [("models", m) for m in cfg.models or []]

    def models_used(self, cfg, recipe):
        return cfg.models or list(recipe.models)

    def check(self, recipe, name, cfg):
        if cfg.estimator not in ESTIMATORS:
            close = get_close_matches(cfg.estimator, ESTIMATORS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise FmergeError(f"{recipe.where('steps', name, 'estimator')}: unknown estimator "
                              f"'{cfg.estimator}'{hint} Estimators: {', '.join(ESTIMATORS)}.")

    def plan(self, rt, name, cfg):
        seed = cfg.seed if cfg.seed is not None else rt.recipe.spec.seed
        planned = []
        for m in self.models_used(cfg, rt.recipe):
            data = task_data(rt, m, ("steps", name))
            split = cfg.split or rt.recipe.spec.data[data].train_split
            _, rows, fingerprint, labels = load_examples(rt, data, split, cfg.examples, seed)
            params = {"estimator": cfg.estimator, "examples": cfg.examples, "samples": cfg.samples,
                      "split": split, "max_length": cfg.max_length, "seed": seed}
            inputs = {"model": rt.model_hash(m), "data": fingerprint}
            planned.append(Planned(name, m, "fisher", make_key("fisher", params, inputs, VERSION), inputs,
                                   params, VERSION, {"rows": rows, "labels": labels, "data": data}))
        return planned

    def compute(self, rt, name, cfg, todo):
        for p in todo:
            model = build_classifier(rt, p.label)
            spec = data_spec(rt, p.extra["data"], p.params["split"])
            if spec.label_column:
                check_labels(p.extra["rows"], spec, model.config.num_labels, p.extra["labels"])
            tok = load_tokenizer(rt, p.label)
            batches = encode_batches(tok, p.extra["rows"], spec, cfg.batch_size, cfg.max_length, p.extra["labels"])
            sums = fisher_diagonal(model, batches, cfg.estimator, samples=cfg.samples, seed=p.params["seed"],
                                   chunk_size=cfg.chunk_size)
            means = sums.mean()
            total = sum(float(t.double().sum()) for t in means.values())
            numel = sum(t.numel() for t in means.values())
            for n, t in means.items():
                if not bool(torch.isfinite(t).all()):
                    raise FmergeError(f"Fisher of model '{p.label}' has NaN or Inf in '{n}'.")
            writer = rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version)
            try:
                for n, t in means.items():
                    writer.write("fisher/" + n, t)
                writer.commit({"step": name, "model": p.label, "count": sums.count, "count_unit": sums.count_unit,
                               "estimator": cfg.estimator, "fisher_mean": total / max(numel, 1)})
            except BaseException:
                writer.abort()
                raise
