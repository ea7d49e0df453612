"""The `gram` step: one artifact of linear-layer input Grams per model, on a seeded subset of its
task data (labels are not needed).

Under torchrun the rows are sharded across ranks and the sums all-reduced; rank 0 writes.

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

from .. import distributed
from ..data import shard_by_rank
from ..errors import ModelError
from ..gram import OUT_IN, GramSums, gram_matrices
from ..store import make_key
from ..tasks import build_task_model, data_spec, load_subset, task_batches
from .base import Planned, register
from .statistics import PerModelStep, StatisticsConfig

VERSION = 1
GROUP = {OUT_IN: "gram", "in_out": "gram_in_out"}
ROWS = "gram_rows"


class GramConfig(StatisticsConfig):
    pass


@register
class GramStep(PerModelStep):
    kind = "gram"
    Config = GramConfig
    distributed = True

    def plan(self, rt, name, cfg, upstream):
        planned = []
        for m, data, params, inputs, deps in self.subset_artifacts(rt, name, cfg, {}):
            planned.append(Planned(name, m, "gram", make_key("gram", params, inputs, VERSION), inputs,
                                   params, VERSION, {"data": data}, deps))
        return planned

    def compute(self, rt, name, cfg, todo):
        for p in todo:
            model = build_task_model(rt, p.label, head=p.inputs.get("head"))
            spec = dataclasses.replace(data_spec(rt, p.extra["data"], p.params["split"]), label_column=None)
            # Labels are checked (the label rule), not read: a bad one is a sign of data paired with the wrong model.
            rows = load_subset(rt, p.extra["data"], p.params["split"], p.params["examples"], p.params["seed"],
                               model.config).rows
            batches = task_batches(rt, p.label, shard_by_rank(rows), spec, cfg.batch_size, cfg.max_length)
            sums = allreduce_grams(gram_matrices(model, batches))
            if not distributed.is_main():
                continue
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


def allreduce_grams(sums: GramSums) -> GramSums:
    """Under torchrun, every rank's Gram sums, row counts and example count added up (each rank
    summed its own shard of the rows); unchanged otherwise."""
    if not distributed.active():
        return sums
    names = sorted(sums.rows)
    device = next(iter(sums.grams.values()), torch.empty(0)).device
    counts = torch.tensor([sums.rows[n] for n in names] + [sums.examples], dtype=torch.int64, device=device)
    distributed.sum_tensors({**sums.grams, "": counts})  # "" sorts first: the same order on every rank
    *rows, examples = (int(c) for c in counts.tolist())
    return GramSums(sums.grams, dict(zip(names, rows)), sums.layouts, examples)
