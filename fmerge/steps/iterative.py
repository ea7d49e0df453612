"""What the iterative, data-aware merge steps (Frank-Wolfe, AdaMerging) share.

Planning: the key covers the models' and the base's content hashes, each task's data fingerprint
(dataset identity and the seeded row order) and every parameter, so changing a step size
recomputes this step only. Computing: the body tensors to learn (the plan's mergeable set, base
naming, fp32 on `rt.device`), and an `Objective` running each task's own model (a sequence
classifier; a causal LM, whose loss is token-level, the mean over the predicted tokens of the text
drawn; or a CLIP vision tower with its task's zero-shot head, whose key enters the plan). The result
is an artifact like a merge's: `weights/<name>` for every base tensor (learned where merged, the
base's elsewhere), so `eval` evaluates it and `export` writes it as a model directory.

Memory: task vectors come from cached `task_vectors` artifacts (listed as the plan's deps), the
base and candidate models from their files, one tensor at a time (`Streamed`); the task models
hold no body: the loss substitutes every body parameter, so each is a one-element placeholder.
What is left is the algorithm's: the merged body (or iterate) and its gradient, and soft
Frank-Wolfe's iterate besides its inner AdaMerging's body (`bench/iterative_memory.py`).
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch
from pydantic import Field

from ..compat import DEFAULT_MAX_LENGTH, MAX_LENGTH_HELP
from ..data import encode_batches, encode_lm_batches
from ..errors import DataError, ModelError, RecipeError
from ..export import export_model_dir
from ..merging import TensorPlan, plan_tensors
from ..objective import Objective, TaskModel, predicted_tokens
from ..recipe import BASE, Strict
from ..store import make_key
from ..tasks import (build_task_model, capped_length, data_inputs, data_spec, is_image_task, load_subset,
                     load_tokenizer, model_kind, side_inputs, task_batches, task_data)
from .base import Planned, StepKind
from .task_vectors import task_vector_planned
from .zeroshot_head import head_dependency
from .merge import check_architectures, check_local_architectures, model_card, write_heads


# glibc's mallopt parameter for the size from which a block is its own mapping, unmapped when freed.
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 128 * 1024


def keep_large_blocks_mapped() -> None:
    """Pin glibc malloc's mmap threshold at its default, 128 KiB, for the rest of the process.

    Left alone, glibc raises the threshold to the size of each large block freed (up to 32 MiB),
    after which tensors come from the heap, and a heap fragmented by the tensors of many sizes
    that each step makes and frees keeps freed memory resident: on bench/iterative_memory.py's recipe,
    AdaMerging peaked at 758 MB instead of 586 MB (6 bodies of 27.8 MB). Mapped blocks go back
    to the system when freed. A no-op where malloc is not glibc's."""
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # no C library to open by this name (Windows)
        return
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)


class IterativeConfig(Strict):
    models: list[str] | None = Field(None, description="models merged (default: all)")
    tasks: list[str] | None = Field(None, description="models whose task data and own head define the loss "
                                                      "(default: the merged models)")
    split: str | None = Field(None, description="data split adapted on (default: each task's validation split)")
    chunk_size: int = Field(32, ge=1, description="examples per forward/backward pass (bounds memory)")
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=2, description=MAX_LENGTH_HELP)
    seed: int | None = Field(None, description="seed of the rows drawn (default: the recipe's seed)")
    export: str | None = Field(None, description="write the merged model here as a Hugging Face directory")


class IterativeStep(StepKind):
    """Subclasses set kind, Config, VERSION and implement `learn`."""

    VERSION: ClassVar[int]

    def reads_task_vectors(self, cfg) -> bool:
        """Whether computing reads the models' task vectors (then cached artifacts, listed as deps)."""
        return True

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
        check_local_architectures(recipe, name, [BASE, *self.models_used(cfg, recipe)])
        for t in self.task_names(cfg, recipe):
            if recipe.models[t].data is None:
                raise RecipeError(f"{recipe.where('steps', name)}: task '{t}' has no data; give model '{t}' "
                                  f"'data: <name of an entry in data>', or list other models under 'tasks'.")
        data = recipe.spec.data
        for t in self.task_names(cfg, recipe):
            d = recipe.models[t].data
            if d in data:  # a split the entry lacks is an error now, not at planning
                data[d].rows_of(recipe, d, cfg.split or data[d].validation_split)
            if d in data and (data[d].task == "multiple_choice" or data[d].choices is not None):
                raise RecipeError(f"{recipe.where('steps', name)}: task '{t}' has multiple-choice data ('{d}'), "
                                  f"which {self.kind} cannot adapt on: its loss is a classifier's or a causal LM's "
                                  f"token-level loss over text. Give model '{t}' a causal_lm data entry (text to "
                                  f"predict), or list other models under 'tasks'.")

    def fitted_on(self, recipe, cfg):
        data, models = recipe.spec.data, recipe.models
        return [("split", "adapts on", "Adapt on another split (steps.{step}.split; default: each task's validation "
                 "split)", models[t].data, cfg.split or data[models[t].data].validation_split)
                for t in self.task_names(cfg, recipe) if t in models and models[t].data in data]

    def extra_inputs(self, rt, name: str, cfg) -> dict[str, Any]:
        return {}

    def key_params(self, rt, name: str, cfg) -> dict[str, Any]:
        """The config as it enters the cache key (subclasses canonicalise free-form fields): the
        models and tasks enter by content and position, in the inputs, never by name."""
        return cfg.model_dump(mode="json", exclude={"export", "models", "tasks"})

    def plan(self, rt, name, cfg, upstream):
        check_architectures(rt, name, [BASE, *self.models_used(cfg, rt.recipe)])
        seed = cfg.seed if cfg.seed is not None else rt.recipe.spec.seed
        tasks, splits, task_in, deps = {}, [], [], []
        for t in self.task_names(cfg, rt.recipe):
            data = task_data(rt, t, ("steps", name, "tasks"))
            split = cfg.split or rt.recipe.spec.data[data].validation_split
            head, head_deps = head_dependency(rt, t)
            tasks[t] = {"data": data, "split": split, **head}
            splits.append(split)
            task_in.append({"model": rt.model_hash(t), "side": side_inputs(rt, t), "data": data_inputs(rt, data, split),
                            **head})
            deps += head_deps
        if self.reads_task_vectors(cfg):
            deps += [task_vector_planned(rt, m, name) for m in self.candidates(cfg, rt.recipe)]
        spec = rt.recipe.spec
        # models and tasks by position (the coefficients and the loss's sum follow their order)
        inputs = {"base": rt.model_hash(BASE),
                  "models": [rt.model_hash(m) for m in self.candidates(cfg, rt.recipe)],
                  "tasks": task_in, **self.extra_inputs(rt, name, cfg)}
        params = self.key_params(rt, name, cfg) | {
            "seed": seed, "splits": splits, "exclude": spec.exclude, "heads": spec.heads,
            **({"missing_tensors": "base"} if spec.missing_tensors == "base" else {})}
        key = make_key(self.kind, params, inputs, self.VERSION)
        return [Planned(name, "", self.kind, key, inputs, params, self.VERSION, {"tasks": tasks}, deps)]

    # -- computing ---------------------------------------------------------------------------

    @staticmethod
    def splits(p: Planned) -> dict[str, str]:
        """{task: split adapted on}, for the artifact's meta (the key holds the splits by position)."""
        return {t: info["split"] for t, info in p.extra["tasks"].items()}

    def tensor_plan(self, rt, cfg) -> TensorPlan:
        sources = {m: rt.source(m) for m in self.models_used(cfg, rt.recipe)}
        return plan_tensors(rt.source(BASE), sources, rt.recipe.spec.exclude, rt.recipe.spec.heads,
                            rt.recipe.spec.missing_tensors)

    def streamed_base(self, rt, plan: TensorPlan) -> "Streamed":
        """The base's mergeable tensors as `weights` gives them, each read from its file when asked."""
        src = rt.source(BASE)
        return Streamed(plan.merge, lambda r: src.get(r).to(rt.device, torch.float32))

    def weights(self, rt, model: str, plan: TensorPlan) -> dict[str, torch.Tensor]:
        """A model's mergeable tensors in base naming, fp32 on the runtime's device."""
        src, names = rt.source(model), plan.name_maps.get(model)
        if model == BASE:
            return {r: src.get(r).to(rt.device, torch.float32) for r in plan.merge}
        return {r: src.get(names[r]).to(rt.device, torch.float32) for r in plan.merge}

    def streamed_weights(self, rt, model: str, plan: TensorPlan) -> "Streamed":
        """A model's mergeable tensors as `weights` gives them, each read from its file when asked."""
        src, names = rt.source(model), plan.name_maps[model]
        return Streamed(plan.merge, lambda r: src.get(names[r]).to(rt.device, torch.float32))

    def task_vectors(self, rt, p: Planned, models: list[str], plan: TensorPlan) -> list["Streamed"]:
        """Each model's τ = θ − θ_0 over the plan's mergeable tensors, read from its cached artifact
        (the plan's deps) one tensor at a time."""
        views = {d.label: rt.store.open(d.key).view("tau/") for d in p.deps if d.kind == "task_vectors"}
        return [Streamed(plan.merge, lambda r, v=views[m]: v.get(r).to(rt.device, torch.float32)) for m in models]

    def objective(self, rt, cfg, p: Planned, plan: TensorPlan, losses: tuple[str, ...], per_draw: int) -> Objective:
        """The loss losses[0] (labels checked if any of `losses` needs them) of each task's model,
        with the base's copied tensors in place as `eval` will run it: a classifier's mean over
        examples, or a causal LM's mean over predicted tokens (cross-entropy's label is the next token).

        The loss always substitutes the body, so each model's own body parameters are replaced by
        placeholders of their shape that own no memory (a zero expanded): T tasks hold no body."""
        base = rt.source(BASE)
        head = [re.compile(h) for h in rt.recipe.spec.heads]
        tasks = {}
        for t, info in p.extra["tasks"].items():
            names = plan.name_maps[t]
            copied = {names[r]: base.get(r) for r in plan.copy if r in names and not any(h.search(names[r]) for h in head)}
            net = build_task_model(rt, t, copied, head=info.get("head")).float().requires_grad_(False)
            causal_lm = model_kind(rt, t) == "causal_lm"
            if not causal_lm and net.config.num_labels < 2:
                raise ModelError(f"Task '{t}': its head has {net.config.num_labels} output; {self.kind} needs a "
                                  f"classification head (regression is not supported).")
            spec = data_spec(rt, info["data"], info["split"])
            if "cross_entropy" in losses and not causal_lm and spec.label_column is None:
                raise RecipeError(f"{rt.recipe.where('steps', p.step, 'loss')}: cross_entropy needs labels but "
                                  f"data '{info['data']}' has none; use loss: entropy.")
            # A classifier's labels (read for the accuracy trace whatever the loss) under the label rule.
            sub = load_subset(rt, info["data"], info["split"], self.pool_size(cfg), p.params["seed"],
                              None if causal_lm else net.config)
            info = {**info, "rows": sub.rows}
            own = dict(net.named_parameters())
            params = {r: names[r] for r in plan.merge if names[r] in own}
            for n in params.values():
                own[n].data = torch.zeros((), dtype=own[n].dtype, device=own[n].device).expand(own[n].shape)
            draws = self._lm_draws(rt, cfg, t, info, spec, per_draw, net) if causal_lm else \
                self._draws(rt, cfg, t, info, spec, per_draw)
            tasks[t] = TaskModel(net, params, draws, causal_lm=causal_lm)
        return Objective(tasks, losses[0], plan.merge)

    @staticmethod
    def _draws(rt, cfg, task: str, info, spec, per_draw: int):
        """Draw d: the next `per_draw` rows of the seeded row order, cycling through it."""
        rows = info["rows"]
        n = min(per_draw, len(rows))
        if is_image_task(rt, task):
            def encode(picked):
                return task_batches(rt, task, picked, spec, cfg.chunk_size, cfg.max_length)
        else:  # loading a tokenizer takes ~0.1 s, too long to repeat at every draw as task_batches would
            tok = load_tokenizer(rt, task)
            length = capped_length(rt, task, cfg.max_length)

            def encode(picked):
                return encode_batches(tok, picked, spec, cfg.chunk_size, length)

        def batches(draw: int):
            return list(encode(rows.select([(draw * n + i) % len(rows) for i in range(n)])))

        return batches

    @staticmethod
    def _lm_draws(rt, cfg, task: str, info, spec, per_draw: int, net):
        """Draw d of a causal LM's text, rows picked as `_draws` picks them: each text (after its
        prompt) cut into windows of at most max_length tokens, no longer than the model's position
        table, so every token is predicted once (`data.encode_lm_batches`)."""
        rows = info["rows"]
        n = min(per_draw, len(rows))
        tok = load_tokenizer(rt, task)
        positions = getattr(net.config, "max_position_embeddings", None)
        length = min(cfg.max_length, positions or cfg.max_length)

        def batches(draw: int):
            picked = [(draw * n + i) % len(rows) for i in range(n)]
            out = list(encode_lm_batches(tok, rows.select(picked), spec, cfg.chunk_size, length))
            if not any(predicted_tokens(b) for b in out):
                raise DataError(f"Task '{task}': the {n} row(s) of data '{info['data']}' (split '{info['split']}') "
                                f"drawn at step {draw} have no token to predict (their texts are empty, or every "
                                f"token is the prompt's), so the token-level loss is undefined; remove such rows "
                                f"from the data, or draw more rows per step (batch_size, or dataset_size for "
                                f"Frank-Wolfe).")
            return out

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
        return export_model_dir(rt.store, rt.recipe.resolve(cfg.export), p.key, rt.store.open(p.key).view("weights/"),
                                step=name, where=rt.recipe.where("steps", name, "export"),
                                readme=model_card(rt, name, cfg, p), side_files_from=rt.model_dir(BASE),
                                finish=lambda tmp: write_heads(rt, name, cfg, p, tmp))


Loss = Literal["cross_entropy", "entropy"]


class Streamed(Mapping):
    """A body whose tensors are made when asked (`load(name)`) and never kept: what the iterative
    methods read each step (task vectors, candidate models) without holding N copies in memory."""

    def __init__(self, names: Iterable[str], load: Callable[[str], torch.Tensor]):
        self._names = list(names)
        self._known = set(self._names)
        self._load = load

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
