"""What the iterative, data-aware merge steps (Frank-Wolfe, AdaMerging) share.

Planning: the key covers the models' and the base's content hashes, each task's data fingerprint
(dataset identity and the seeded row order) and every parameter, so changing a step size
recomputes this step only. Computing: the body tensors to learn (the plan's mergeable set, base
naming, fp32 on `rt.device`), and an `Objective` running each task's own classifier (a sequence
classifier, or a CLIP vision tower with its task's zero-shot head, whose key enters the plan). The result
is an artifact like a merge's: `weights/<name>` for every base tensor (learned where merged, the
base's elsewhere), so `eval` evaluates it and `export` writes it as a model directory.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from .. import __version__
from ..data import check_labels, encode_batches
from ..errors import ModelError, RecipeError
from ..export import export_model_dir
from ..merging import TensorPlan, plan_tensors
from ..objective import Objective, TaskModel
from ..recipe import BASE, Strict
from ..store import make_key
from ..tasks import (build_task_model, data_inputs, data_spec, is_image_task, load_subset, load_tokenizer, task_batches,
                     task_data)
from .base import Planned, StepKind
from .zeroshot_head import head_dependency
from .merge import from_base_section, write_heads


class IterativeConfig(Strict):
    models: list[str] | None = Field(None, description="models merged (default: all)")
    tasks: list[str] | None = Field(None, description="models whose task data and own head define the loss "
                                                      "(default: the merged models)")
    split: str | None = Field(None, description="data split adapted on (default: each task's validation split)")
    chunk_size: int = Field(32, ge=1, description="examples per forward/backward pass (bounds memory)")
    max_length: int = Field(64, ge=2, description="tokens per example (longer ones are cut)")
    seed: int | None = Field(None, description="seed of the rows drawn (default: the recipe's seed)")
    export: str | None = Field(None, description="write the merged model here as a Hugging Face directory")


class IterativeStep(StepKind):
    """Subclasses set kind, Config, VERSION and implement `learn`."""

    VERSION: ClassVar[int]

    def pool_size(self, cfg) -> int | None:
        """Rows per task drawn from (None: the whole split, in seeded order)."""
        return None

    def candidates(self, cfg, recipe) -> list[str]:
        return cfg.models or list(recipe.models)

    def task_names(self, cfg, recipe) -> list[str]:
        return cfg.tasks or self.candidates(cfg, recipe)

    def model_refs(self, cfg):
        return [("models", m) for m in cfg.models or []] + [("tasks", t) for t in cfg.tasks or []]

    def models_used(self, cfg, recipe):
        return list(dict.fromkeys(self.candidates(cfg, recipe) + self.task_names(cfg, recipe)))

    def check(self, recipe, name, cfg):
        for t in self.task_names(cfg, recipe):
            if recipe.models[t].data is None:
                raise RecipeError(f"{recipe.where('steps', name)}: task '{t}' has no data; give model '{t}' "
                                  f"'data: <name of an entry in data>', or list other models under 'tasks'.")
        data = recipe.spec.data
        for t in self.task_names(cfg, recipe):
            d = recipe.models[t].data
            if d in data:  # a split the entry lacks is an error now, not at planning
                data[d].rows_of(recipe, d, cfg.split or data[d].validation_split)

    def fitted_on(self, recipe, cfg):
        data, models = recipe.spec.data, recipe.models
        return [("split", "adapts on", "Adapt on another split (steps.{step}.split; default: each task's validation "
                 "split)", models[t].data, cfg.split or data[models[t].data].validation_split)
                for t in self.task_names(cfg, recipe) if t in models and models[t].data in data]

    def extra_inputs(self, rt, name: str, cfg) -> dict[str, Any]:
        return {}

    def key_params(self, rt, name: str, cfg) -> dict[str, Any]:
        """The config as it enters the cache key (subclasses canonicalise free-form fields)."""
        return cfg.model_dump(mode="json", exclude={"export"})

    def plan(self, rt, name, cfg, upstream):
        seed = cfg.seed if cfg.seed is not None else rt.recipe.spec.seed
        tasks, splits, task_in, deps = {}, {}, {}, []
        for t in self.task_names(cfg, rt.recipe):
            data = task_data(rt, t, ("steps", name, "tasks"))
            split = cfg.split or rt.recipe.spec.data[data].validation_split
            head, head_deps = head_dependency(rt, t)
            tasks[t] = {"data": data, "split": split}
            splits[t] = split
            task_in[t] = {"model": rt.model_hash(t), "data": data_inputs(rt, data, split), **head}
            deps += head_deps
        spec = rt.recipe.spec
        inputs = {"base": rt.model_hash(BASE),
                  "models": {m: rt.model_hash(m) for m in self.candidates(cfg, rt.recipe)},
                  "tasks": task_in, **self.extra_inputs(rt, name, cfg)}
        params = self.key_params(rt, name, cfg) | {
            "seed": seed, "splits": splits, "exclude": spec.exclude, "heads": spec.heads,
            **({"missing_tensors": "base"} if spec.missing_tensors == "base" else {})}
        key = make_key(self.kind, params, inputs, self.VERSION)
        return [Planned(name, "", self.kind, key, inputs, params, self.VERSION, {"tasks": tasks}, deps)]

    # -- computing ---------------------------------------------------------------------------

    def tensor_plan(self, rt, cfg) -> TensorPlan:
        sources = {m: rt.source(m) for m in self.models_used(cfg, rt.recipe)}
        return plan_tensors(rt.source(BASE), sources, rt.recipe.spec.exclude, rt.recipe.spec.heads,
                            rt.recipe.spec.missing_tensors)

    def weights(self, rt, model: str, plan: TensorPlan) -> dict[str, torch.Tensor]:
        """A model's mergeable tensors in base naming, fp32 on the runtime's device."""
        src, names = rt.source(model), plan.name_maps.get(model)
        if model == BASE:
            return {r: src.get(r).to(rt.device, torch.float32) for r in plan.merge}
        return {r: src.get(names[r]).to(rt.device, torch.float32) for r in plan.merge}

    def objective(self, rt, cfg, p: Planned, plan: TensorPlan, losses: tuple[str, ...], per_draw: int) -> Objective:
        """The loss losses[0] (labels checked if any of `losses` needs them) of each task's
        classifier, with the base's copied tensors in place as `eval` will run it."""
        base = rt.source(BASE)
        head = [re.compile(h) for h in rt.recipe.spec.heads]
        tasks = {}
        for t, info in p.extra["tasks"].items():
            sub = load_subset(rt, info["data"], info["split"], self.pool_size(cfg), p.params["seed"])
            info = {**info, "rows": sub.rows, "labels": sub.labels}
            names = plan.name_maps[t]
            copied = {names[r]: base.get(r) for r in plan.copy if r in names and not any(h.search(names[r]) for h in head)}
            net = build_task_model(rt, t, copied, head=p.inputs["tasks"][t].get("head")).float().requires_grad_(False)
            if net.config.num_labels < 2:
                raise ModelError(f"Task '{t}': its head has {net.config.num_labels} output; {self.kind} needs a "
                                  f"classification head (regression is not supported).")
            spec = data_spec(rt, info["data"], info["split"])
            if "cross_entropy" in losses:
                if spec.label_column is None:
                    raise RecipeError(f"{rt.recipe.where('steps', p.step, 'loss')}: cross_entropy needs labels but "
                                      f"data '{info['data']}' has none; use loss: entropy.")
                check_labels(info["rows"], spec, net.config.num_labels, info["labels"])
            own = dict(net.named_parameters())
            params = {r: names[r] for r in plan.merge if names[r] in own}
            tasks[t] = TaskModel(net, params, self._draws(rt, cfg, t, info, spec, per_draw))
        return Objective(tasks, losses[0], plan.merge)

    @staticmethod
    def _draws(rt, cfg, task: str, info, spec, per_draw: int):
        """Draw d: the next `per_draw` rows of the seeded row order, cycling through it."""
        rows, labels = info["rows"], info["labels"]
        n = min(per_draw, len(rows))
        if is_image_task(rt, task):
            def encode(picked):
                return task_batches(rt, task, picked, spec, cfg.chunk_size, cfg.max_length, labels)
        else:  # loading a tokenizer takes ~0.1 s, too long to repeat at every draw as task_batches would
            tok = load_tokenizer(rt, task)

            def encode(picked):
                return encode_batches(tok, picked, spec, cfg.chunk_size, cfg.max_length, labels)

        def batches(draw: int):
            return list(encode(rows.select([(draw * n + i) % len(rows) for i in range(n)])))

        return batches

    def write(self, rt, p: Planned, plan: TensorPlan, body: dict[str, torch.Tensor], meta: dict,
              extra: dict[str, torch.Tensor] | None = None) -> None:
        for r, t in body.items():
            if not bool(torch.isfinite(t).all()):
                raise ModelError(f"Step '{p.step}' produced NaN or Inf in tensor '{r}': lower the step size "
                                  f"or learning rate, or check the inputs (`fmerge verify`).")
        base = rt.source(BASE)
        learned = set(body)
        with rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version) as writer:
            for r in plan.reference:
                writer.write("weights/" + r, body[r].to("cpu", base.dtype(r)) if r in learned else base.get(r))
            for n, t in (extra or {}).items():
                writer.write(n, t)
            writer.commit({"step": p.step, "plan": plan.summary(), **meta})

    def export(self, rt, name, cfg, planned):
        if not cfg.export:
            return None
        (p,) = planned
        card = (f"---\ntags: [fmerge, merge, {self.kind}]\n---\n# Merged with fmerge {__version__}\n\n"
                f"Step `{name}` ({self.kind}) of recipe `{rt.recipe.file or '(command line)'}`; artifact key "
                f"`{p.key}`. Parameters:\n\n```json\n{json.dumps(p.params, indent=2)}\n```\n\nTask heads, never "
                f"averaged, are in `heads/<model>.safetensors`; the weights here use the base model's names.\n"
                + from_base_section(rt.store.open(p.key).meta))
        return export_model_dir(rt.store, rt.recipe.resolve(cfg.export), p.key, rt.store.open(p.key).view("weights/"),
                                step=name, where=rt.recipe.where("steps", name, "export"), readme=card,
                                side_files_from=rt.model_dir(BASE), finish=lambda tmp: write_heads(rt, cfg, tmp))


Loss = Literal["cross_entropy", "entropy"]
