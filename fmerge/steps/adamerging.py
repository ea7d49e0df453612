"""The `adamerging` step: learned task-wise or layer-wise coefficients (fmerge/methods/adamerging.py).

The coefficients are stored with the merged weights (`coefficients`, shape (N,) or (N, P) in the
order of meta `models` and `tensors`), so evaluating or exporting again never retrains. The split
adapted on is explicit (default: each task's validation split, never silently the test split the
`eval` step scores) and recorded in the params and meta. A causal LM's loss is token-level
(fmerge/objective.py): the mean over the predicted tokens of the texts drawn, in the same recipe syntax.

Memory: the merged body and its gradient; the base (from its files) and the task vectors (from
their cached artifacts, deps of the plan) are read one tensor at a time as each step merges, and
the task models hold no body.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..methods.adamerging import adamerging
from ..progress import tensor_progress
from .base import register
from .iterative import IterativeConfig, IterativeStep, Loss, keep_large_blocks_mapped


class AdaMergingConfig(IterativeConfig):
    granularity: Literal["task", "layer"] = Field("layer", description="one coefficient per model, or per model and tensor")
    loss: Loss = Field("entropy", description="entropy (unlabelled, the paper) or cross_entropy (needs labels; a "
                                              "causal LM's are its next tokens); an LM's is the mean over its tokens")
    steps: int = Field(200, ge=1, description="Adam steps (paper 500, FusionBench 1000)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    init: float = Field(0.3, description="initial value of every coefficient")
    clamp: bool = Field(True, description="keep coefficients in [0, 1] (the paper; FusionBench does not)")
    batch_size: int = Field(16, ge=1, description="examples per task per step")
    examples: int | None = Field(None, ge=1, description="seeded subset of each task's split cycled through "
                                                          "(default: the whole split)")


@register
class AdaMergingStep(IterativeStep):
    kind = "adamerging"
    Config = AdaMergingConfig
    description = ("AdaMerging: learn task-wise or layer-wise task-vector coefficients by Adam on each task's "
                   "loss (entropy on unlabelled data, or cross-entropy).")
    VERSION = 2  # 2: a trace row's coef_mean is at the row's coefficients (before the step), as its loss

    def pool_size(self, cfg):
        return cfg.examples

    def compute(self, rt, name, cfg, todo):
        (p,) = todo
        keep_large_blocks_mapped()
        plan = self.tensor_plan(rt, cfg)
        models = self.candidates(cfg, rt.recipe)
        tasks = self.task_names(cfg, rt.recipe)
        base = self.streamed_base(rt, plan)  # like the task vectors: read each step, never held
        vectors = self.task_vectors(rt, p, models, plan)  # read from the store each step, never all held
        objective = self.objective(rt, cfg, p, plan, (cfg.loss,), cfg.batch_size)
        with tensor_progress(rt.console, f"{name}: adamerging", cfg.steps) as advance:
            result = adamerging(base, vectors, objective, names=plan.merge, tasks=tasks, granularity=cfg.granularity,
                                steps=cfg.steps, lr=cfg.lr, init=cfg.init, clamp=cfg.clamp, on_step=advance,
                                accuracy_fn=objective.accuracy)
        meta = {"models": models, "tasks": tasks, "tensors": plan.merge, "adaptation_splits": self.splits(p),
                "trace": result.trace}
        self.write(rt, p, plan, result.body, meta, {"coefficients": result.coefficients})
