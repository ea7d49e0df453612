"""The `gram` step: one artifact of linear-layer input Grams per model, on a seeded subset of its
task data (labels are not needed).

Tensor groups, keyed by the weight's name in the model's own naming: `gram/<name>` (nn.Linear,
weight out × in), `gram_in_out/<name>` (Conv1D, weight in × out) and `gram_rows/<name>` (rows
summed, shape [1]). The merge step serves each group as a statistic of that name.

A causal LM's Grams cover every real token of its text, prompt tokens included (they are inputs
the layers see); an LM head tied to the input embeddings has none (gram.py), so RegMean takes
their plain mean.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ModelError
from ..gram import OUT_IN, gram_matrices
from ..store import make_key
from ..tasks import build_task_model, data_spec, load_subset, task_batches
from .base import PerModelStep, Planned, StatisticsConfig, register
from .zeroshot_head import head_dependency

VERSION = 1
GROUP = {OUT_IN: "gram", "in_out": "gram_in_out"}
ROWS = "gram_rows"


class GramConfig(StatisticsConfig):
    pass


@register
class GramStep(PerModelStep):
    kind = "gram"
    Config = GramConfig

    def plan(self, rt, name, cfg, upstream):
        planned = []
        for m, data, split, seed, data_in in self.subsets(rt, name, cfg):
            params = {"examples": cfg.examples, "split": split, "max_length": cfg.max_length, "seed": seed}
            head, deps = head_dependency(rt, m)
            inputs = {"model": rt.model_hash(m), "data": data_in, **head}
            planned.append(Planned(name, m, "gram", make_key("gram", params, inputs, VERSION), inputs,
                                   params, VERSION, {"data": data}, deps))
        return planned

    def compute(self, rt, name, cfg, todo):
        for p in todo:
            model = build_task_model(rt, p.label, head=p.inputs.get("head"))
            spec = dataclasses.replace(data_spec(rt, p.extra["data"], p.params["split"]), label_column=None)
            rows = load_subset(rt, p.extra["data"], p.params["split"], p.params["examples"], p.params["seed"]).rows
            batches = task_batches(rt, p.label, rows, spec, cfg.batch_size, cfg.max_length)
            sums = gram_matrices(model, batches)
            for n, g in sums.grams.items():
                if not bool(torch.isfinite(g).all()):
                    raise ModelError(f"Gram matrix of layer '{n}' of model '{p.label}' has NaN or Inf: "
                                      f"check the model's weights (`fmerge verify`).")
            with rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version) as writer:
                for n, g in sums.grams.items():
                    writer.write(f"{GROUP[sums.layouts[n]]}/{n}", g.cpu())
                for n, count in sums.rows.items():
                    writer.write(f"{ROWS}/{n}", torch.tensor([count], dtype=torch.int64))
                writer.commit({"step": name, "model": p.label, "examples": sums.examples,
                               "layers": len(sums.grams), "tokens": max(sums.rows.values())})
