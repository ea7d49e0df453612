"""The `merge` step: stream the models through a registered method into a store artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, ValidationError

from .. import __version__
from ..errors import FmergeError, ModelError, RecipeError
from ..export import export_model_dir
from ..io import ModelDir, parse_dtype
from ..merging import TensorParams, align_names, all_finite, merge_stream, plan_tensors
from ..methods import MergeContext, get_method
from ..progress import tensor_progress
from ..recipe import BASE, Strict, format_validation_error
from ..store import library_versions, make_key
from .base import Planned, StepKind, register

# Bumped when the streaming driver (not a method) changes what a merge writes.
DRIVER_VERSION = 1
# What the driver writes changed only for merges with an out_dtype (copied floating tensors are
# now written in it too): only their keys move, every other cached merge stays valid.
OUT_DTYPE_DRIVER_VERSION = 2


class MergeConfig(Strict):
    method: str = Field(description="registered merge method (see `fmerge methods`)")
    params: dict[str, Any] = Field({}, description="the method's parameters")
    models: list[str] | None = Field(None, description="models to merge (default: all)")
    fisher: str | None = Field(None, description="fisher step supplying the Fisher diagonals")
    gram: str | None = Field(None, description="gram step supplying the layer-input Gram matrices (RegMean)")
    base_fisher: str | None = Field(None, description="fisher step of one model whose Fisher is the prior F_0 "
                                    "of fisher merging with base_prior (e.g. the base LM on generic text)")
    out_dtype: str | None = Field(None, description="dtype of the merged tensors (default: the base's)")
    seed: int | None = Field(None, description="seed for stochastic methods (default: the recipe's)")
    export: str | None = Field(None, description="write the merged model here as a Hugging Face directory")


@register
class MergeStep(StepKind):
    kind = "merge"
    Config = MergeConfig

    def step_refs(self, cfg: MergeConfig) -> list[tuple[str, str]]:
        return [(f, getattr(cfg, f)) for f in ("fisher", "gram", "base_fisher") if getattr(cfg, f)]

    def model_refs(self, cfg: MergeConfig) -> list[tuple[str, str]]:
        return [("models", m) for m in cfg.models or []]

    def models_used(self, cfg: MergeConfig, recipe) -> list[str]:
        return cfg.models or list(recipe.models)

    def check(self, recipe, name: str, cfg: MergeConfig) -> None:
        method = get_method_at(recipe, name, cfg.method)
        try:
            tparams = TensorParams(method, cfg.params, recipe.where("steps", name, "params"))
            params = tparams.params
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc, method.Params, recipe.lines, ("steps", name, "params")))
        needed = method.stats_needed(params)
        if "fisher_base" in needed and not cfg.base_fisher:
            raise RecipeError(f"{recipe.where('steps', name, 'params', 'base_prior')}: base_prior needs the "
                              f"prior's Fisher F_0: add 'base_fisher: <a fisher step of one model>'.")
        if cfg.base_fisher and "fisher_base" not in needed:
            raise RecipeError(f"{recipe.where('steps', name, 'base_fisher')}: only fisher merging with "
                              f"base_prior: true uses a base Fisher; remove 'base_fisher' or set base_prior.")
        if "fisher" in needed and not cfg.fisher:
            raise RecipeError(f"{recipe.where('steps', name)}: method '{cfg.method}' needs Fisher diagonals: "
                              f"add 'fisher: <name of a fisher step>'.")
        if "gram" in needed and not cfg.gram:
            raise RecipeError(f"{recipe.where('steps', name)}: method '{cfg.method}' needs Gram matrices: "
                              f"add 'gram: <name of a gram step>'.")
        if cfg.gram and "gram" not in needed:
            raise RecipeError(f"{recipe.where('steps', name, 'gram')}: method '{cfg.method}' does not use "
                              f"Gram matrices; remove 'gram' (or use method 'regmean').")
        if cfg.out_dtype:
            parse_dtype(cfg.out_dtype, recipe.where("steps", name, "out_dtype"))
        models = self.models_used(cfg, recipe)
        try:
            tparams.validate(MergeContext(models, seed=cfg.seed or recipe.spec.seed))
        except FmergeError as exc:
            raise RecipeError(f"{recipe.where('steps', name, 'params')}: {exc}")

    def plan(self, rt, name: str, cfg: MergeConfig, upstream) -> list[Planned]:
        method = get_method(cfg.method)
        tparams = TensorParams(method, cfg.params, rt.recipe.where("steps", name, "params"))
        params = tparams.params
        models = self.models_used(cfg, rt.recipe)
        hashes = rt.model_hashes([*models, BASE])
        inputs: dict[str, Any] = {"models": {m: hashes[m] for m in models}}
        if method.base_needed(params):
            inputs["base"] = rt.model_hash(BASE)
        else:
            inputs["reference"] = rt.model_hash(BASE)  # output naming and copied tensors come from it
        if cfg.fisher:
            inputs["fisher"] = statistics_keys(rt, name, "fisher", upstream[cfg.fisher], models, "Fisher")
        if cfg.base_fisher:
            prior = upstream[cfg.base_fisher]
            if len(prior) != 1:
                raise RecipeError(f"{rt.recipe.where('steps', name, 'base_fisher')}: step '{cfg.base_fisher}' "
                                  f"has {len(prior)} Fishers; give it one model (models: [name]).")
            inputs["base_fisher"] = prior[0].key
        if cfg.gram:
            inputs["gram"] = statistics_keys(rt, name, "gram", upstream[cfg.gram], models, "Gram matrices")
        spec = rt.recipe.spec
        key_params = {
            "method": cfg.method, "params": tparams.key(),
            "exclude": spec.exclude, "heads": spec.heads, "out_dtype": cfg.out_dtype,
            **({"missing_tensors": "base"} if spec.missing_tensors == "base" else {}),  # keys unchanged by default
            "seed": cfg.seed if cfg.seed is not None else spec.seed,
        }
        version = (OUT_DTYPE_DRIVER_VERSION if cfg.out_dtype else DRIVER_VERSION) * 1000 + method.version
        key = make_key("merge", key_params, inputs, version)
        return [Planned(name, "", "merge", key, inputs, key_params, version)]

    def compute(self, rt, name: str, cfg: MergeConfig, todo: list[Planned]) -> None:
        (p,) = todo
        method = get_method(cfg.method)
        tparams = TensorParams(method, cfg.params, rt.recipe.where("steps", name, "params"))
        params = tparams.params
        models = self.models_used(cfg, rt.recipe)
        sources = {m: rt.source(m) for m in models}
        base = rt.source(BASE)
        plan = plan_tensors(base, sources, rt.recipe.spec.exclude, rt.recipe.spec.heads,
                            rt.recipe.spec.missing_tensors)
        ctx = MergeContext(models, seed=p.params["seed"])
        stats = {}
        if cfg.fisher:
            fishers = {m: rt.store.open(p.inputs["fisher"][m]) for m in models}
            stats["fisher"] = {m: a.view("fisher/") for m, a in fishers.items()}
            ctx.summaries["fisher_mean"] = [a.meta["fisher_mean"] for a in fishers.values()]
        if cfg.base_fisher:
            prior = rt.store.open(p.inputs["base_fisher"]).view("fisher/")
            stats["fisher"][BASE] = Renamed(prior, align_names(plan.reference, prior.names()))
        if cfg.gram:
            grams = {m: rt.store.open(p.inputs["gram"][m]) for m in models}
            for group in sorted({n.split("/")[0] for a in grams.values() for n in a.names()}):
                stats[group] = {m: a.view(group + "/") for m, a in grams.items()}  # gram, gram_in_out, gram_rows
        tparams.validate(ctx)  # again, now with the statistics' summaries
        if cfg.export:  # refused before anything is written, not after the merge is stored
            check_heads(plan.per_model, sources)
        out_dtype = parse_dtype(cfg.out_dtype, "out_dtype") if cfg.out_dtype else None
        with rt.store.writer(p.key, "merge", p.inputs, p.params, p.version) as writer:
            with tensor_progress(rt.console, f"{name}: {cfg.method}", len(plan.reference)) as advance:
                stream = merge_stream(method, params, ctx, plan, base, sources, with_base=method.base_needed(params),
                                      stats=stats, device=rt.device, out_dtype=out_dtype, on_tensor=advance,
                                      tensor_params=tparams.resolver(plan.merge, ctx))
                for ref_name, tensor in stream:
                    writer.write("weights/" + ref_name, tensor)
            writer.commit({"step": name, "method": cfg.method, "models": models, "plan": plan.summary()})

    def export(self, rt, name: str, cfg: MergeConfig, planned: list[Planned]) -> str | None:
        if not cfg.export:
            return None
        (p,) = planned
        return export_model_dir(rt.store, rt.recipe.resolve(cfg.export), p.key, rt.store.open(p.key).view("weights/"),
                                step=name, where=rt.recipe.where("steps", name, "export"),
                                readme=model_card(rt, name, cfg, p), side_files_from=rt.model_dir(BASE),
                                finish=lambda tmp: (write_heads(rt, cfg, tmp), config_dtype(tmp, cfg.out_dtype)))


def config_dtype(directory: Path, out_dtype: str | None) -> None:
    """Make the exported config.json name the dtype the weights were written in, so that
    `from_pretrained(dtype="auto")` loads them as written (the base's config names its own)."""
    config = directory / "config.json"
    if out_dtype is None or not config.is_file():
        return
    name = str(parse_dtype(out_dtype, "out_dtype")).removeprefix("torch.")
    data = json.loads(config.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
    data.update({k: name for k in keys})
    config.unlink()  # a copy fmerge just made in its own build directory
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def statistics_keys(rt, name: str, field: str, planned: list[Planned], models: list[str], what: str) -> dict[str, str]:
    """{model: artifact key} of a statistics step's planned artifacts for every merged model."""
    keys = {p.label: p.key for p in planned}
    missing = [m for m in models if m not in keys]
    if missing:
        step = getattr(rt.recipe.steps[name], field)
        raise RecipeError(f"{rt.recipe.where('steps', name, field)}: step '{step}' has no {what} for "
                          f"model(s) {', '.join(missing)}.")
    return {m: keys[m] for m in models}


class Renamed:
    """A tensor source seen through the reference (base) naming."""

    def __init__(self, src, names: dict[str, str]):
        self.src, self.map = src, names

    def names(self) -> list[str]:
        return list(self.map)

    def get(self, name: str) -> torch.Tensor:
        return self.src.get(self.map[name])


def get_method_at(recipe, name: str, method: str):
    try:
        return get_method(method)
    except FmergeError as exc:
        raise RecipeError(f"{recipe.where('steps', name, 'method')}: {exc}")


def write_heads(rt, cfg: MergeConfig, out: Path) -> None:
    """Each model's own tensors (task heads), never averaged, saved beside the merged body."""
    from safetensors.torch import save_file

    models = cfg.models or list(rt.recipe.models)
    sources = {m: rt.source(m) for m in models}
    plan = plan_tensors(rt.source(BASE), sources, rt.recipe.spec.exclude, rt.recipe.spec.heads,
                        rt.recipe.spec.missing_tensors)
    heads = {m: names for m, names in plan.per_model.items() if names}
    if not heads:
        return
    check_heads(heads, sources)
    heads_dir = (out / "heads").resolve()
    heads_dir.mkdir(exist_ok=True)
    for m, names in heads.items():
        file = (heads_dir / f"{m}.safetensors").resolve()
        if file.parent != heads_dir:  # model names are checked at load; never write outside the export
            raise RecipeError(f"Model name '{m}' cannot name a head file inside {heads_dir}.")
        save_file({n: sources[m].get(n).contiguous() for n in names}, str(file))


def check_heads(heads: dict[str, list[str]], sources) -> None:
    """Refuse a task head (a model's own tensor, exported as is) that holds NaN or Inf."""
    for m, names in heads.items():
        for n in names:
            if not sources[m].dtype(n).is_floating_point:
                continue
            t = sources[m].get(n)
            if not all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise ModelError(
                    f"Tensor '{n}' of model '{m}', a task head the export copies unchanged into "
                    f"heads/{m}.safetensors, holds {bad} NaN or Inf value(s); fmerge will not export it. Check "
                    f"that model (a diverged fine-tune?) and fetch or save it again.")


def model_card(rt, name: str, cfg: MergeConfig, p: Planned) -> str:
    step_yaml = yaml.safe_dump({name: {"kind": "merge", **cfg.model_dump(exclude_none=True)}}, sort_keys=False)
    inputs = json.dumps(p.inputs, indent=2)
    recipe_file = rt.recipe.file or "(command line)"
    return (
        f"---\ntags: [fmerge, merge, {cfg.method}]\n---\n# Merged with fmerge {__version__}\n\n"
        f"Step `{name}` of recipe `{recipe_file}`, method `{cfg.method}`.\n\n"
        f"```yaml\n{step_yaml}```\n\nArtifact key `{p.key}`. Inputs (content hashes):\n\n```json\n{inputs}\n```\n\n"
        f"Library versions:\n\n```json\n{json.dumps(library_versions(), indent=2)}\n```\n\n"
        f"Task-specific heads, never averaged, are in `heads/<model>.safetensors` (the model's own "
        f"tensor names); the weights here use the base model's names.\n"
        + from_base_section(rt.store.open(p.key).meta)
    )


# -- tensors taken from the base (recipe `missing_tensors: base`) ------------------------------

def from_base_section(meta: dict) -> str:
    """Model-card section listing the tensors some model lacked, taken from the base unmerged."""
    from_base = (meta.get("plan") or {}).get("from_base") or {}
    if not from_base:
        return ""
    lines = "".join(f"- `{r}` (missing in {', '.join(ms)})\n" for r, ms in from_base.items())
    return (f"\n## Tensors taken from the base\n\nWith `missing_tensors: base`, these {len(from_base)} "
            f"tensor(s), missing from some models, hold the base model's value, not a merge:\n\n{lines}")

# -- end of tensors taken from the base ---------------------------------------------------------
