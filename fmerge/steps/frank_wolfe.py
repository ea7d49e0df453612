"""The `frank_wolfe` (hard) and `frank_wolfe_soft` steps: see fmerge/methods/frank_wolfe.py; on a
causal LM the loss is token-level (fmerge/objective.py)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, ValidationError

from ..errors import FmergeError, ModelError, RecipeError
from ..io import ModelDir
from ..merging import TensorParams, align_names
from ..methods import MergeContext, TensorGroup, get_method, per_model
from ..methods.frank_wolfe import GRAD_NOISE_RTOL, frank_wolfe_hard, frank_wolfe_soft
from ..methods.ties import trim_to_top_k
from ..objective import Objective
from ..progress import tensor_progress
from ..recipe import format_validation_error
from .base import register
from .iterative import IterativeConfig, IterativeStep, Loss, Streamed, keep_large_blocks_mapped
from .merge import positional_params


class FrankWolfeCommon(IterativeConfig):
    merge_fn: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="vertex of a candidate s: θ_s (task_arithmetic) or θ_0 + trim(τ_s) (ties); "
                                       "also the method of init: merge")
    merge_params: dict[str, Any] = Field({}, description="merge_fn's parameters (see `fmerge methods`): all of them "
                                                         "for init: merge; the vertices use only ties' density")
    init: str = Field("merge", description="x_0: base, merge (merge_fn over the models), or a model directory")
    max_iters: int = Field(10, ge=1, description="Frank-Wolfe iterations")
    dataset_size: int = Field(32, ge=1, description="examples per task per iteration")
    granularity: Literal["task", "layer"] = Field("task", description="one candidate per iteration, or per tensor")
    oracle: Literal["cosine", "linear"] = Field(
        "cosine", description="cosine: Σ_p cos(g_p, θ_s,p) (FusionBench); linear: ⟨g, v_s − x_t⟩ (textbook)")
    loss: Loss = Field("cross_entropy", description="cross_entropy (needs labels; a causal LM's are its next "
                                                    "tokens) or entropy; an LM's is the mean over its tokens")
    max_num_models: int = Field(100, ge=1, description="candidates: the first this many models")
    grad_noise_rtol: float = Field(
        GRAD_NOISE_RTOL, ge=0, lt=1, allow_inf_nan=False,
        description="a tensor whose gradient norm is at most this times the largest one's does not vote in the "
                    "oracle (rounding noise; default float32's epsilon; 0: every nonzero gradient votes)")


class FrankWolfeConfig(FrankWolfeCommon):
    step_size: float = Field(0.1, gt=0, le=1, description="γ_t = 2/(t+2)·step_size, no other factor")


class FrankWolfeSoftConfig(FrankWolfeCommon):
    init: str = Field("base", description="x_0: base, merge (merge_fn over the models), or a model directory")
    ada_iters: int = Field(50, ge=1, description="AdaMerging steps per iteration")
    ada_loss: Loss = Field("entropy", description="AdaMerging loss")
    ada_coeff: float = Field(0.3, description="initial weight of each pick")
    ada_lr: float = Field(1e-3, gt=0, description="AdaMerging's Adam learning rate")
    simplex: bool = Field(False, description="project each tensor's weights on the probability simplex")


@register
class FrankWolfeStep(IterativeStep):
    kind = "frank_wolfe"
    Config = FrankWolfeConfig
    description = ("Frank-Wolfe merging (hard): each iteration moves toward the candidate model the loss "
                   "gradient's oracle picks, with step 2/(t+2)·step_size.")
    VERSION = 3  # 2: TIES merge_fn keeps exactly k entries per tensor; 3: noise gradients do not vote

    def candidates(self, cfg, recipe):
        return (cfg.models or list(recipe.models))[: cfg.max_num_models]

    def check(self, recipe, name, cfg):
        super().check(recipe, name, cfg)
        method = get_method(cfg.merge_fn)
        try:
            tparams = TensorParams(method, cfg.merge_params, recipe.where("steps", name, "merge_params"))
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc, method.Params, recipe.lines, ("steps", name, "merge_params")))
        if getattr(tparams.params, "trim", "tensor") != "tensor":
            raise RecipeError(f"{recipe.where('steps', name, 'merge_params', 'trim')}: Frank-Wolfe trims each vertex "
                              f"per tensor; remove 'trim: global'.")
        try:
            tparams.validate(MergeContext(self.candidates(cfg, recipe)))
        except FmergeError as exc:
            raise RecipeError(f"{recipe.where('steps', name, 'merge_params')}: {exc}")
        if cfg.init not in ("base", "merge") and not (recipe.resolve(cfg.init) / "config.json").is_file():
            raise RecipeError(f"{recipe.where('steps', name, 'init')}: '{cfg.init}' is neither 'base', 'merge' nor a "
                              f"model directory (no {recipe.resolve(cfg.init) / 'config.json'}).")

    def key_params(self, rt, name, cfg):
        """merge_params validated and dumped with defaults, so `{}` and the explicit defaults share a
        key, with per-model maps in the candidates' order; `init` as what it is, never a directory's
        path (its weights' hash is an input)."""
        method = get_method(cfg.merge_fn)
        tparams = TensorParams(method, cfg.merge_params, rt.recipe.where("steps", name, "merge_params"))
        init = cfg.init if cfg.init in ("base", "merge") else "weights"
        return super().key_params(rt, name, cfg) | {
            "merge_params": positional_params(method, tparams.key(), self.candidates(cfg, rt.recipe)), "init": init}

    def extra_inputs(self, rt, name, cfg):
        if cfg.init in ("base", "merge"):
            return {"init": cfg.init}
        src = ModelDir(rt.recipe.resolve(cfg.init), label=f"init of step {name}")
        return {"init": "weights:" + rt.hashes.hash_model(src)}

    def merge_params(self, rt, cfg, name, plan):
        """merge_fn, its context and a tensor name -> that tensor's parameters."""
        method = get_method(cfg.merge_fn)
        tparams = TensorParams(method, cfg.merge_params, rt.recipe.where("steps", name, "merge_params"))
        ctx = MergeContext(self.candidates(cfg, rt.recipe), seed=cfg.seed or rt.recipe.spec.seed)
        resolve = tparams.resolver(plan.merge, ctx)
        return method, ctx, (resolve or (lambda r: tparams.params))

    def reads_task_vectors(self, cfg) -> bool:
        return cfg.merge_fn == "ties"  # task-arithmetic vertices are the models themselves

    def initial_point(self, rt, cfg, name, plan, base, raw) -> Streamed:
        """x_0, made tensor by tensor as the algorithm copies it into its iterate."""
        if cfg.init == "base":
            return Streamed(plan.merge, lambda r: base[r])
        if cfg.init == "merge":
            method, ctx, params = self.merge_params(rt, cfg, name, plan)
            return Streamed(plan.merge, lambda r: method.merge(TensorGroup(r, base[r], [w[r] for w in raw]),
                                                               params(r), ctx))
        src = ModelDir(rt.recipe.resolve(cfg.init), label=f"init of step {name}")
        names = align_names(plan.merge, src.names())
        missing = [r for r in plan.merge if r not in names]
        if missing:
            raise ModelError(f"{rt.recipe.where('steps', name, 'init')}: {cfg.init} lacks {len(missing)} merged "
                              f"tensor(s), e.g. '{missing[0]}'.")
        return Streamed(plan.merge, lambda r: src.get(names[r]).to(rt.device, torch.float32))

    def vertices(self, rt, cfg, name, p, plan, base, raw):
        """θ_s (task arithmetic), or θ_0 + τ_s trimmed at s's density for that tensor (TIES), τ_s
        read from its cached artifact; each made when the algorithm asks for it."""
        if cfg.merge_fn == "task_arithmetic":
            return raw
        _, ctx, params = self.merge_params(rt, cfg, name, plan)
        density = {r: per_model(params(r).density, ctx, "density") for r in plan.merge}
        taus = self.task_vectors(rt, p, self.candidates(cfg, rt.recipe), plan)
        return [Streamed(plan.merge, lambda r, i=i, tau=tau: base[r] + trim_to_top_k(tau[r], density[r][i]))
                for i, tau in enumerate(taus)]

    def compute(self, rt, name, cfg, todo):
        (p,) = todo
        keep_large_blocks_mapped()
        plan = self.tensor_plan(rt, cfg)
        models = self.candidates(cfg, rt.recipe)
        tasks = self.task_names(cfg, rt.recipe)
        base = self.streamed_base(rt, plan)  # read when needed: only the iterate and its gradient are held
        raw = [self.streamed_weights(rt, m, plan) for m in models]
        x0 = self.initial_point(rt, cfg, name, plan, base, raw)
        vertices = self.vertices(rt, cfg, name, p, plan, base, raw)
        objective = self.objective(rt, cfg, p, plan, self.losses(cfg), cfg.dataset_size)
        common = dict(names=plan.merge, model_names=models, tasks=tasks, max_iters=cfg.max_iters,
                      oracle=cfg.oracle, granularity=cfg.granularity, grad_noise_rtol=cfg.grad_noise_rtol)
        with tensor_progress(rt.console, f"{name}: {self.kind}", cfg.max_iters) as advance:
            body, trace = self.run(rt, cfg, x0, vertices, raw, objective, p, common, advance)
        meta = {"models": models, "tasks": tasks, "splits": self.splits(p), "trace": trace}
        self.write(rt, p, plan, body, meta)

    def losses(self, cfg) -> tuple[str, ...]:
        return (cfg.loss,)

    def run(self, rt, cfg, x0, vertices, raw, objective, p, common, advance):
        return frank_wolfe_hard(x0, vertices, raw, objective, step_size=cfg.step_size, on_iteration=advance,
                                accuracy_fn=objective.accuracy, **common)


@register
class FrankWolfeSoftStep(FrankWolfeStep):
    kind = "frank_wolfe_soft"
    Config = FrankWolfeSoftConfig
    description = ("Frank-Wolfe merging (soft): each iteration, every task picks a candidate and layer-wise "
                   "AdaMerging learns how much of each pick to add.")
    VERSION = 3  # 2: TIES merge_fn keeps exactly k entries per tensor; 3: noise gradients do not vote

    def losses(self, cfg) -> tuple[str, ...]:
        return (cfg.loss, cfg.ada_loss)

    def run(self, rt, cfg, x0, vertices, raw, objective, p, common, advance):
        picks = min(len(vertices), len(common["tasks"]))
        if len(vertices) <= len(common["tasks"]):
            rt.console.print(f"[yellow]warning:[/] step '{p.step}': {len(vertices)} candidate(s) for "
                             f"{len(common['tasks'])} task(s): every candidate is picked in every iteration, so the "
                             f"Frank-Wolfe selection does nothing and this is layer-wise AdaMerging over "
                             f"{picks} model(s). Add candidates (models) or use fewer tasks.")
        ada = Objective(objective.tasks, cfg.ada_loss, objective.names)
        return frank_wolfe_soft(x0, vertices, raw, objective, ada_iters=cfg.ada_iters, ada_lr=cfg.ada_lr,
                                ada_coeff=cfg.ada_coeff, simplex=cfg.simplex, ada_gradient_fn=ada,
                                on_iteration=advance, accuracy_fn=objective.accuracy, **common)
