"""The YAML recipe: parsed safely, validated into typed objects, every mistake named by key path.

Errors read like `recipes/demo.yaml:14: steps.ties.params.densty: unknown key; did you mean
'density'?`, one paragraph, raised as FmergeError. Paths resolve relative to the recipe file.
"""

from __future__ import annotations

import re
import typing
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import FmergeError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BASE = "__base__"  # the base model's name wherever models are named
DEFAULT_HEADS = [r"(^|\.)classifier\.", r"(^|\.)pre_classifier\.", r"(^|\.)score\."]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(Strict):
    """A model: a local Hugging Face directory, a hub id, or the output of a `finetune` step."""

    path: str | None = Field(None, description="local directory (relative to the recipe) or hub id")
    from_step: str | None = Field(None, description="name of a finetune step producing this model")
    data: str | None = Field(None, description="name of this model's task in `data`")
    revision: str | None = Field(None, description="hub revision (commit, branch or tag)")

    def model_post_init(self, _: Any) -> None:
        if (self.path is None) == (self.from_step is None):
            raise ValueError("give exactly one of 'path' or 'from_step'")


class DataSpec(Strict):
    """A task's labelled data: local csv/json/jsonl/parquet files or a hub dataset id."""

    path: str = Field(description="file, directory or hub dataset id")
    text: str = "text"
    text_pair: str | None = None
    label: str | None = "label"
    label_names: list[str] | None = None
    config: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    image: str | None = Field(None, description="image column: a CLIP zero-shot task (see fmerge/clip.py)")
    classnames: str | list[str] | None = Field(
        None, description="CLIP class names in label order, or a built-in task name (default: the data "
        "entry's name if built in, else the dataset's label names)")
    templates: str | list[str] | None = Field(
        None, description="CLIP prompt templates with '{}', or a built-in task name (default: the data "
        "entry's name if built in, else 'a photo of a {}.')")

    def model_post_init(self, _: Any) -> None:
        from .clip import builtin_task

        if self.image is None and (self.classnames is not None or self.templates is not None):
            raise ValueError("'classnames' and 'templates' are for image (CLIP) tasks: set 'image' too")
        for key in ("classnames", "templates"):
            value = getattr(self, key)
            if isinstance(value, str) and builtin_task(value) is None:
                raise ValueError(f"{key} '{value}' is no built-in task; give a list, or one of "
                                 f"sun397, cars, resisc45, eurosat, svhn, gtsrb, mnist, dtd")
            if isinstance(value, str) and key == "classnames" and builtin_task(value)["classnames"] is None:
                raise ValueError(f"the built-in table has no class names for '{value}' (they are read from "
                                 f"the dataset's labels): leave 'classnames' out")
        if isinstance(self.templates, list) and not all("{}" in t for t in self.templates):
            raise ValueError("each template must contain '{}', where the class name goes")


class RecipeSpec(Strict):
    version: Literal[1] = 1
    name: str | None = None
    store: str | None = Field(None, description="artifact store directory (relative to the recipe)")
    seed: int = 0
    device: str = "cpu"
    base: str | ModelSpec
    models: dict[str, str | ModelSpec] = Field(min_length=1)
    data: dict[str, DataSpec] = {}
    exclude: list[str] = Field([], description="regexes of tensor names never merged (taken from base)")
    heads: list[str] = Field(DEFAULT_HEADS, description="regexes of per-task head tensors, never averaged")
    allow_pickle: bool = False
    trust_remote_code: bool = False
    steps: dict[str, dict[str, Any]] = Field(min_length=1)
    sweep: dict[str, list[Any]] = Field({}, description="grid over step parameters: {step.param.path: [values]}")

    @field_validator("models", "data", "steps")
    @classmethod
    def _names(cls, value: dict) -> dict:
        for name in value:
            if not NAME_RE.match(str(name)):
                raise ValueError(f"name '{name}' must use letters, digits, '_', '-' or '.'")
        return value

    @field_validator("exclude", "heads")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"'{pattern}' is not a valid regular expression ({exc})")
        return value


class Recipe:
    """A validated recipe: the spec, its resolved paths, and each step's typed config."""

    def __init__(self, spec: RecipeSpec, file: Path | None, steps: dict[str, BaseModel], lines: "LineIndex"):
        self.spec, self.file, self.steps, self.lines = spec, file, steps, lines
        self.dir = file.parent if file else Path.cwd()
        self.base = spec.base if isinstance(spec.base, ModelSpec) else ModelSpec(path=spec.base)
        self.models = {n: m if isinstance(m, ModelSpec) else ModelSpec(path=m) for n, m in spec.models.items()}
        self.sweeps: dict[str, list] = {}  # swept step -> its variants (fmerge.sweep.Variant)

    def step_names(self, name: str) -> list[str]:
        """The steps a recipe-level step name stands for: itself, or a swept step's variants."""
        return [v.name for v in self.sweeps[name]] if name in self.sweeps else [name]

    def where(self, *path: str | int) -> str:
        """'file:line: a.b.c' for messages about a recipe key."""
        return self.lines.where(path)

    @property
    def is_clip(self) -> bool:
        """Tasks with an image column are CLIP zero-shot tasks: only vision towers are merged."""
        return any(d.image is not None for d in self.spec.data.values())

    def is_hub_id(self, path: str) -> bool:
        """'org/name' is a hub id unless 'org' is a local directory (then it is a missing path)."""
        return bool(HUB_ID_RE.match(path)) and not self.resolve(path.split("/")[0]).exists()

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.dir / p)


class LineIndex:
    """Maps key paths to line numbers of the YAML source, for error messages."""

    def __init__(self, file: Path | None, root: yaml.Node | None):
        self.file, self.root = file, root

    def line(self, path: tuple) -> int | None:
        node, line = self.root, None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == str(part):
                        node, line = v, k.start_mark.line + 1
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def where(self, path: tuple) -> str:
        key = ".".join(str(p) for p in path)
        if self.file is None:
            return key
        line = self.line(path)
        return f"{self.file}:{line}: {key}" if line else f"{self.file}: {key}"


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """BaseModel classes reachable from a field annotation (through Optional, list, dict...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _model_classes(arg)
    return found


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names (and aliases) valid at `loc` inside `model`, for did-you-mean hints."""
    classes = [model]
    for part in loc[:-1]:
        nxt = []
        for cls in classes:
            field = cls.model_fields.get(str(part))
            if field is not None:
                nxt += _model_classes(field.annotation)
            elif isinstance(part, (int, str)):
                nxt.append(cls)  # dict key or list index: stay on the same class
        classes = nxt or classes
    keys: list[str] = []
    for cls in classes:
        for name, field in cls.model_fields.items():
            keys += [name] + ([field.alias] if field.alias else [])
    return keys


def _is_union_tag(part: Any) -> bool:
    """Loc entries pydantic adds for union members ('list[float]', 'constrained-float', 'str')."""
    return isinstance(part, str) and ("[" in part or part.startswith("constrained-")
                                      or part in {"str", "int", "float", "bool", "ModelSpec"})


def format_validation_error(exc: ValidationError, model: type[BaseModel], lines: LineIndex, prefix: tuple = ()) -> str:
    """One sentence per problem, each naming file, line and key path."""
    parts = []
    errors = [(tuple(p for p in err["loc"] if not _is_union_tag(p)), err) for err in exc.errors()]
    # A value fitting no member of a union yields one error per member; if a member took its type
    # but not its value (e.g. density 0 for a float > 0), that error alone says what is wrong.
    value_errors = {loc for loc, err in errors if not err["type"].endswith("_type") and err["type"] != "missing"}
    errors = [(loc, err) for loc, err in errors if loc not in value_errors or not err["type"].endswith("_type")]
    for loc, err in errors:
        where = lines.where(prefix + loc)
        if err["type"] == "extra_forbidden":
            close = get_close_matches(str(loc[-1]), _known_keys(model, loc), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(set(_known_keys(model, loc))))}"
            parts.append(f"{where}: unknown key{hint}")
        elif err["type"] == "missing":
            parts.append(f"{where}: required key is missing")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else ""
            parts.append(f"{where}: {err['msg']}{shown}")
    # A value that fits no member of a union yields one error per member: keep each text once.
    return "; ".join(dict.fromkeys(parts))


def parse_yaml(text: str, file: Path | None) -> tuple[Any, LineIndex]:
    name = str(file) if file else "<recipe>"
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise FmergeError(f"{name}{at}: malformed YAML: {problem}.")
    if not isinstance(data, dict):
        raise FmergeError(f"{name}: a recipe must be a YAML mapping with at least 'base', 'models' and 'steps'.")
    return data, LineIndex(file, root)


def load_recipe(file: Path | str, sets: list[str] | None = None) -> Recipe:
    """Load and validate a recipe; `sets` are `--set STEP.PARAM=VALUE[,VALUE...]` items."""
    file = Path(file)
    try:
        text = file.read_text()
    except OSError as exc:
        raise FmergeError(f"Cannot read recipe {file}: {exc.strerror or exc}.")
    return parse_recipe(text, file, sets)


def parse_recipe(text: str, file: Path | None = None, sets: list[str] | None = None) -> Recipe:
    data, lines = parse_yaml(text, file)
    if sets:
        from .sweep import apply_overrides, parse_set

        apply_overrides(data, *parse_set(sets))
    if "merge_method" in data:  # a mergekit config: read as the equivalent one-step recipe
        from .mergekit import recipe_from_mergekit

        data = recipe_from_mergekit(data, lines, file)
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as exc:
        raise FmergeError(format_validation_error(exc, RecipeSpec, lines))
    from .steps import STEP_KINDS  # steps register their typed configs

    steps: dict[str, BaseModel] = {}
    for name, raw in spec.steps.items():
        if not isinstance(raw, dict) or "kind" not in raw:
            raise FmergeError(f"{lines.where(('steps', name))}: each step needs a 'kind' "
                              f"(one of {', '.join(sorted(STEP_KINDS))}).")
        kind = raw["kind"]
        if kind not in STEP_KINDS:
            close = get_close_matches(str(kind), STEP_KINDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise FmergeError(f"{lines.where(('steps', name, 'kind'))}: unknown step kind '{kind}'{hint} "
                              f"Known kinds: {', '.join(sorted(STEP_KINDS))}.")
        config_cls = STEP_KINDS[kind].Config
        try:
            steps[name] = config_cls.model_validate({k: v for k, v in raw.items() if k != "kind"})
        except ValidationError as exc:
            raise FmergeError(format_validation_error(exc, config_cls, lines, ("steps", name)))
    recipe = Recipe(spec, file, steps, lines)
    _check_references(recipe)
    if spec.sweep:
        from .sweep import expand

        expand(recipe, spec.sweep)
        for group in recipe.sweeps.values():
            for v in group:
                STEP_KINDS[kind_of(recipe, v.name)].check(recipe, v.name, recipe.steps[v.name])
    return recipe


def _check_references(recipe: Recipe) -> None:
    from .steps import STEP_KINDS

    models, data, steps = recipe.models, recipe.spec.data, recipe.steps
    for name, m in [("base", recipe.base)] + [(n, m) for n, m in models.items()]:
        key = ("base",) if name == "base" else ("models", name)
        if m.from_step is not None and m.from_step not in steps:
            raise FmergeError(f"{recipe.where(*key, 'from_step')}: no step named '{m.from_step}'.")
        if m.path is not None:
            local = recipe.resolve(m.path)
            if not local.exists() and not recipe.is_hub_id(m.path):
                raise FmergeError(f"{recipe.where(*key)}: model directory {local} does not exist "
                                  f"(nor is '{m.path}' a hub id of the form org/name).")
        if m.data is not None and m.data not in data:
            close = get_close_matches(m.data, data, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise FmergeError(f"{recipe.where(*key, 'data')}: no data entry named '{m.data}'{hint}")
    for name, d in data.items():
        local = recipe.resolve(d.path)
        if not local.exists() and not recipe.is_hub_id(d.path):
            raise FmergeError(f"{recipe.where('data', name, 'path')}: data file {local} does not exist.")
    for name, cfg in steps.items():
        kind = STEP_KINDS[recipe.spec.steps[name]["kind"]]
        for field, ref in kind.step_refs(cfg):
            if ref not in steps:
                close = get_close_matches(ref, steps, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise FmergeError(f"{recipe.where('steps', name, field)}: no step named '{ref}'{hint}")
        for field, ref in kind.model_refs(cfg):
            if ref not in models:
                close = get_close_matches(ref, models, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise FmergeError(f"{recipe.where('steps', name, field)}: no model named '{ref}'{hint} "
                                  f"Models: {', '.join(models)}.")
        kind.check(recipe, name, cfg)
    step_order(recipe)  # raises on cycles


def step_dependencies(recipe: Recipe, name: str) -> list[str]:
    """Steps that must run before `name`: steps it names, and steps producing the models it uses."""
    from .steps import STEP_KINDS

    cfg = recipe.steps[name]
    kind = STEP_KINDS[recipe.spec.steps[name]["kind"]]
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
            raise FmergeError(f"{recipe.where('steps', name)}: steps form a cycle: {' -> '.join(cycle)}.")
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
