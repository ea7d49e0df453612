"""The `merge` step: stream the models through a registered method into a store artifact."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, ValidationError

from ..compat import config_differences, describe_differences, vision_tower
from ..errors import FmergeError, ModelError, RecipeError
from ..export import copy_side_files, export_model_dir
from ..io import DEFAULT_SHARD_SIZE, parse_byte_size, parse_dtype, write_weight_files
from ..lora import is_adapter_dir
from ..merging import TensorParams, align_names, all_finite, merge_stream, plan_tensors, write_behind
from ..methods import MergeContext, get_method
from ..model_card import CardFacts, clip_section, crimes_section, render_card, task_dirs_section
from ..progress import tensor_progress
from ..recipe import BASE, Strict, format_validation_error
from ..store import make_key
from .base import Planned, StepKind, register

# Bumped when the streaming driver (not a method) changes what a merge writes.
DRIVER_VERSION = 1
# What the driver writes changed only for merges with an out_dtype (copied floating tensors are
# now written in it too): only their keys move, every other cached merge stays valid.
OUT_DTYPE_DRIVER_VERSION = 2
# Statistic steps a merge may read: (config key and statistic, what it holds, which methods use it
# when a recipe gives one that its method does not; None: several do, so it is not refused).
STATISTIC_STEPS = (("fisher", "Fisher diagonals", None), ("gram", "Gram matrices", "'regmean'"),
                   ("kfac", "K-FAC factors", "'mats' with curvature: kfac"))


class MergeConfig(Strict):
    method: str = Field(description="registered merge method (see `fmerge methods`)")
    params: dict[str, Any] = Field({}, description="the method's parameters")
    models: list[str] | None = Field(None, description="models to merge (default: all)")
    fisher: str | None = Field(None, description="fisher step supplying the Fisher diagonals")
    gram: str | None = Field(None, description="gram step supplying the layer-input Gram matrices (RegMean)")
    kfac: str | None = Field(None, description="kfac step supplying the K-FAC factors of linear layers (MaTS)")
    base_fisher: str | None = Field(None, description="fisher step of one model whose Fisher is the prior F_0 "
                                    "of fisher merging with base_prior (e.g. the base LM on generic text)")
    out_dtype: str | None = Field(None, description="dtype of the merged tensors (default: the base's)")
    out_shard_size: str | int | None = Field(None, description="largest weight file of the output, e.g. 2GB "
                                             "(GB = 10^9 bytes, GiB = 2^30; default 5GB, as save_pretrained)")
    seed: int | None = Field(None, description="seed for stochastic methods (default: the recipe's)")
    export: str | None = Field(None, description="write the merged model here as a Hugging Face directory")


@register
class MergeStep(StepKind):
    kind = "merge"
    Config = MergeConfig

    def step_refs(self, cfg: MergeConfig) -> list[tuple[str, str]]:
        return [(f, getattr(cfg, f)) for f in ("fisher", "gram", "kfac", "base_fisher") if getattr(cfg, f)]

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
        for stat, what, users in STATISTIC_STEPS:
            if stat in needed and not getattr(cfg, stat):
                raise RecipeError(f"{recipe.where('steps', name)}: method '{cfg.method}' needs {what}: "
                                  f"add '{stat}: <name of a {stat} step>'.")
            if users and getattr(cfg, stat) and stat not in needed:
                raise RecipeError(f"{recipe.where('steps', name, stat)}: method '{cfg.method}' does not use "
                                  f"{what}; remove '{stat}' (or use method {users}).")
        if cfg.out_dtype:
            parse_dtype(cfg.out_dtype, recipe.where("steps", name, "out_dtype"))
        if cfg.out_shard_size is not None:
            parse_byte_size(cfg.out_shard_size, recipe.where("steps", name, "out_shard_size"))
        models = self.models_used(cfg, recipe)
        check_local_architectures(recipe, name, [BASE, *models])
        try:
            tparams.validate(MergeContext(models, seed=cfg.seed or recipe.spec.seed))
        except FmergeError as exc:
            raise RecipeError(f"{recipe.where('steps', name, 'params')}: {exc}")

    def plan(self, rt, name: str, cfg: MergeConfig, upstream) -> list[Planned]:
        check_architectures(rt, name, [BASE, *self.models_used(cfg, rt.recipe)])
        method = get_method(cfg.method)
        tparams = TensorParams(method, cfg.params, rt.recipe.where("steps", name, "params"))
        params = tparams.params
        models = self.models_used(cfg, rt.recipe)
        hashes = rt.model_hashes([*models, BASE])
        # By position, never by name: per-model lists (weights, λ) follow the order, and so does the
        # sum's rounding; a per-model map in params is turned into that order (`positional_params`).
        inputs: dict[str, Any] = {"models": [hashes[m] for m in models]}
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
        if cfg.kfac:
            inputs["kfac"] = statistics_keys(rt, name, "kfac", upstream[cfg.kfac], models, "K-FAC factors")
        spec = rt.recipe.spec
        key_params = {
            "method": cfg.method, "params": positional_params(method, tparams.key(), models),
            "exclude": spec.exclude, "heads": spec.heads, "out_dtype": cfg.out_dtype,
            **({"missing_tensors": "base"} if spec.missing_tensors == "base" else {}),  # keys unchanged by default
            **({"out_shard_size": shard_bytes(cfg)} if cfg.out_shard_size is not None else {}),  # the files' layout
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
            fishers = {m: rt.store.open(k) for m, k in zip(models, p.inputs["fisher"])}
            stats["fisher"] = {m: a.view("fisher/") for m, a in fishers.items()}
            ctx.summaries["fisher_mean"] = [a.meta["fisher_mean"] for a in fishers.values()]
        if cfg.base_fisher:
            prior = rt.store.open(p.inputs["base_fisher"]).view("fisher/")
            stats["fisher"][BASE] = Renamed(prior, align_names(plan.reference, prior.names()))
        for field in ("gram", "kfac"):
            if getattr(cfg, field):
                arts = {m: rt.store.open(k) for m, k in zip(models, p.inputs[field])}
                for group in sorted({n.split("/")[0] for a in arts.values() for n in a.names()}):
                    stats[group] = {m: a.view(group + "/") for m, a in arts.items()}  # e.g. gram, gram_rows, kfac_a
        tparams.validate(ctx)  # again, now with the statistics' summaries
        if cfg.export:  # refused before anything is written, not after the merge is stored
            check_heads(plan.per_model, sources)
        out_dtype = parse_dtype(cfg.out_dtype, "out_dtype") if cfg.out_dtype else None
        # the output's layout, known before any tensor is merged: each file's header is written first
        layout = [(r, out_dtype if out_dtype is not None and base.dtype(r).is_floating_point else base.dtype(r),
                   tuple(base.shape(r))) for r in plan.reference]
        with rt.store.writer(p.key, "merge", p.inputs, p.params, p.version) as writer:
            # the weights go straight into the safetensors files an export links: written once
            with writer.safetensors("weights/", layout, {"format": "pt", "fmerge_key": p.key},
                                    shard_bytes(cfg)) as files, \
                    tensor_progress(rt.console, f"{name}: {cfg.method}", len(plan.reference)) as advance:
                stream = merge_stream(method, params, ctx, plan, base, sources, with_base=method.base_needed(params),
                                      stats=stats, device=rt.device, out_dtype=out_dtype, on_tensor=advance,
                                      tensor_params=tparams.resolver(plan.merge, ctx))
                write_behind(stream, files.write)  # the next tensor is merged while this one is written
            writer.commit({"step": name, "method": cfg.method, "models": models, "plan": plan.summary(),
                           **({"diagnostics": ctx.diagnostics} if ctx.diagnostics else {})})

    def export(self, rt, name: str, cfg: MergeConfig, planned: list[Planned]) -> str | None:
        if not cfg.export:
            return None
        (p,) = planned
        artifact = rt.store.open(p.key)
        # the merge's own safetensors files, hard-linked into the export (an artifact written before
        # merges kept them has none: its tensors are written out); linking moves the files' ctime,
        # so the store is told to keep trusting them
        return rt.store.restamp(p.key, lambda: export_model_dir(
            rt.store, rt.recipe.resolve(cfg.export), p.key, artifact.view("weights/"),
            step=name, where=rt.recipe.where("steps", name, "export"),
            readme=model_card(rt, name, cfg, p), side_files_from=rt.model_dir(BASE),
            finish=lambda tmp: (write_heads(rt, name, cfg, p, tmp), config_dtype(tmp, cfg.out_dtype)),
            weight_files=artifact.files("weights/"), max_shard_bytes=shard_bytes(cfg)))


def shard_bytes(cfg: MergeConfig) -> int:
    """The largest weight file the merge writes (out_shard_size, default 5GB)."""
    return parse_byte_size(cfg.out_shard_size if cfg.out_shard_size is not None else DEFAULT_SHARD_SIZE,
                           "out_shard_size")


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


def statistics_keys(rt, name: str, field: str, planned: list[Planned], models: list[str], what: str) -> list[str]:
    """The artifact keys of a statistics step's planned artifacts for the merged models, in their order."""
    keys = {p.label: p.key for p in planned}
    missing = [m for m in models if m not in keys]
    if missing:
        step = getattr(rt.recipe.steps[name], field)
        raise RecipeError(f"{rt.recipe.where('steps', name, field)}: step '{step}' has no {what} for "
                          f"model(s) {', '.join(missing)}.")
    return [keys[m] for m in models]


def positional_params(method, params: dict, models: list[str]) -> dict:
    """A method's key parameters with no model name in them: each per-model map ({model: value},
    `methods.per_model`; also inside nested parameters such as a filter list's values) as the
    list of its values in the models' order, and a parameter that names a model
    (`MergeMethod.model_params`) as that model's position. A map and the list it stands for share
    one key, and renaming a model keeps it."""
    keyed = {k: _in_model_order(v, models) for k, v in params.items()}
    for field, other_values in method.model_params.items():
        value = keyed.get(field)
        if isinstance(value, str) and value not in other_values and value in models:
            keyed[field] = {"model_position": models.index(value)}
    return keyed


def _in_model_order(value, models: list[str]):
    """`value` with every mapping keyed by exactly the merge's models turned into a list in their order."""
    if isinstance(value, dict):
        if models and set(value) == set(models):
            return [_in_model_order(value[m], models) for m in models]
        return {k: _in_model_order(v, models) for k, v in value.items()}
    if isinstance(value, list):
        return [_in_model_order(v, models) for v in value]
    return value


class Renamed:
    """A tensor source seen through the reference (base) naming."""

    def __init__(self, src, names: dict[str, str]):
        self.src, self.map = src, names

    def names(self) -> list[str]:
        return list(self.map)

    def get(self, name: str) -> torch.Tensor:
        return self.src.get(self.map[name])


def check_architectures(rt, name: str, models: list[str], ignore: tuple[str, ...] = (), why: str = "") -> None:
    """At plan time: refuse models whose config.json files describe different architectures
    (fmerge/compat.py: which fields, and why those), unless the recipe says `allow_crimes: true`.
    The configs are read as plain JSON, so planning stays cheap."""
    refuse_differences(rt.recipe, name, stated_configs(rt, models), ignore, why)


def check_local_architectures(recipe, name: str, models: list[str], ignore: tuple[str, ...] = (),
                              why: str = "") -> None:
    """At load time (`fmerge validate`), the same for the models that are local directories (a hub
    model, or one a step makes, is compared when planned)."""
    refuse_differences(recipe, name, local_configs(recipe, models), ignore, why)


def refuse_differences(recipe, name: str, configs: dict[str, dict], ignore: tuple[str, ...], why: str) -> None:
    if recipe.spec.allow_crimes:
        return
    differences = architecture_differences(recipe, configs, ignore)
    if differences:
        raise ModelError(
            f"{recipe.where('steps', name)}: the models do not share one architecture, so their tensors do not "
            f"mean the same thing{why}: {describe_differences(differences)} (from their config.json files). Merge "
            f"models fine-tuned from one base model; or, if you mean to combine these anyway, set "
            f"'allow_crimes: true' at the top of the recipe or mergekit config (mergekit's --allow-crimes), and the "
            f"exported model card will say so.")


def architecture_differences(recipe, configs: dict[str, dict], ignore: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """[(field, {model: value})] where the configs differ (a CLIP recipe: their vision towers')."""
    return config_differences({m: vision_tower(c) if recipe.is_clip else c for m, c in configs.items()}, ignore)


def label(model: str) -> str:
    return "base" if model == BASE else model


def local_configs(recipe, models: list[str]) -> dict[str, dict]:
    """{model: config.json} of the models given as local directories that hold one (a PEFT adapter,
    the base plus a delta, has the base's architecture and is skipped); one that cannot be read is
    left to the step that reads it."""
    out = {}
    for m in models:
        spec = recipe.base if m == BASE else recipe.models[m]
        directory = recipe.resolve(spec.path) if spec.path is not None else None
        if directory is None or is_adapter_dir(directory) or not (directory / "config.json").is_file():
            continue
        try:
            out[label(m)] = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return out


def stated_configs(rt, models: list[str]) -> dict[str, dict]:
    """{model: config.json as plain JSON} of the models that have one to compare; skipped: a PEFT
    adapter (the base plus a delta, so the base's architecture), a directory without config.json
    (its tensors are still checked when merged), a model its step has not made yet (e.g. under
    `fmerge status`; a fine-tune's artifact records its config)."""
    from ..tasks import raw_config

    out = {}
    for m in models:
        spec = rt.spec(m)
        if spec.from_step is not None:
            key = rt.output_of(spec.from_step)
            config = rt.store.open(key).meta.get("config") if rt.store.has(key) else None
            if isinstance(config, dict):
                out[label(m)] = dict(config)
            continue
        directory = rt.model_dir(m)
        if not is_adapter_dir(directory) and (directory / "config.json").is_file():
            out[label(m)] = raw_config(rt, m)
    return out


def get_method_at(recipe, name: str, method: str):
    try:
        return get_method(method)
    except FmergeError as exc:
        raise RecipeError(f"{recipe.where('steps', name, 'method')}: {exc}")


def task_heads(rt, models: list[str]) -> tuple[dict[str, list[str]], dict]:
    """({model: its own tensors (task head), model naming}, sources) of the models that have one."""
    sources = {m: rt.source(m) for m in models}
    plan = plan_tensors(rt.source(BASE), sources, rt.recipe.spec.exclude, rt.recipe.spec.heads,
                        rt.recipe.spec.missing_tensors)
    return {m: names for m, names in plan.per_model.items() if names}, sources


def write_heads(rt, name: str, cfg, p: Planned, out: Path) -> None:
    """Each classifier's own head, never averaged: `heads/<model>.safetensors` (the head alone) and
    `<model>/`, a directory that loads through AutoModelForSequenceClassification as that task's
    classifier: the merged body, the model's own head and config (labels from the data entry),
    the tokenizer and a card. The weights are exactly those eval scores the task with."""
    from safetensors.torch import save_file

    heads, sources = task_heads(rt, cfg.models or list(rt.recipe.models))
    if not heads:
        return
    check_heads(heads, sources)
    merged = rt.store.open(p.key).view("weights/")
    out_dtype = getattr(cfg, "out_dtype", None)  # an iterative merge has none
    shard = shard_bytes(cfg) if isinstance(cfg, MergeConfig) else parse_byte_size(DEFAULT_SHARD_SIZE, "out_shard_size")
    heads_dir = (out / "heads").resolve()
    heads_dir.mkdir(exist_ok=True)
    for m, names in heads.items():
        file = (heads_dir / f"{m}.safetensors").resolve()
        task_dir = (out / m).resolve()
        if file.parent != heads_dir or task_dir.parent != out.resolve():  # never write outside the export
            raise RecipeError(f"Model name '{m}' cannot name a head file inside {heads_dir}.")
        save_file({n: sources[m].get(n).contiguous() for n in names}, str(file))
        os.chmod(file, 0o644)  # readable like every file save_pretrained writes
        write_task_dir(rt, m, merged, task_dir, card_facts_for(rt, name, cfg, p, task=m), out_dtype, shard)


def write_task_dir(rt, task: str, merged, out: Path, card: CardFacts, out_dtype: str | None,
                   max_shard_bytes: int) -> None:
    """`out`: the task's classifier, its own tensors with the merged body in place of its body, all
    in the merge's dtype (the base's, or `out_dtype`), whatever dtype the task was saved in."""
    from ..tasks import model_config, tokenizer_dir

    if os.path.lexists(out):
        raise RecipeError(f"Model name '{task}' is also the name of a file of the export ({out}); rename the "
                          f"model in the recipe's models, then run again.")
    src = rt.source(task)
    body = align_names(merged.names(), src.names())  # merged (base naming) -> the task model's names
    from_merge = {n: r for r, n in body.items() if not any(re.search(h, n) for h in rt.recipe.spec.heads)}
    dtype = parse_dtype(out_dtype, "out_dtype") if out_dtype else None
    # Without out_dtype, each body tensor as the merge wrote it and the head in the body's dtype.
    body_dtype = dtype or next((merged.dtype(r) for r in from_merge.values() if merged.dtype(r).is_floating_point),
                               None)

    def written(n: str) -> torch.dtype:
        own = merged.dtype(from_merge[n]) if n in from_merge else src.dtype(n)
        if not own.is_floating_point:
            return own
        return dtype or (own if n in from_merge else body_dtype or own)

    def tensor(n: str) -> torch.Tensor:
        return (merged.get(from_merge[n]) if n in from_merge else src.get(n)).to(written(n))

    out.mkdir()
    names = src.names()
    layout = [(n, written(n), src.shape(n)) for n in names]
    write_weight_files(out, layout, ((n, tensor(n)) for n in names), {"format": "pt", "fmerge_key": card.key},
                       max_shard_bytes)
    notes: list[str] = []
    try:
        side = tokenizer_dir(rt, task)
    except ModelError:
        side = None
    if side is not None:
        copy_side_files(side, out, notes)
    config = model_config(rt, task)
    data = rt.recipe.models[task].data
    labels = rt.recipe.spec.data[data].label_names if data else None
    if labels:
        if len(labels) != config.num_labels:
            raise ModelError(f"Data '{data}' names {len(labels)} labels (label_names), but model '{task}' has "
                             f"{config.num_labels} classes; fix label_names in the recipe's data entry, then run "
                             f"again.")
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    if body_dtype is not None:
        config.dtype = body_dtype
    (out / "config.json").unlink(missing_ok=True)  # the tokenizer directory's copy, not this task's
    config.save_pretrained(out)
    (out / "README.md").write_text(render_card(card) + "".join(notes))


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


def model_card(rt, name: str, cfg, p: Planned) -> str:
    return render_card(card_facts_for(rt, name, cfg, p))


def card_facts_for(rt, name: str, cfg, p: Planned, task: str | None = None) -> CardFacts:
    """What the card of a merge (or an iterative merge, whose method is its kind) says; with
    `task`, the card of that task's classifier directory inside the export."""
    merge = p.kind == "merge"
    method = cfg.method if merge else p.kind
    params = cfg.params if merge else cfg.model_dump(mode="json", exclude_none=True, exclude={"export", "models"})
    models = cfg.models or list(rt.recipe.models)
    recipe = rt.recipe
    base = recipe.base
    sections = []
    heads = {} if task else task_heads(rt, models)[0]
    if task:
        sections.append(f"## Task `{task}`\n\nThis directory is task `{task}`'s classifier: the merged body with the "
                        f"model's own classification head (never averaged) and config. Load it with "
                        f"`AutoModelForSequenceClassification.from_pretrained`. The merged model, every task's "
                        f"directory included, is the directory above.")
    elif heads:
        sections.append(task_dirs_section({m: labels_of(rt, m) for m in heads}))
    elif recipe.is_clip:
        sections.append(clip_section(base.path or "path/to/base"))
    sections += [sweep_section(rt, name), from_base_section(rt.store.open(p.key).meta)]
    if recipe.spec.allow_crimes:
        configs = stated_configs(rt, [BASE, *models])
        sections.append(crimes_section(describe_differences(architecture_differences(recipe, configs))))
    return CardFacts(
        step=name, method=method, params=params, base=given(rt, BASE),
        base_hub_id=base.path if base.path and recipe.is_hub_id(base.path) else None,
        models={m: given(rt, m) for m in models}, key=p.key, inputs=p.inputs,
        recipe_file=str(recipe.file) if recipe.file else None, recipe_text=recipe.text,
        mergekit=recipe.mergekit, sets=recipe.sets, sections=[s for s in sections if s])


def given(rt, model: str) -> str:
    """How the recipe gives a model: a hub id (and revision), a local path, or a step's output."""
    spec = rt.spec(model)
    if spec.from_step:
        return f"the output of step `{spec.from_step}`"
    if rt.recipe.is_hub_id(spec.path):
        return f"hub model `{spec.path}`" + (f" (revision `{spec.revision}`)" if spec.revision else "")
    return f"local directory `{spec.path}`"


def labels_of(rt, model: str) -> list[str] | None:
    data = rt.recipe.models[model].data
    return rt.recipe.spec.data[data].label_names if data else None


def sweep_section(rt, name: str) -> str:
    """Which variant of a swept step this is, and how it was chosen (README: sweeps and exports)."""
    group = next((g for g, vs in rt.recipe.sweeps.items() if any(v.name == name for v in vs)), None)
    if group is None:
        return ""
    variant = next(v for v in rt.recipe.sweeps[group] if v.name == name)
    values = yaml.safe_dump(variant.values, sort_keys=False).strip()
    chooser = rt.recipe.chosen_exports.get(group)
    how = (f"the variant eval step `{chooser[0]}` chose on the selection split (highest mean accuracy over its tasks; "
           f"the test split never influences the choice)" if chooser else
           "one of its variants; each variant is exported to its own directory, named by its swept values")
    return (f"## Sweep\n\nStep `{group}` is swept over {len(rt.recipe.sweeps[group])} variants; this is {how}. "
            f"Its swept values:\n\n```yaml\n{values}\n```")


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
