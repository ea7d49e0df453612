"""The step graph: a validated recipe's steps with their typed configs, references, order and sweeps.

This layer sits on the recipe schema and is handed the step-kind registry by its caller (the
executor, the CLI, the Python API); it imports no step kind, so step kinds may freely import it.
"""

from __future__ import annotations

import copy
import itertools
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from .errors import RecipeError, quoted
from .mergekit import recipe_from_mergekit
from .recipe import Recipe, RecipeSpec, check_names, cut, format_validation_error, parse_yaml, read_recipe_text
from .sweep import Variant, _assign, _split, apply_overrides, parse_set, redirect_outputs, variant_name

Kinds = Mapping[str, Any]  # step kind name -> StepKind (fmerge.steps.step_kinds())


def load_recipe(file: Path | str, kinds: Kinds, sets: list[str] | None = None) -> Recipe:
    """Load and validate a recipe; `sets` are `--set STEP.PARAM=VALUE[,VALUE...]` items."""
    file = Path(file)
    return parse_recipe(read_recipe_text(file), kinds, file, sets)


def parse_recipe(text: str, kinds: Kinds, file: Path | None = None, sets: list[str] | None = None) -> Recipe:
    """Validate recipe text against the step kinds `kinds` (the registry, passed in by the caller)."""
    data, lines = parse_yaml(text, file)
    if sets:
        apply_overrides(data, *parse_set(sets))
        redirect_outputs(data, sets)
    mergekit = "merge_method" in data
    if mergekit:  # a mergekit config: read as the equivalent one-step recipe
        data = recipe_from_mergekit(data, lines, file)
    check_names(data, lines)
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, RecipeSpec, lines))
    steps: dict[str, BaseModel] = {}
    for name, raw in spec.steps.items():
        if not isinstance(raw, dict) or "kind" not in raw:
            raise RecipeError(f"{lines.where(('steps', name))}: each step needs a 'kind' "
                              f"(one of {', '.join(sorted(kinds))}).")
        kind = raw["kind"]
        if not isinstance(kind, str) or kind not in kinds:
            close = get_close_matches(kind, kinds, n=1) if isinstance(kind, str) else []
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise RecipeError(f"{lines.where(('steps', name, 'kind'))}: unknown step kind {quoted(kind, 80)}{hint} "
                              f"Known kinds: {', '.join(sorted(kinds))}.")
        config_cls = kinds[kind].Config
        try:
            steps[name] = config_cls.model_validate({k: v for k, v in raw.items() if k != "kind"})
        except ValidationError as exc:
            raise RecipeError(format_validation_error(exc, config_cls, lines, ("steps", name)))
    recipe = Recipe(spec, file, steps, lines, kinds)
    recipe.text, recipe.mergekit, recipe.sets = text, mergekit, list(sets or [])
    _check_references(recipe)
    if spec.sweep:
        expand_sweeps(recipe, spec.sweep)
        for name in recipe.steps:  # again: variants, and checks that span steps (e.g. split leaks)
            kinds[kind_of(recipe, name)].check(recipe, name, recipe.steps[name])
    return recipe


def _check_references(recipe: Recipe) -> None:
    kinds = recipe.kinds
    models, data, steps = recipe.models, recipe.spec.data, recipe.steps
    for name, m in [("base", recipe.base)] + [(n, m) for n, m in models.items()]:
        key = ("base",) if name == "base" else ("models", name)
        if m.from_step is not None and m.from_step not in steps:
            raise RecipeError(f"{recipe.where(*key, 'from_step')}: no step named {quoted(m.from_step, 80)}.")
        if m.path is not None:
            local = recipe.check_path(m.path, *key)
            if not local.exists() and not recipe.is_hub_id(m.path):
                raise RecipeError(f"{recipe.where(*key)}: model directory {cut(str(local), 300)} does not "
                                  f"exist (nor is {quoted(m.path, 80)} a hub id of the form org/name).")
            if local.exists() and not local.is_dir():
                raise RecipeError(f"{recipe.where(*key)}: {cut(str(local), 300)} is not a directory; a model is a "
                                  f"directory holding model.safetensors (or its shards) and config.json.")
        if m.data is not None and m.data not in data:
            close = get_close_matches(m.data, data, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{recipe.where(*key, 'data')}: no data entry named {quoted(m.data, 80)}{hint}")
    for name, d in data.items():
        d.check_paths(recipe, name)  # files exist; splits well defined (fmerge.recipe.DataSpec)
    for name, cfg in steps.items():
        kind = kinds[recipe.spec.steps[name]["kind"]]
        for field, ref in kind.step_refs(cfg):
            if ref not in steps:
                close = get_close_matches(ref, steps, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else "."
                raise RecipeError(f"{recipe.where('steps', name, field)}: no step named {quoted(ref, 80)}{hint}")
        for field, ref in kind.model_refs(cfg):
            if ref not in models:
                close = get_close_matches(ref, models, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else "."
                raise RecipeError(f"{recipe.where('steps', name, field)}: no model named {quoted(ref, 80)}{hint} "
                                  f"Models: {', '.join(models)}.")
        kind.check(recipe, name, cfg)
    step_order(recipe)  # raises on cycles


def step_dependencies(recipe: Recipe, name: str) -> list[str]:
    """Steps that must run before `name`: steps it names, and steps producing the models it uses."""
    cfg = recipe.steps[name]
    kind = recipe.kinds[recipe.spec.steps[name]["kind"]]
    deps = [step for _, ref in kind.step_refs(cfg) for step in recipe.step_names(ref)]
    for model in kind.models_used(cfg, recipe):
        producer = recipe.models[model].from_step
        if producer:
            deps.append(producer)
    if recipe.base.from_step and kind.uses_base:
        deps.append(recipe.base.from_step)
    return list(dict.fromkeys(deps))


def step_order(recipe: Recipe) -> list[str]:
    """Steps in dependency order (recipe order among independent steps); cycles are errors."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = chain[chain.index(name):] + [name]
            raise RecipeError(f"{recipe.where('steps', name)}: steps form a cycle: {' -> '.join(cycle)}.")
        state[name] = 1
        for dep in step_dependencies(recipe, name):
            visit(dep, chain + [name])
        state[name] = 2
        order.append(name)

    for name in recipe.steps:
        visit(name, [])
    return order


def kind_of(recipe: Recipe, step: str) -> str:
    return recipe.spec.steps[step]["kind"]


def expand_sweeps(recipe: Recipe, grid: dict[str, list]) -> None:
    """Replace swept steps (and the steps reading them, except evals) by their variants, in place."""
    spec_steps = recipe.spec.steps
    by_step: dict[str, dict[str, list]] = {}
    for key, values in grid.items():
        where = recipe.where("sweep", key)
        step, path = _split(key, spec_steps, where)
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{where}: a sweep needs a non-empty list of values.")
        if spec_steps[step]["kind"] == "eval":
            raise RecipeError(f"{where}: eval steps are not swept; sweep the merges they evaluate.")
        by_step.setdefault(step, {})[".".join(path)] = values
    for name, m in recipe.models.items():
        if m.from_step in by_step:
            raise RecipeError(f"{recipe.where('sweep')}: step '{m.from_step}' produces model '{name}'; "
                              f"sweeping a step that makes a model is not supported.")

    groups: dict[str, list[Variant]] = {}
    order = step_order(recipe)
    _check_grid_size(recipe, order, by_step)
    for key in grid:  # two equal values would make two variants of one name, the second replacing the first
        shown: set[str] = set()
        for value in grid[key]:
            if variant_name("", {key: value}) in shown:
                raise RecipeError(f"{recipe.where('sweep', key)}: value {quoted(value, 80)} is listed twice; each "
                                  f"value of a sweep makes one variant: list each once.")
            shown.add(variant_name("", {key: value}))
    for step in order:
        kind = recipe.kinds[spec_steps[step]["kind"]]
        raw = spec_steps[step]
        own = by_step.get(step, {})
        upstream = [(f, ref) for f, ref in kind.step_refs(recipe.steps[step]) if ref in groups]
        if not own and (not upstream or kind.kind == "eval"):
            continue
        axes: list[list[tuple[dict, dict]]] = []  # per axis: (values, {ref: variant name})
        for path, values in own.items():
            axes.append([({f"{step}.{path}": v}, {}) for v in values])
        for ref in dict.fromkeys(ref for _, ref in upstream):
            axes.append([(v.values, {ref: v.name}) for v in groups[ref]])
        variants, taken = [], set()
        for combo in itertools.product(*axes):
            values = {k: v for vals, _ in combo for k, v in vals.items()}
            renames = {k: v for _, r in combo for k, v in r.items()}
            new = copy.deepcopy(raw)
            for key, value in values.items():
                if key.startswith(step + "."):
                    _assign(new, key[len(step) + 1:].split("."), value, recipe.where("sweep", key))
            for f, ref in upstream:
                current = new.get(f)
                new[f] = [renames.get(x, x) for x in current] if isinstance(current, list) else renames[ref]
            name = variant_name(step, values)
            if name in recipe.steps or name in taken:
                raise RecipeError(f"{recipe.where('sweep')}: two variants (or a variant and a step) would both be "
                                  f"named {quoted(name, 120)}; sweep distinct values, or rename the step.")
            try:
                cfg = kind.Config.model_validate({k: v for k, v in new.items() if k != "kind"})
            except ValidationError as exc:
                detail = format_validation_error(exc, kind.Config, recipe.lines, ("steps", step))
                raise RecipeError(f"{recipe.where('sweep')}: variant {cut(name, 120)}: {detail}")
            variants.append((name, new, cfg, values))
            taken.add(name)
        groups[step] = [Variant(n, step, vals) for n, _, _, vals in variants]
        del recipe.steps[step], spec_steps[step]
        for n, new, cfg, _ in variants:
            recipe.steps[n], spec_steps[n] = cfg, new
    recipe.sweeps = groups
    _route_sweep_exports(recipe)


def _route_sweep_exports(recipe: Recipe) -> None:
    """Where the variants of a swept step with `export` go: when an eval step chooses among them,
    the chosen variant alone is exported to the named directory, after the choice exists (the eval
    step exports it); otherwise each variant is exported to its own sub-directory of it, named by
    its swept values (`out/ta/lambda=0.3`)."""
    for group, variants in recipe.sweeps.items():
        export = getattr(recipe.steps[variants[0].name], "export", None)
        if not export:
            continue
        choosers = [n for n, cfg in recipe.steps.items() if kind_of(recipe, n) == "eval" and group in cfg.merges]
        if len(choosers) > 1:
            raise RecipeError(
                f"{recipe.where('steps', group, 'export')}: step '{group}' is swept and exports its chosen variant, "
                f"but eval steps {', '.join(repr(c) for c in choosers)} each choose one, so which to export is "
                f"unclear. List '{group}' in the merges of one eval step only, or remove 'export' from it and "
                f"export the chosen parameters from a step of their own.")
        for v in variants:
            cfg = recipe.steps[v.name]
            values = v.name[len(group) + 1:-1]  # the swept values, as the variant's name shows them
            if not choosers and ("/" in values or "\0" in values or values in (".", "..")):
                raise RecipeError(
                    f"{recipe.where('steps', group, 'export')}: variant {quoted(v.name, 120)} of swept step "
                    f"'{group}' would export to a sub-directory named by its swept values, {quoted(values, 80)}, "
                    f"which is not a usable directory name. Sweep values without '/', or remove 'export' from "
                    f"'{group}' and pick a variant with an eval step.")
            target = None if choosers else str(Path(export) / values)
            recipe.steps[v.name] = cfg.model_copy(update={"export": target})
        if choosers:
            recipe.chosen_exports[group] = (choosers[0], export)


def _check_grid_size(recipe: Recipe, order: list[str], by_step: dict[str, dict[str, list]]) -> None:
    """Refuse a grid of more than the recipe's `max_variants` steps before building any of them."""
    limit = recipe.spec.max_variants
    spec_steps, sizes, total = recipe.spec.steps, {}, 0
    for step in order:
        kind = recipe.kinds[spec_steps[step]["kind"]]
        upstream = [ref for _, ref in kind.step_refs(recipe.steps[step]) if ref in sizes]
        own = by_step.get(step, {})
        if not own and (not upstream or kind.kind == "eval"):
            continue
        size = 1
        for values in own.values():
            size *= len(values)
        for ref in dict.fromkeys(upstream):
            size *= sizes[ref]
        sizes[step] = size
        total += size
        if total > limit:
            grid = " × ".join(str(len(v)) for v in own.values()) or "its upstream sweeps"
            grid += " and upstream sweeps" if own and upstream else ""
            raise RecipeError(f"{recipe.where('sweep')}: the sweep expands into more than {limit} steps (step "
                              f"'{step}' alone into {size}: {grid}); "
                              f"sweep fewer values, or raise the limit with 'max_variants: N' at the top of the "
                              f"recipe if the grid is meant.")
