"""The `kfac` step: one artifact of K-FAC factors per model (fmerge/kfac.py), on a seeded subset of
its task data, for MaTS (`merge` with `method: mats`, `kfac: <this step>`).

Tensor groups, keyed by the weight's name in the model's own naming: `kfac_a/<name>` (input
covariance A, in × in) and `kfac_g/<name>` (output-gradient covariance G, out × out) for nn.Linear
(weight out × in); `kfac_a_in_out/` and `kfac_g_in_out/` for Conv1D (weight in × out). The merge
step serves each group as a statistic of that name, in float64 as stored.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import ModelError
from ..gram import OUT_IN
from ..kfac import ESTIMATORS, kfac_factors
from ..progress import tensor_progress
from ..store import make_key
from ..tasks import task_batches
from .base import Planned, register
from .statistics import PerModelStep, StatisticsConfig, check_estimator

# 2: factors accumulated and stored in float64 (positive semi-definite); version 1's fp32 factors
# are not, and are recomputed rather than served as such.
VERSION = 2
GROUPS = {OUT_IN: ("kfac_a", "kfac_g"), "in_out": ("kfac_a_in_out", "kfac_g_in_out")}


class KfacConfig(StatisticsConfig):
    estimator: str = Field("exact", description=f"labels of the output gradients: one of {', '.join(ESTIMATORS)}")
    samples: int = Field(1, ge=1, description="draws per example for 'sampled'")
    chunk_size: int = Field(32, ge=1, description="examples per forward/backward pass (bounds memory)")


@register
class KfacStep(PerModelStep):
    kind = "kfac"
    Config = KfacConfig

    def check(self, recipe, name, cfg):
        check_estimator(recipe, name, cfg.estimator, ESTIMATORS, "K-FAC estimator")

    def plan(self, rt, name, cfg, upstream):
        planned = []
        settings = {"estimator": cfg.estimator, "samples": cfg.samples}
        for m, data, params, inputs, deps in self.subset_artifacts(rt, name, cfg, settings):
            planned.append(Planned(name, m, "kfac", make_key("kfac", params, inputs, VERSION), inputs,
                                   params, VERSION, {"data": data}, deps))
        return planned

    def compute(self, rt, name, cfg, todo):
        for p in todo:
            model, spec, rows = self.labelled_rows(rt, p)
            batches = task_batches(rt, p.label, rows, spec, cfg.batch_size, cfg.max_length)
            with tensor_progress(rt.console, f"{name}: {p.label}", -(-len(rows) // cfg.batch_size)) as advance:
                counted = (advance() or b for b in batches)
                sums = kfac_factors(model, counted, cfg.estimator, samples=cfg.samples, seed=p.params["seed"],
                                    chunk_size=cfg.chunk_size)
            factors = sums.factors()
            for n, (a, g) in factors.items():
                if not bool(torch.isfinite(a).all() and torch.isfinite(g).all()):
                    raise ModelError(f"K-FAC factors of layer '{n}' of model '{p.label}' hold NaN or Inf: "
                                     f"check the model's weights (`fmerge verify`).")
            with rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version) as writer:
                for n, (a, g) in factors.items():
                    a_group, g_group = GROUPS[sums.layouts[n]]
                    writer.write(f"{a_group}/{n}", a.cpu())
                    writer.write(f"{g_group}/{n}", g.cpu())
                writer.commit({"step": name, "model": p.label, "examples": sums.examples, "count": sums.count,
                               "estimator": sums.estimator,
                               "layers": len(factors)})
