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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

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


DEFAULT_PARTITION = (0.8, 0.1, 0.1)  # shares of train_split, validation_split, test_split of a single file


class DataSpec(Strict):
    """A task's labelled data: local csv/json/jsonl/parquet files or a hub dataset id.

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
                raise ValueError(f"split '{split}' is none of this entry's split names ({', '.join(map(str, names))}); "
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
                where, local = recipe.where("data", name, "splits", split), recipe.resolve(file)
                if not local.is_file():
                    what = "is a directory; name one csv/json/jsonl/parquet file" if local.is_dir() else "does not exist"
                    raise FmergeError(f"{where}: data file {local} {what}.")
                if local.suffix.lower() not in _BUILDERS:
                    raise FmergeError(f"{where}: data file {local} has extension '{local.suffix}', which fmerge "
                                      f"cannot read; use one of {', '.join(sorted(_BUILDERS))}.")
                if local.resolve() in seen:
                    raise FmergeError(f"{where}: names the same file as splits.{seen[local.resolve()]} ({local}), so "
                                      f"both splits would hold the same rows; give each split its own file, or give "
                                      f"the one file as 'path' to have it partitioned.")
                seen[local.resolve()] = split
            return
        local = recipe.resolve(self.path)
        if not local.exists() and not recipe.is_hub_id(self.path):
            raise FmergeError(f"{recipe.where('data', name, 'path')}: data file {local} does not exist.")
        if not local.is_file():
            if self.partition is not None or "partition_seed" in self.model_fields_set:
                key = "partition" if self.partition is not None else "partition_seed"
                what = "a directory" if local.is_dir() else "a hub dataset"
                raise FmergeError(f"{recipe.where('data', name, key)}: a partition cuts a single data file, but "
                                  f"path '{self.path}' is {what}, whose splits come with it; remove '{key}'.")
            return
        if self.partition is None:
            keys = ("train_split", "validation_split", "test_split")
            for i, key in enumerate(keys):
                for other in keys[:i]:
                    if getattr(self, key) == getattr(self, other):
                        raise FmergeError(
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
                raise FmergeError(f"{recipe.where('data', name, 'splits')}: data '{name}' names no file for split "
                                  f"'{split}' (it names {', '.join(self.splits)}); add '{split}: FILE' to its "
                                  f"splits, or use one of those.")
            return ("file", str(recipe.resolve(self.splits[split]).resolve()))
        file = self.single_file(recipe)
        if file is not None:
            partition = self.partition_for(recipe)
            if split not in partition:
                raise FmergeError(f"{recipe.where('data', name, 'partition')}: data '{name}' is one file "
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
    base: str | ModelSpec
    models: dict[str, str | ModelSpec] = Field(min_length=1)
    data: dict[str, DataSpec] = {}
    exclude: list[str] = Field([], description="regexes of tensor names never merged (taken from base)")
    heads: list[str] = Field(DEFAULT_HEADS, description="regexes of per-task head tensors, never averaged")
    missing_tensors: Literal["error", "base"] = Field(
        "error", description="a floating-point tensor of the base that some model lacks: 'error' (default) "
        "refuses to merge; 'base' takes the base's value for it, unmerged, and lists it in the artifact "
        "and the exported model card")
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

    def __init__(self, spec: RecipeSpec, file: Path | None, steps: dict[str, BaseModel], lines: "LineIndex",
                 kinds: typing.Mapping[str, Any]):
        self.spec, self.file, self.steps, self.lines = spec, file, steps, lines
        self.kinds = kinds  # the step-kind registry this recipe was validated against (fmerge.graph)
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
