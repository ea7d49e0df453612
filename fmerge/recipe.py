"""The YAML recipe: parsed safely, validated into typed objects, every mistake named by key path.

Errors read like `recipes/demo.yaml:14: steps.ties.params.densty: unknown key; did you mean
'density'?`, one paragraph, raised as RecipeError (an FmergeError). Paths resolve relative to the recipe file.
"""

from __future__ import annotations

import math
import os
import re
import stat
import types
import typing
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import RecipeError, quoted

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BASE = "__base__"  # the base model's name wherever models are named
DEFAULT_HEADS = [r"(^|\.)classifier\.", r"(^|\.)pre_classifier\.", r"(^|\.)score\."]

# Limits on what a recipe may cost to read: a recipe is a page of YAML, never a stream or a bomb.
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 64  # nesting levels of mappings and lists, aliases expanded
MAX_NODES = 100_000  # values (mappings, lists, scalars) written out
MAX_ALIAS_NODES = 10_000  # nodes that aliases (*name) may add, all of them together
MAX_INT = 2**63  # integers at or beyond this are refused (no recipe value needs them)
MAX_VARIANTS = 1000  # default of `max_variants`: steps a sweep may expand into


_UNIONS = (typing.Union, types.UnionType)


def _bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether `value` holds a YAML boolean where `annotation` takes only numbers (pydantic reads
    true as 1 there, which hides a mistake such as `examples: yes`)."""
    if annotation is Any:
        return False
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if isinstance(value, bool):
        members = args if origin in _UNIONS else (annotation,)
        if any(m is bool or m is Any for m in members):
            return False
        return any(m in (int, float) for m in members)
    if origin in _UNIONS:
        return any(_bool_for_number(a, value) for a in args if a is not type(None))
    if isinstance(value, list) and origin is list and args:
        return any(_bool_for_number(args[0], v) for v in value)
    if isinstance(value, dict) and origin is dict and len(args) == 2:
        return any(_bool_for_number(args[1], v) for v in value.values())
    return False


class Strict(BaseModel):
    # defer_build: a model's validator is built when it first validates, so the configs of the step
    # kinds and methods a recipe does not use cost nothing at start (~40 ms for all of them)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, defer_build=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_for_number(field.annotation, value):
            raise ValueError("expected a number, got a boolean (true/false, yes/no, on/off); write the number")
        return value


class ModelSpec(Strict):
    """A model: a local Hugging Face directory, a hub id, or the output of a `finetune` step."""

    path: str | None = Field(None, description="local directory (relative to the recipe) or hub id")
    from_step: str | None = Field(None, description="name of a finetune step producing this model")
    data: str | None = Field(None, description="name of this model's task in `data`")
    revision: str | None = Field(None, description="hub revision (commit, branch or tag)")

    def model_post_init(self, _: Any) -> None:
        if (self.path is None) == (self.from_step is None):
            raise ValueError("give exactly one of 'path' or 'from_step'")


DEFAULT_PARTITION = (0.8, 0.1, 0.1)  # shares of train_split, validation_split, test_split of a single file


class DataSpec(Strict):
    """A task's data: local csv/json/jsonl/parquet files or a hub dataset id.

    What the task is (`task`, see fmerge/tasks.py): `classification` (`text`, `text_pair`,
    `label`); `causal_lm`, language modelling: per-token loss over `text`, with the tokens of
    `prompt` (if given; the text follows it directly) masked from the loss, and no labels;
    `multiple_choice`: `text` is the context, `choices` a list of strings per row (each scored
    after the context and one space, as lm-evaluation-harness does), `label` the index of the
    right one. Left out,
    an entry with `choices` is multiple choice, otherwise the model's config decides (a causal
    LM's config makes it `causal_lm`, any other `classification`).

    Where each split's rows come from, so that no split ever stands in for another:
    - `path` naming one file: the file is cut into disjoint splits by a seeded partition
      (`partition`, default train_split 0.8, validation_split 0.1, test_split 0.1; `partition_seed`),
      see fmerge.data.partition_indices for the rule;
    - `path` naming a directory (train.jsonl, validation.jsonl, ...) or a hub id: its own splits;
    - `splits`: one file per split, e.g. {train: a.jsonl, validation: b.jsonl, test: c.jsonl}.
    """

    path: str | None = Field(None, description="a data file (cut into splits by `partition`), a directory of "
                             "split files (train.jsonl, validation.jsonl, ...) or a hub dataset id")
    text: str = "text"
    text_pair: str | None = None
    label: str | None = "label"
    label_names: list[str] | None = None
    task: Literal["classification", "causal_lm", "multiple_choice"] | None = Field(
        None, description="classification, causal_lm (language modelling) or multiple_choice (default: "
        "multiple_choice if 'choices' is given, else from the model's config)")
    prompt: str | None = Field(None, description="causal_lm: column of a prompt that each text directly follows "
                               "(a separating space or newline is the data's), whose tokens are not scored")
    choices: str | None = Field(None, description="multiple_choice: column holding each row's choices (a list "
                                "of strings); 'text' is the context, 'label' the right choice's index")
    config: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str = "test"
    splits: dict[str, str] | None = Field(
        None, description="one file per split instead of `path`, e.g. {train: a.jsonl, validation: b.jsonl, "
        "test: c.jsonl} (relative to the recipe); keys are this entry's split names")
    partition: dict[str, float] | None = Field(
        None, description="for `path` naming one file: each split's share of its rows, e.g. {train: 0.8, "
        "validation: 0.1, test: 0.1} (the default, with this entry's split names); shares > 0 summing to 1")
    partition_seed: int = Field(0, description="seed of the partition's row shuffle (not the recipe seed)")
    image: str | None = Field(None, description="image column: a CLIP zero-shot task (see fmerge/clip.py)")
    classnames: str | list[str] | None = Field(
        None, description="CLIP class names in label order, or a built-in task name (default: the data "
        "entry's name if built in, else the dataset's label names)")
    templates: str | list[str] | None = Field(
        None, description="CLIP prompt templates with '{}', or a built-in task name (default: the data "
        "entry's name if built in, else 'a photo of a {}.')")

    @field_validator("splits", "partition")
    @classmethod
    def _split_names(cls, value: dict | None, info: ValidationInfo) -> dict | None:
        if value is None:
            return value
        if not value:
            raise ValueError("name at least one split")
        names = list(dict.fromkeys(info.data.get(k) for k in ("train_split", "validation_split", "test_split")))
        for split in value:
            if split not in names:
                raise ValueError(f"split {quoted(split, 80)} is none of this entry's split names ({', '.join(map(str, names))}); "
                                 f"rename it, or set train_split, validation_split or test_split to it")
        if info.field_name == "partition":
            for split, share in value.items():
                if not share > 0:
                    raise ValueError(f"the share of split '{split}' must be > 0 (got {share})")
            if abs(sum(value.values()) - 1) > 1e-6:
                raise ValueError(f"the shares must sum to 1 (they sum to {sum(value.values()):g})")
        return value

    def model_post_init(self, _: Any) -> None:
        from .clip import builtin_task

        if (self.path is None) == (self.splits is None):
            raise ValueError("give exactly one of 'path' (a data file, a directory of split files or a hub dataset "
                             "id) or 'splits' (one file per split)")
        if self.splits is not None and (self.partition is not None or "partition_seed" in self.model_fields_set):
            raise ValueError("'partition' and 'partition_seed' cut the single file given as 'path'; with 'splits' "
                             "each split has its own file: remove them")
        if self.task == "multiple_choice" and self.choices is None:
            raise ValueError("a multiple_choice task needs 'choices', the column holding each row's list of choices")
        if self.choices is not None and self.task not in (None, "multiple_choice"):
            raise ValueError(f"'choices' is for multiple_choice data, but task is '{self.task}': remove one of them")
        if self.prompt is not None and (self.task not in (None, "causal_lm") or self.choices is not None):
            raise ValueError("'prompt' is for causal_lm (language-modelling) data; a multiple-choice context is "
                             "'text' and a classifier reads 'text' and 'text_pair'")
        if self.image is not None and (self.task is not None or self.choices is not None or self.prompt is not None):
            raise ValueError("'image' makes a CLIP zero-shot task: remove 'task', 'choices' and 'prompt'")
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

    def single_file(self, recipe: "Recipe") -> Path | None:
        """The one data file `path` names (resolved), which is partitioned; None otherwise."""
        if self.path is None:
            return None
        local = recipe.resolve(self.path)
        return local if local.is_file() else None

    def partition_for(self, recipe: "Recipe") -> dict[str, float] | None:
        """The partition of a single-file entry (the default shares if none is given); else None."""
        if self.single_file(recipe) is None:
            return None
        if self.partition is not None:
            return dict(self.partition)
        return dict(zip((self.train_split, self.validation_split, self.test_split), DEFAULT_PARTITION))

    def check_paths(self, recipe: "Recipe", name: str) -> None:
        """At recipe load: the files exist, and the entry's splits are well defined."""
        from .data import _BUILDERS

        if self.splits is not None:
            seen: dict[Path, str] = {}
            for split, file in self.splits.items():
                where = recipe.where("data", name, "splits", split)
                local = recipe.check_path(file, "data", name, "splits", split)
                if not local.is_file():
                    what = ("is a directory; name one csv/json/jsonl/parquet file" if local.is_dir() else
                            "is not a regular file (a device, pipe or socket)" if local.exists() else "does not exist")
                    raise RecipeError(f"{where}: data file {local} {what}.")
                if local.suffix.lower() not in _BUILDERS:
                    raise RecipeError(f"{where}: data file {local} has extension '{local.suffix}', which fmerge "
                                      f"cannot read; use one of {', '.join(sorted(_BUILDERS))}.")
                if local.resolve() in seen:
                    raise RecipeError(f"{where}: names the same file as splits.{seen[local.resolve()]} ({local}), so "
                                      f"both splits would hold the same rows; give each split its own file, or give "
                                      f"the one file as 'path' to have it partitioned.")
                seen[local.resolve()] = split
            return
        local = recipe.check_path(self.path, "data", name, "path")
        if not local.exists() and not recipe.is_hub_id(self.path):
            raise RecipeError(f"{recipe.where('data', name, 'path')}: data file {cut(str(local), 300)} does not "
                              f"exist.")
        if local.exists() and not local.is_file() and not local.is_dir():
            raise RecipeError(f"{recipe.where('data', name, 'path')}: {cut(str(local), 300)} is not a regular file "
                              f"or a directory (a device, pipe or socket); name a data file or a directory of them.")
        if not local.is_file():
            if self.partition is not None or "partition_seed" in self.model_fields_set:
                key = "partition" if self.partition is not None else "partition_seed"
                what = "a directory" if local.is_dir() else "a hub dataset"
                raise RecipeError(f"{recipe.where('data', name, key)}: a partition cuts a single data file, but "
                                  f"path '{self.path}' is {what}, whose splits come with it; remove '{key}'.")
            return
        if self.partition is None:
            keys = ("train_split", "validation_split", "test_split")
            for i, key in enumerate(keys):
                for other in keys[:i]:
                    if getattr(self, key) == getattr(self, other):
                        raise RecipeError(
                            f"{recipe.where('data', name, key)}: '{getattr(self, key)}' is also the {other}, but "
                            f"{self.path} is one file, partitioned into disjoint train, validation and test splits "
                            f"(shares {', '.join(map(str, DEFAULT_PARTITION))}); give the three splits distinct "
                            f"names, or set 'partition' to the splits wanted, e.g. {{{self.train_split}: 0.8, "
                            f"{getattr(self, key)}: 0.2}}.")

    def rows_of(self, recipe: "Recipe", name: str, split: str) -> tuple:
        """What identifies the rows of `split` (for leak checks; see `rows_overlap`). A split the
        entry does not have is an error naming the recipe key."""
        if self.splits is not None:
            if split not in self.splits:
                raise RecipeError(f"{recipe.where('data', name, 'splits')}: data '{name}' names no file for split "
                                  f"'{split}' (it names {', '.join(self.splits)}); add '{split}: FILE' to its "
                                  f"splits, or use one of those.")
            return ("file", str(recipe.resolve(self.splits[split]).resolve()))
        file = self.single_file(recipe)
        if file is not None:
            partition = self.partition_for(recipe)
            if split not in partition:
                raise RecipeError(f"{recipe.where('data', name, 'partition')}: data '{name}' is one file "
                                  f"partitioned into {', '.join(sorted(partition))}; it has no split '{split}'. "
                                  f"Use one of those, or add '{split}' to its partition (shares summing to 1).")
            return ("partition", str(file.resolve()), tuple(sorted(partition.items())), self.partition_seed, split)
        local = recipe.resolve(self.path)
        return ("split", str(local.resolve()) if local.exists() else self.path, self.config, split)

    @staticmethod
    def rows_overlap(a: tuple, b: tuple) -> bool:
        """Whether two `rows_of` identities may share rows: the same split of the same data, or
        one file read two ways (whole, or under different partitions). Blocks of one partition
        are disjoint, as are differently named splits of a directory or hub dataset."""
        if a == b:
            return True
        if a[0] in ("file", "partition") and b[0] in ("file", "partition") and a[1] == b[1]:
            return not (a[0] == b[0] == "partition" and a[2:4] == b[2:4])
        return False


class RecipeSpec(Strict):
    version: Literal[1] = 1
    name: str | None = None
    store: str | None = Field(None, description="artifact store directory (relative to the recipe)")
    seed: int = 0
    device: str = "cpu"
    device_map: Literal["auto"] | None = Field(
        None, description="'auto': spread each model the fisher, gram and eval steps run over the GPUs (then "
        "the CPU) with accelerate's big-model dispatch, for a model that does not fit one device; needs "
        "`pip install accelerate`")
    max_memory: dict[str, str] | None = Field(
        None, description="with device_map: the most memory each device may hold, e.g. {'0': '20GiB', "
        "'cpu': '64GiB'} (GPUs by number)")
    base: str | ModelSpec
    models: dict[str, str | ModelSpec] = Field(min_length=1)
    data: dict[str, DataSpec] = {}
    exclude: list[str] = Field([], description="regexes of tensor names never merged (taken from base)")
    heads: list[str] = Field(DEFAULT_HEADS, description="regexes of per-task head tensors, never averaged")
    missing_tensors: Literal["error", "base"] = Field(
        "error", description="a floating-point tensor of the base that some model lacks: 'error' (default) "
        "refuses to merge; 'base' takes the base's value for it, unmerged, and lists it in the artifact "
        "and the exported model card")
    allow_crimes: bool = Field(
        False, description="merge models whose config.json files describe different architectures (rope_theta, "
        "widths, layer counts, vocabulary...; see fmerge/compat.py), which fmerge refuses by default (mergekit's "
        "--allow-crimes); the exported model card then says so and lists the differences")
    allow_pickle: bool = False
    trust_remote_code: bool = False
    steps: dict[str, dict[str, Any]] = Field(min_length=1)
    sweep: dict[str, list[Any]] = Field({}, description="grid over step parameters: {step.param.path: [values]}")
    max_variants: int = Field(
        MAX_VARIANTS, ge=1, description=f"the most steps a sweep may expand into, all swept steps together "
        f"(default {MAX_VARIANTS}); raise it to run a larger grid on purpose")

    @field_validator("models", "data", "steps")
    @classmethod
    def _names(cls, value: dict) -> dict:
        for name in value:
            if not NAME_RE.match(str(name)):
                raise ValueError(f"name {quoted(name, 80)} must start with a letter or digit and use only "
                                 f"letters, digits, '_', '-' or '.' (ASCII; no '/', spaces or empty names)")
        return value

    @field_validator("exclude", "heads")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{quoted(pattern, 80)} is not a valid regular expression ({exc})")
        return value


class Recipe:
    """A validated recipe: the spec, its resolved paths, and each step's typed config."""

    def __init__(self, spec: RecipeSpec, file: Path | None, steps: dict[str, BaseModel], lines: "LineIndex",
                 kinds: typing.Mapping[str, Any]):
        self.spec, self.file, self.steps, self.lines = spec, file, steps, lines
        self.kinds = kinds  # the step-kind registry this recipe was validated against (fmerge.graph)
        self.dir = file.parent if file else Path.cwd()
        self.base = spec.base if isinstance(spec.base, ModelSpec) else ModelSpec(path=spec.base)
        self.models = {n: m if isinstance(m, ModelSpec) else ModelSpec(path=m) for n, m in spec.models.items()}
        self.sweeps: dict[str, list] = {}  # swept step -> its variants (fmerge.sweep.Variant)
        # swept step -> (eval step choosing its variant, export path): the chosen variant is exported there
        self.chosen_exports: dict[str, tuple[str, str]] = {}
        self.text: str | None = None  # the recipe as read, quoted by model cards
        self.mergekit = False  # read from a mergekit config (a card quotes it as such)
        self.sets: list[str] = []  # --set items applied over the text

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

    def check_path(self, path: str, *key: str | int) -> Path:
        """`path` resolved, refused (naming the recipe key) if empty or unusable as a file name."""
        if not path.strip():
            raise RecipeError(f"{self.where(*key)}: the path is empty; give a file or directory (relative to "
                              f"the recipe) or a hub id.")
        local = self.resolve(path)
        try:
            local.exists()
        except (OSError, ValueError) as exc:  # a name too long for the file system
            raise RecipeError(f"{self.where(*key)}: {quoted(path, 80)} cannot be a path here "
                              f"({getattr(exc, 'strerror', None) or exc}); give a shorter one.")
        return local


class LineIndex:
    """Maps key paths to line numbers of the YAML source, for error messages."""

    def __init__(self, file: Path | None, root: yaml.Node | None):
        self.file, self.root = file, root

    def line(self, path: tuple) -> int | None:
        node, line = self.root, None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == str(part):
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
        key = key_path(path)
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
            shown = f" (got {quoted(got, 80)})" if got is not None and not isinstance(got, (dict, list)) else ""
            parts.append(f"{where}: {cut(err['msg'].removeprefix('Value error, '), 300)}{shown}")
    # A value that fits no member of a union yields one error per member: keep each text once.
    parts = list(dict.fromkeys(parts))
    if len(parts) > 5:
        parts = parts[:5] + [f"and {len(parts) - 5} more problems"]
    return "; ".join(parts)


def cut(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters for a message (see also errors.quoted)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def key_path(path: tuple | list) -> str:
    """'steps.ta.params.lambda' for messages, each part cut short (and the whole, if very deep)."""
    parts = [str(p) if str(p).isprintable() else repr(str(p))[1:-1] for p in path]  # no raw newlines
    text = ".".join(cut(p) for p in parts)
    return text if len(text) <= 240 else f"{text[:120]}...{text[-100:]}"


def check_names(data: dict, lines: "LineIndex") -> None:
    """Names of models, data entries and steps are plain ASCII words: refused (at the name's own
    line) before validation, which could only name the whole section."""
    for section in ("models", "data", "steps"):
        entries = data.get(section)
        for name in entries if isinstance(entries, dict) else ():
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise RecipeError(f"{lines.where((section, name))}: name {quoted(name, 80)} must start with a letter "
                                  f"or digit and use only letters, digits, '_', '-' or '.' (ASCII; no '/', spaces "
                                  f"or empty names); rename it.")


def read_recipe_text(file: Path) -> str:
    """The text of a recipe file: a regular file of at most MAX_RECIPE_BYTES bytes of UTF-8.

    Devices (/dev/zero), pipes and sockets are refused before anything is read from them, so that
    reading a recipe never blocks or runs forever; larger files are refused by their size."""
    name = cut(str(file), 300)
    limit = f"a recipe may be at most {MAX_RECIPE_BYTES} bytes (1 MiB)"
    try:
        st = os.stat(file)
        if stat.S_ISDIR(st.st_mode):
            raise RecipeError(f"Cannot read recipe {name}: it is a directory; give the path of a YAML recipe "
                              f"file (e.g. {name}/recipe.yaml).")
        if not stat.S_ISREG(st.st_mode):
            raise RecipeError(f"Cannot read recipe {name}: it is not a regular file (a device, pipe or socket), "
                              f"which fmerge does not read recipes from; save the recipe to a file and give that.")
        if st.st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"Cannot read recipe {name}: it is {st.st_size} bytes and {limit}; is this the "
                              f"right file?")
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced since the stat above
                raise RecipeError(f"Cannot read recipe {name}: it is not a regular file; save the recipe to a "
                                  f"file and give that.")
            data = f.read(MAX_RECIPE_BYTES + 1)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise RecipeError(f"Cannot read recipe {name}: {cut(why, 200)}. Give the path of a YAML recipe file.")
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"Cannot read recipe {name}: it holds more than {MAX_RECIPE_BYTES} bytes and {limit}; "
                          f"is this the right file?")
    return decode_recipe(data, name)


def decode_recipe(data: bytes, name: str) -> str:
    """Recipe bytes as text: UTF-8 (a UTF-8 byte-order mark is allowed); anything else is refused
    with the line of the first byte that does not fit."""
    def at(offset: int) -> str:
        line, start = data.count(b"\n", 0, offset) + 1, data.rfind(b"\n", 0, offset) + 1
        return f"{name}:{line}:{offset - start + 1}"

    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError(f"{name}:1: the recipe is UTF-16 or UTF-32 text (it starts with a byte-order mark); "
                          f"fmerge reads recipes as UTF-8: save it as UTF-8.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{at(exc.start)}: the recipe is not UTF-8 text (byte 0x{data[exc.start]:02x} cannot be "
                          f"decoded; latin-1 or another legacy encoding?); save it as UTF-8.")
    nul = data.find(b"\0")
    if nul >= 0:
        raise RecipeError(f"{at(nul)}: the recipe holds a NUL byte, so it is not YAML text (UTF-16 without a "
                          f"byte-order mark, or a binary file?); save it as UTF-8.")
    return text


class _Refused(Exception):
    """Raised inside the loader: a problem at a YAML mark (made a RecipeError by parse_yaml)."""

    def __init__(self, mark: Any, path: list, problem: str):
        super().__init__(problem)
        self.mark, self.path, self.problem = mark, list(path), problem


_TAG = "tag:yaml.org,2002:"
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "a boolean", "null": "null",
               "timestamp": "a date", "binary": "binary data", "merge": "a merge key"}


try:  # libyaml scans and parses a 1 MiB recipe in a fraction of a second; pure Python takes ~15 s
    from yaml._yaml import CParser as _CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _CParser = None

if _CParser is not None:
    class _SafeLoader(yaml.composer.Composer, _CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        """libyaml's events, composed in Python (so that `_Loader` can check each node)."""

        def __init__(self, stream: str):
            _CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
else:  # pragma: no cover
    _SafeLoader = yaml.SafeLoader


class _Loader(_SafeLoader):
    """PyYAML's safe loader, refusing while it composes what would make a recipe ambiguous, unbounded
    or costly: keys given twice (YAML keeps the last silently), keys that are not strings, more than
    MAX_NODES values, nesting deeper than MAX_DEPTH, aliases that refer to themselves or add more
    than MAX_ALIAS_NODES nodes ("billion laughs"), numbers that are not finite or beyond 64 bits,
    and scalars that cannot be read as the type YAML gives them. Each refusal names the line and
    the key path."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._nodes = 0
        self._path: list = []
        self._depth = 0
        self._sizes: dict[yaml.Node, tuple[int, int]] = {}  # node -> (expanded node count, expanded depth)
        self._alias_nodes = 0

    def _refuse(self, mark: Any, problem: str, extra: Any = None) -> typing.NoReturn:
        raise _Refused(mark, self._path + ([extra] if extra is not None else []), problem)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        part = index.value if isinstance(parent, yaml.MappingNode) and isinstance(index, yaml.ScalarNode) else (
            index if isinstance(index, int) else None)
        if part is not None:
            self._path.append(part)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                self._refuse(event.start_mark, f"nested more than {MAX_DEPTH} levels deep; a recipe is a few "
                             f"levels of mappings and lists")
            if not isinstance(event, yaml.AliasEvent):
                self._nodes += 1
                if self._nodes > MAX_NODES:
                    self._refuse(event.start_mark, f"the recipe holds more than {MAX_NODES} values; a recipe is a "
                                 f"page of settings: is this the right file?")
            node = super().compose_node(parent, index)
            if isinstance(event, yaml.AliasEvent):
                self._check_alias(event, node)
            else:
                self._check_node(node)
            return node
        finally:
            self._depth -= 1
            if part is not None:
                self._path.pop()

    def _check_alias(self, event: Any, node: Any) -> None:
        if node not in self._sizes:
            self._refuse(event.start_mark, f"alias *{cut(event.anchor, 40)} refers to a node that contains it, "
                         f"which would be infinitely deep; copy the values instead")
        size, depth = self._sizes[node]
        self._alias_nodes += size
        if self._alias_nodes > MAX_ALIAS_NODES:
            self._refuse(event.start_mark, f"aliases (*name) expand to more than {MAX_ALIAS_NODES} nodes (an "
                         f"alias bomb?); write the values out, or use fewer aliases")
        if self._depth - 1 + depth > MAX_DEPTH:
            self._refuse(event.start_mark, f"alias *{cut(event.anchor, 40)} nests the recipe more than "
                         f"{MAX_DEPTH} levels deep")

    def _check_node(self, node: Any) -> None:
        if isinstance(node, yaml.ScalarNode):
            self._check_scalar(node)
            self._sizes[node] = (1, 1)
            return
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, _ in node.value:
                if key.tag == _TAG + "merge":
                    continue
                if not isinstance(key, yaml.ScalarNode):
                    what = "a list" if isinstance(key, yaml.SequenceNode) else "a mapping"
                    self._refuse(key.start_mark, f"a key is {what}; keys are names (strings)")
                if key.tag != _TAG + "str":
                    kind = _TYPE_NAMES.get(key.tag.removeprefix(_TAG), f"tagged {key.tag}")
                    hint = " (YAML 1.1 reads yes/no/on/off as booleans)" if kind == "a boolean" else ""
                    self._refuse(key.start_mark, f"key {cut(key.value, 40) or '(empty)'} is read as {kind}{hint}; "
                                 f"keys are names (strings): quote it, e.g. '{cut(key.value, 40)}':")
                line = key.start_mark.line + 1
                if key.value in seen:
                    self._refuse(key.start_mark, f"key given twice in one mapping (lines {seen[key.value]} and "
                                 f"{line}); YAML would silently keep only the last: remove or rename one",
                                 extra=key.value)
                seen[key.value] = line
            children = [c for kv in node.value for c in kv]
        else:
            children = list(node.value)
        sizes = [self._sizes[c] for c in children]
        self._sizes[node] = (1 + sum(s for s, _ in sizes), 1 + max((d for _, d in sizes), default=0))

    def _check_scalar(self, node: Any) -> None:
        tag = node.tag.removeprefix(_TAG)
        if "\0" in node.value:
            self._refuse(node.start_mark, "a value holds a NUL character (\\0), which no name or path may hold")
        if tag not in ("int", "float", "bool", "timestamp"):
            return
        if tag == "int" and len(node.value) > 40:
            self._refuse(node.start_mark, f"integer of {len(node.value)} characters is far beyond 64 bits")
        try:
            value = getattr(self, f"construct_yaml_{tag}")(node)
        except (ValueError, KeyError, TypeError, OverflowError, AttributeError) as exc:
            self._refuse(node.start_mark, f"{quoted(node.value, 60)} cannot be read as {_TYPE_NAMES[tag]} "
                         f"({cut(str(exc), 100)})")
        if tag == "float" and not math.isfinite(value):
            self._refuse(node.start_mark, f"{quoted(node.value, 60)} is not a finite number (NaN and infinity "
                         f"are never valid recipe values); give a number")
        if tag == "int" and abs(value) >= MAX_INT:
            self._refuse(node.start_mark, f"integer {cut(node.value, 40)} is beyond 64 bits; give a smaller number")


def load_yaml(text: str, name: str, located: bool = True) -> tuple[Any, yaml.Node | None]:
    """YAML text as Python data and its node tree, through the bounded loader (see `_Loader`).
    `name` heads messages: a file name, or e.g. "--set 'ta.params.lambda=...'" (with `located`
    false: no line, column or key path inside the text)."""
    loader = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except _Refused as exc:
        at = f":{exc.mark.line + 1}" if exc.mark is not None and located else ""
        path = f" {key_path(exc.path)}:" if exc.path and located else ""
        raise RecipeError(f"{name}{at}:{path} {exc.problem}.")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark and located else ""
        problem = " ".join(str(exc.problem or exc).split())
        if exc.context:  # e.g. "expected a single document in the stream" / "but found another document"
            other = exc.context_mark
            seen = f" (line {other.line + 1})" if other and mark and other.line != mark.line and located else ""
            problem = f"{' '.join(exc.context.split())}{seen}, {problem}"
        source_line = text.split("\n")[mark.line] if mark and mark.line < text.count("\n") + 1 else ""
        if "\\t" in problem or "\t" in source_line:
            problem += " (YAML indents with spaces, never tabs)"
        raise RecipeError(f"{name}{at}: malformed YAML: {cut(problem, 300)}.")
    except yaml.reader.ReaderError as exc:
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        at = text.find(char) if char else -1  # libyaml counts bytes, PyYAML characters: find the character
        line = f":{text.count(chr(10), 0, at if at >= 0 else exc.position) + 1}" if located else ""
        raise RecipeError(f"{name}{line}: malformed YAML: character {char!r} is not allowed in YAML text "
                          f"({exc.reason}); remove it.")
    except yaml.YAMLError as exc:
        raise RecipeError(f"{name}: malformed YAML: {cut(' '.join(str(exc).split()), 300)}.")
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:  # a constructor's
        raise RecipeError(f"{name}: malformed YAML: a value cannot be read ({cut(str(exc), 200)}).")
    finally:
        if loader is not None:
            loader.dispose()
    return data, root


def parse_yaml(text: str, file: Path | None) -> tuple[Any, LineIndex]:
    name = str(file) if file else "<recipe>"
    data, root = load_yaml(text, name)
    if data is None and root is not None and root.value != "":
        raise RecipeError(f"{name}:{root.start_mark.line + 1}: the recipe is null, not a mapping; a recipe is a YAML "
                          f"mapping with at least 'base', 'models' and 'steps'.")
    if data is None:
        raise RecipeError(f"{name}: the recipe is empty (or holds only comments); a recipe is a YAML mapping "
                          f"with at least 'base', 'models' and 'steps'.")
    if not isinstance(data, dict):
        what = {list: "a list", str: "a single string"}.get(type(data), f"a single {type(data).__name__} value")
        raise RecipeError(f"{name}:{root.start_mark.line + 1}: the recipe is {what}, not a mapping; a recipe is a "
                          f"YAML mapping with at least 'base', 'models' and 'steps' (key: value lines).")
    return data, LineIndex(file, root)
