"""The `task_vectors` step: τ_i = θ_i − θ_0 per model, stored for inspection and iterative methods.

The iterative steps (AdaMerging, Frank-Wolfe with TIES vertices) list these artifacts as deps
(`task_vector_planned`) and read τ_i one tensor at a time from the store, instead of holding N task
vectors in memory.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import ModelError
from ..merging import all_finite, plan_tensors
from ..progress import tensor_progress
from ..recipe import BASE, Strict
from ..store import make_key
from .base import Planned, StepKind, register

VERSION = 1


class TaskVectorsConfig(Strict):
    models: list[str] | None = Field(None, description="models (default: all)")


def task_vector_planned(rt, model: str, step: str) -> Planned:
    """Model's task vector artifact: keyed by the base's and the model's content and the tensor plan's
    settings only, so every step asking for it shares one artifact. Its kind names this step kind, so
    the executor can compute it as another step's dep."""
    spec = rt.recipe.spec
    params = {"exclude": spec.exclude, "heads": spec.heads,
              **({"missing_tensors": "base"} if spec.missing_tensors == "base" else {})}
    inputs = {"base": rt.model_hash(BASE), "model": rt.model_hash(model)}
    return Planned(step, model, TaskVectorsStep.kind, make_key("task_vector", params, inputs, VERSION),
                   inputs, params, VERSION)


@register
class TaskVectorsStep(StepKind):
    kind = "task_vectors"
    Config = TaskVectorsConfig

    def model_refs(self, cfg: TaskVectorsConfig) -> list[tuple[str, str]]:
        return [("models", m) for m in cfg.models or []]

    def models_used(self, cfg: TaskVectorsConfig, recipe) -> list[str]:
        return cfg.models or list(recipe.models)

    def plan(self, rt, name: str, cfg: TaskVectorsConfig, upstream) -> list[Planned]:
        return [task_vector_planned(rt, m, name) for m in self.models_used(cfg, rt.recipe)]

    def compute(self, rt, name: str, cfg: TaskVectorsConfig, todo: list[Planned]) -> None:
        base = rt.source(BASE)
        for p in todo:
            model = rt.source(p.label)
            plan = plan_tensors(base, {p.label: model}, rt.recipe.spec.exclude, rt.recipe.spec.heads,
                                rt.recipe.spec.missing_tensors)
            names = plan.name_maps[p.label]
            with rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version) as writer:
                with tensor_progress(rt.console, f"{name}: {p.label}", len(plan.merge)) as advance:
                    for r in plan.merge:
                        tau = model.get(names[r]).to(torch.float32) - base.get(r).to(torch.float32)
                        if not all_finite(tau):
                            raise ModelError(f"Task vector of model '{p.label}' has NaN or Inf in tensor "
                                              f"'{r}': its weights or the base's hold non-finite values.")
                        writer.write("tau/" + r, tau)
                        advance()
                writer.commit({"step": name, "model": p.label})
