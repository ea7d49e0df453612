"""The Python API: what the CLI does, as functions with typed results (docs/api.md).

    import fmerge
    merged = fmerge.merge("task_arithmetic", ["ft/a", "ft/b"], base="base", params={"lambda": 0.3})
    weights = dict(merged.tensors())              # or merged.tensors()[name], read when asked for
    rows = fmerge.run("recipe.yaml").rows()       # eval tables as rows

`fmerge merge`, `fmerge fisher` and `fmerge eval` build their one-step recipes with
`merge_recipe`, `fisher_recipe` and `eval_recipe` below and run them through the same executor, so
a merge made here and one made on the command line share their key and their cache. Every mistake raises the FmergeError subtype
the CLI prints (RecipeError, DataError, ModelError, StoreError, ExportError); nothing here exits.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from . import executor, graph
from .compat import DEFAULT_MAX_LENGTH
from .errors import RecipeError, StoreError, quoted
from .executor import StepReport
from .recipe import Recipe
from .runtime import Runtime
from .steps import step_kinds
from .store import STORE_MARKER, ArtifactView, Store

PathLike = str | os.PathLike
OnReport = Callable[[StepReport], None]


def load_recipe(file: Path | str, sets: list[str] | None = None) -> Recipe:
    """A validated recipe, with every registered step kind."""
    return graph.load_recipe(file, step_kinds(), sets)


def parse_recipe(text: str, file: Path | None = None, sets: list[str] | None = None) -> Recipe:
    """A validated recipe from YAML text (paths relative to `file`'s directory, or the cwd)."""
    return graph.parse_recipe(text, step_kinds(), file, sets)


def runtime(recipe: Recipe, store: Store | PathLike | None = None, device: str | None = None,
            create: bool = True, console: Console | None = None) -> Runtime:
    """The recipe bound to a store: `store`, else the one `store_root` finds for the recipe."""
    if not isinstance(store, Store):
        store = open_store(store, recipe, create=create, missing_ok=not create)
    return Runtime(recipe, store, console, device)


def open_store(store: PathLike | None, recipe: Recipe | None = None, create: bool = False,
               missing_ok: bool = False) -> Store:
    """The store at `store_root(store, recipe)`. Only a writing command (`create`: run, merge,
    fisher) may create one; every other command opens an existing store and creates nothing
    (`missing_ok`: a missing one reads as empty)."""
    root = store_root(store, recipe)
    return Store.create_or_open(root) if create else Store.open_existing(root, missing_ok=missing_ok)


STORE_DIR = "artifacts"  # the name a store is looked for and created under when none is named


def store_root(store: PathLike | None, recipe: Recipe | None = None) -> Path:
    """Where the store is, without opening it (README, "The store"): `store` (--store), else the
    recipe's `store:` (relative to the recipe), else $FMERGE_STORE, else found as git finds `.git`,
    so that every working directory sees one store per recipe: upward from the recipe's directory
    (without a recipe: the working directory), the first `artifacts/` holding the store marker, up
    to the top of the git repository there; none found, `artifacts/` at that top (beside `.git`),
    or outside a repository in the directory the search began in. An `artifacts/` without the
    marker is passed over by the search, never adopted: where one stands at the place a store is
    to be created, the store's own rules apply (an empty directory or an earlier fmerge's layout
    becomes the store, anything else is refused)."""
    if store:
        return Path(store)
    if recipe is not None and recipe.spec.store:
        return recipe.resolve(recipe.spec.store)
    if os.environ.get("FMERGE_STORE"):
        return Path(os.environ["FMERGE_STORE"])
    start = Path(os.path.abspath(recipe.dir if recipe is not None else Path.cwd()))
    for folder in (start, *start.parents):
        if _is_file(folder / STORE_DIR / STORE_MARKER) or os.path.lexists(folder / ".git"):
            return folder / STORE_DIR
    return start / STORE_DIR


def _is_file(path: Path) -> bool:
    """Whether `path` is a regular file; a path that cannot be read (no permission, a loop) is not."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


# ---- results ---------------------------------------------------------------------------------

class Tensors(Mapping):
    """An artifact's tensors by name, each read from the store (its checksum checked) only when
    asked for, so a large merge is never loaded whole by accident; `dict(tensors)` reads them all."""

    def __init__(self, view: ArtifactView):
        self._view = view
        self._names = view.names()
        self._known = set(self._names)

    def __getitem__(self, name: str):
        return self._view.get(self._known_name(name))

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading it."""
        return self._view.shape(self._known_name(name))

    def dtype(self, name: str):
        """A tensor's torch dtype, without reading it."""
        return self._view.dtype(self._known_name(name))

    def _known_name(self, name: str) -> str:
        if name not in self._known:
            raise KeyError(name)
        return name

    def __repr__(self) -> str:
        return f"<Tensors: {len(self._names)} tensors in artifact {self._view.artifact.key[:12]}>"


@dataclass(frozen=True)
class MergeResult:
    """One merge: its artifact `key`, whether the store already held it (`cached`: nothing was
    computed), the exported directory `out` (when asked for) and its merged tensors."""

    key: str
    cached: bool
    out: Path | None
    report: StepReport
    store: Store = field(repr=False)

    def tensors(self) -> Tensors:
        """The merged tensors under the base model's names, read lazily from the store."""
        return Tensors(self.store.open(self.key).view("weights/"))


@dataclass(frozen=True)
class FisherResult:
    """One model's diagonal Fisher: its artifact `key`, the `model` name, whether the store already
    held it (`cached`), the exported `.safetensors` file (when asked for), and the diagonal."""

    key: str
    model: str
    cached: bool
    export: Path | None
    report: StepReport
    store: Store = field(repr=False)

    @property
    def meta(self) -> dict:
        """What the store recorded: estimator, examples, count, count_unit, extended_from, fisher_mean."""
        return self.store.open(self.key).meta

    @property
    def estimator(self) -> str:
        return self.meta["estimator"]

    @property
    def examples(self) -> int:
        return self.meta["examples"]

    @property
    def fisher_mean(self) -> float:
        """The mean of the diagonal over every parameter (a quick sanity figure)."""
        return self.meta["fisher_mean"]

    @property
    def extended_from(self) -> int:
        """How many examples of a cached smaller estimate this one extended (0: computed afresh)."""
        return self.meta.get("extended_from") or 0

    def diagonal(self) -> Tensors:
        """The mean diagonal, one tensor per parameter under the model's own names, read lazily."""
        return Tensors(self.store.open(self.key).view("fisher/"))


@dataclass(frozen=True)
class RunResult:
    """What a recipe run did: one report per step (`steps`), each eval step's result rows
    (`results`: eval step -> rows) and sweep summaries (`sweeps`), and the store it used."""

    steps: list[StepReport]
    results: dict[str, list[dict]]
    sweeps: dict[str, list[dict]]
    store: Store = field(repr=False)

    def step(self, name: str) -> StepReport:
        """The report of step `name` (state, keys, seconds, note)."""
        for report in self.steps:
            if report.step == name:
                return report
        raise RecipeError(f"This run has no step {quoted(name)}; its steps are "
                          f"{', '.join(r.step for r in self.steps) or 'none'}.")

    def rows(self) -> list[dict]:
        """Every eval result as one flat row (variant, task, split, accuracy, macro_f1, n,
        selected_on, ...), `step` naming this recipe's eval step: ready for a DataFrame."""
        return [{**row, "step": step} for step, rows in self.results.items() for row in rows]

    def merged(self, step: str) -> Tensors:
        """The weights a model-producing step made (merge, frank_wolfe, adamerging, finetune, ...),
        read lazily; a dry run computed none."""
        report = self.step(step)
        weights = None
        if len(report.keys) == 1:
            if not self.store.has(report.keys[0]):
                raise StoreError(f"Step {quoted(step)}'s artifact {report.keys[0][:12]} is not in store "
                                 f"{self.store.root} (a dry run computes nothing); run without dry_run first.")
            weights = Tensors(self.store.open(report.keys[0]).view("weights/"))
        if not weights:
            raise RecipeError(f"Step {quoted(step)} ({report.kind}) made no model weights; merged() takes a step "
                              f"that makes one model, e.g. a merge step.")
        return weights


@dataclass(frozen=True)
class StatusResult:
    """Which steps are cached and which would run (`steps`, states 'cached' or 'stale')."""

    steps: list[StepReport]
    store: Store = field(repr=False)

    @property
    def stale(self) -> list[str]:
        """The steps a run would compute."""
        return [r.step for r in self.steps if r.state != "cached"]

    @property
    def cached(self) -> bool:
        """Whether a run would compute nothing."""
        return not self.stale


# ---- recipes and stores --------------------------------------------------------------------------

def run(recipe: Recipe | PathLike, store: Store | PathLike | None = None, sets: list[str] | None = None,
        only: str | list[str] | None = None, force: str | list[str] | None = None, dry_run: bool = False,
        device: str | None = None, allow_pickle: bool = False, console: Console | None = None,
        on_report: OnReport | None = None) -> RunResult:
    """Run a recipe (a file, or a Recipe from `load_recipe`), reusing every cached artifact.
    `sets` are `STEP.PARAM=VALUE` overrides as `--set` takes them; `only`/`force` name steps."""
    recipe = _as_recipe(recipe, sets)
    rt = runtime(recipe, store, _checked_device(device), console=console)
    if allow_pickle:
        rt.recipe.spec.allow_pickle = True
    reports = executor.run(rt, _step_list(only), _step_list(force), dry_run, on_report)
    return RunResult(reports, rt.results, rt.sweep_results, rt.store)


def status(recipe: Recipe | PathLike, store: Store | PathLike | None = None, sets: list[str] | None = None,
           only: str | list[str] | None = None) -> StatusResult:
    """Which steps are cached and which would run; creates, writes and computes nothing."""
    rt = runtime(_as_recipe(recipe, sets), store, create=False)
    return StatusResult(executor.status(rt, _step_list(only)), rt.store)


def _as_recipe(recipe: Recipe | PathLike, sets: list[str] | None) -> Recipe:
    if isinstance(recipe, Recipe):
        if sets:
            raise RecipeError("sets= overrides a recipe as it is read, but this recipe is already parsed; pass its "
                              "path instead (fmerge.run('recipe.yaml', sets=[...])) or load it with "
                              "fmerge.api.load_recipe(path, sets).")
        return recipe
    if not isinstance(recipe, (str, os.PathLike)):
        raise RecipeError(f"recipe= takes a recipe file's path or a Recipe from fmerge.api.load_recipe, "
                          f"not {type(recipe).__name__}.")
    if isinstance(sets, str):
        raise RecipeError(f"sets= takes a list of STEP.PARAM=VALUE strings, e.g. sets=[{sets!r}], not one string.")
    return load_recipe(recipe, sets)


def _step_list(steps: str | list[str] | None) -> list[str] | None:
    """One step name or several (a lone string is one name, never its letters)."""
    if isinstance(steps, str):
        return [steps]
    return list(steps) if steps else None


def _checked_device(device: str | None) -> str | None:
    """`device=` checked before anything is read or created (a typo never fails a run halfway)."""
    if device is None:
        return None
    from .distributed import check_device

    return check_device(device, "device")


# ---- direct merges and Fishers (what `fmerge merge` and `fmerge fisher` run) ---------------------

def merge(method: str, models: Sequence[PathLike] | Mapping[str, PathLike], base: PathLike | None = None,
          params: Mapping[str, Any] | None = None, out: PathLike | None = None, out_dtype: str | None = None,
          store: Store | PathLike | None = None, device: str | None = None, allow_pickle: bool = False,
          out_shard_size: str | int | None = None, console: Console | None = None,
          on_report: OnReport | None = None) -> MergeResult:
    """Merge model directories with a registered method (`fmerge methods`), cached in the store,
    and export the result to `out` as a Hugging Face directory when it is given."""
    device = _checked_device(device)
    recipe = merge_recipe(method, models, base, params, out, out_dtype, allow_pickle, out_shard_size=out_shard_size)
    rt = runtime(recipe, store, device, console=console)
    (report,) = executor.run(rt, on_report=on_report)
    export = rt.recipe.steps["merge"].export
    return MergeResult(report.keys[0], report.state == "cached", Path(export) if export else None, report, rt.store)


def merge_recipe(method: str, models: Sequence[PathLike] | Mapping[str, PathLike], base: PathLike | None = None,
                 params: Mapping[str, Any] | None = None, out: PathLike | None = None, out_dtype: str | None = None,
                 allow_pickle: bool = False, base_hint: str = "pass base=DIR",
                 out_shard_size: str | int | None = None) -> Recipe:
    """The one-step recipe of a direct merge (`fmerge merge` passes base_hint='add --base DIR').
    Models without names are named after their directories; without `base` the first model is the
    reference for tensor names and copied tensors, which only methods that need no base accept."""
    import yaml

    names = model_names(models)
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise RecipeError(f"params= takes a mapping of the method's parameters, e.g. params={{'lambda': 0.3}}, "
                          f"not {type(params).__name__}.")
    step = {"kind": "merge", "method": method, "params": dict(params)}
    if out is not None:
        step["export"] = os.path.abspath(out)
    if out_dtype:
        step["out_dtype"] = out_dtype
    if out_shard_size is not None:
        step["out_shard_size"] = out_shard_size
    recipe = {"base": str(_resolved(Path(base if base is not None else next(iter(names.values()))))),
              "models": names, "allow_pickle": allow_pickle, "steps": {"merge": step}}
    if base is None:
        from .methods import get_method

        if get_method(method).needs_base:
            raise RecipeError(f"Method '{method}' needs the base model: {base_hint}.")
    return parse_recipe(yaml.safe_dump(recipe, sort_keys=False), None)  # models in the order given


def fisher(model: PathLike, data: PathLike, estimator: str = "exact", examples: int = 256, split: str = "train",
           text_column: str = "text", text_pair_column: str | None = None, label_column: str | None = "label",
           label_names: Sequence[str] | None = None, samples: int = 1, batch_size: int = 32, chunk_size: int = 32,
           max_length: int = DEFAULT_MAX_LENGTH, seed: int = 0, export: PathLike | None = None,
           store: Store | PathLike | None = None, device: str | None = None, allow_pickle: bool = False,
           console: Console | None = None, on_report: OnReport | None = None) -> FisherResult:
    """A classifier's diagonal Fisher on its task data (a csv/json/jsonl/parquet file, a directory of
    split files, or a hub id), on a seeded subset of `examples` rows; cached, and a later call with
    more examples extends the cached estimate. `export`: also write it to this .safetensors file."""
    if not isinstance(model, (str, os.PathLike)):
        raise RecipeError(f"model= takes one model directory (fisher_many takes several), not "
                          f"{type(model).__name__}.")
    (result,) = fisher_many([model], data, estimator, examples, split, text_column, text_pair_column, label_column,
                            label_names, samples, batch_size, chunk_size, max_length, seed, export, store, device,
                            allow_pickle, console, on_report)
    return result


def fisher_many(models: Sequence[PathLike] | Mapping[str, PathLike], data: PathLike, estimator: str = "exact",
                examples: int = 256, split: str = "train", text_column: str = "text",
                text_pair_column: str | None = None, label_column: str | None = "label",
                label_names: Sequence[str] | None = None, samples: int = 1, batch_size: int = 32,
                chunk_size: int = 32, max_length: int = DEFAULT_MAX_LENGTH, seed: int = 0, export: PathLike | None = None,
                store: Store | PathLike | None = None, device: str | None = None, allow_pickle: bool = False,
                console: Console | None = None, on_report: OnReport | None = None) -> list[FisherResult]:
    """The Fisher diagonals of several classifiers on the same data, one result each, in order.
    `export` is a .safetensors file for one model, else a directory of <model>.safetensors."""
    device = _checked_device(device)
    recipe = fisher_recipe(models, data, estimator, examples, split, text_column, text_pair_column, label_column,
                           label_names, samples, batch_size, chunk_size, max_length, seed, export, allow_pickle)
    rt = runtime(recipe, store, device, console=console)
    (report,) = executor.run(rt, on_report=on_report)
    order = list(model_names(models))  # the recipe lists models by name; results come in the order given
    planned = sorted(rt.planned["fisher"], key=lambda p: order.index(p.label))
    target = Path(export).absolute() if export is not None else None
    single = target is not None and len(planned) == 1 and target.suffix == ".safetensors"
    return [FisherResult(p.key, p.label, report.state == "cached",
                         None if target is None else target if single else target / f"{p.label}.safetensors",
                         report, rt.store) for p in planned]


def fisher_recipe(models: Sequence[PathLike] | Mapping[str, PathLike], data: PathLike, estimator: str = "exact",
                  examples: int = 256, split: str = "train", text_column: str = "text",
                  text_pair_column: str | None = None, label_column: str | None = "label",
                  label_names: Sequence[str] | None = None, samples: int = 1, batch_size: int = 32,
                  chunk_size: int = 32, max_length: int = DEFAULT_MAX_LENGTH, seed: int = 0, export: PathLike | None = None,
                  allow_pickle: bool = False) -> Recipe:
    """The one-step recipe of a direct Fisher estimate (`fmerge fisher` runs it too): every model
    on the same data entry; a data file is read whole as `split`, a directory or hub id by splits."""
    import yaml

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:  # the generators take no negative seed
        raise RecipeError(f"seed={seed!r}: a seed is a whole number from 0 up; use e.g. seed=0.")
    names = model_names(models)
    step = {"kind": "fisher", "estimator": estimator, "examples": examples, "samples": samples, "split": split,
            "batch_size": batch_size, "chunk_size": chunk_size, "max_length": max_length, "seed": seed}
    if export is not None:
        step["export"] = os.path.abspath(export)  # not resolved: a link or loop there is the export's to refuse
    if not isinstance(data, (str, os.PathLike)):
        raise RecipeError(f"data= takes a data file, a directory of split files or a hub dataset id, "
                          f"not {type(data).__name__}.")
    if not str(data):
        raise RecipeError("The task data is named by an empty string (it would read the working directory); give a "
                          "data file, a directory of split files or a hub dataset id.")
    local = Path(data)
    source = str(local.resolve()) if local.exists() else str(data)
    spec = {**({"splits": {split: source}} if local.is_file() else {"path": source}), "text": text_column,
            "text_pair": text_pair_column, "label": label_column or None, "train_split": split}
    if label_names is not None:
        spec["label_names"] = checked_label_names(label_names, label_column)
    recipe = {"base": next(iter(names.values())), "allow_pickle": allow_pickle,
              "models": {n: {"path": p, "data": "task"} for n, p in names.items()},
              "data": {"task": spec}, "steps": {"fisher": step}}
    return parse_recipe(yaml.safe_dump(recipe), None)


# How the API's and the CLI's messages name the label names, the label column and an example.
LABEL_NAMES_WORDS = {"api": ("label_names", "the label column", "label_names=['neg', 'neu', 'pos']"),
                     "cli": ("--label-names", "--label-column", "--label-names neg,neu,pos")}


def checked_label_names(names: Sequence[str], label_column: str | None, given: str | None = None,
                        words: str = "api") -> list[str]:
    """label_names as a list, refusing what cannot map labels to head indices; messages quote
    `given` (default: the names) in the API's or the CLI's words (LABEL_NAMES_WORDS)."""
    option, column, example = LABEL_NAMES_WORDS[words]
    shown = given or f"{option}={quoted(names, 80)}"
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise RecipeError(f"{shown}: give the class names in head order as a list of strings, e.g. {example}.")
    names = list(names)
    if not label_column:
        raise RecipeError(f"{option} maps the label column's strings to head indices, but {column} is empty "
                          f"(unlabelled data); give the label column, or drop {option}.")
    if any(not n.strip() for n in names):
        raise RecipeError(f"{shown} has an empty name; give the class names in head order, e.g. {example}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RecipeError(f"{shown} names {', '.join(map(repr, repeated[:5]))} more than once; each class name "
                          f"must map to one head index.")
    return names


def model_names(models: Sequence[PathLike] | Mapping[str, PathLike]) -> dict[str, str]:
    """Models as {name: absolute path}: named as given, else after their directories (made unique)."""
    if isinstance(models, (str, os.PathLike)):
        raise RecipeError(f"models= takes a list of model directories (or a {{name: directory}} mapping), not one "
                          f"path: write models=[{str(models)!r}].")
    if isinstance(models, Mapping):
        given = {str(name): path for name, path in models.items()}
    else:
        given = {}
        for path in models:
            if not isinstance(path, (str, os.PathLike)):
                raise RecipeError(f"models= holds {quoted(path, 60)}, which is not a model directory's path.")
            name = _resolved(Path(path)).name or "model"
            while name in given:
                name += "_"
            given[name] = path
    if not given:
        raise RecipeError("models= is empty: give at least one fine-tuned model directory.")
    return {name: str(_resolved(Path(path))) for name, path in given.items()}


def _resolved(path: Path) -> Path:
    """`path` resolved, or made absolute where it cannot be (a symbolic link loop: refused later, by name)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


# ---- evaluation (what `fmerge eval` runs) --------------------------------------------------------

EVAL_TASKS = ("classification", "causal_lm", "multiple_choice")
METRIC_NAMES = ("accuracy", "macro_f1", "acc", "acc_norm", "loss", "perplexity", "tokens")


@dataclass(frozen=True)
class TaskScores:
    """One task's figures: `metrics` holds accuracy and macro_f1 (classification), loss,
    perplexity and tokens (causal_lm), acc, acc_norm and accuracy (= acc, multiple_choice), or
    lm-evaluation-harness's own metrics (kind 'lm-eval', not cached by fmerge: `key` None)."""

    task: str
    kind: str
    split: str | None
    n: int | None
    metrics: dict[str, float]
    key: str | None


@dataclass(frozen=True)
class EvalResult:
    """An evaluation of one model: its name, whether the store already held every figure
    (`cached`), one TaskScores per task, and where results.json / results.csv went (`output`)."""

    model: str
    cached: bool
    scores: list[TaskScores]
    output: Path | None
    report: StepReport | None
    store: Store = field(repr=False)

    def as_json(self) -> dict:
        return {"model": self.model, "cached": self.cached, "store": str(self.store.root),
                "output": str(self.output) if self.output else None,
                "steps": [self.report.as_json()] if self.report else [],
                "scores": [vars(s) for s in self.scores]}


def evaluate(model: PathLike, data: PathLike | None = None, task: str | None = None, split: str = "test",
             limit: int | None = None, text_column: str = "text", text_pair_column: str | None = None,
             label_column: str | None = "label", prompt_column: str | None = None, choices_column: str | None = None,
             label_names: Sequence[str] | None = None, head: PathLike | None = None, like: PathLike | None = None,
             batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH, seed: int = 0, lm_eval: Sequence[str] | None = None,
             output: PathLike | None = None, store: Store | PathLike | None = None, device: str | None = None,
             allow_pickle: bool = False, console: Console | None = None,
             on_report: OnReport | None = None) -> EvalResult:
    """Evaluate a model directory, a merge in the store (its key, or a unique prefix) or a hub id on
    `data` (a file read whole as `split`, a directory of split files, or a hub dataset), cached
    like every step. `task`: classification (through the model's head, or `head`, a .safetensors
    file of head tensors), causal_lm (per-token loss and perplexity over `text_column`, the tokens
    of `prompt_column` not scored) or multiple_choice (`text_column` the context, `choices_column`
    the choices, `label_column` the answer's index); default: multiple_choice when
    `choices_column` is given, else from the model's config. A merge is run with the config,
    tokenizer and head of `like` (default: the base model its recipe names). `lm_eval`: also run
    these lm-evaluation-harness tasks (it must be installed) on a model directory or hub id."""
    device = _checked_device(device)
    if task is not None and task not in EVAL_TASKS:
        raise RecipeError(f"task={quoted(task, 60)} is no evaluation task; give one of {', '.join(EVAL_TASKS)}.")
    if lm_eval:
        _check_lm_eval_installed()
    if data is None and not lm_eval:
        raise RecipeError("Nothing to evaluate on: give the task data (--data FILE_OR_DIR, a hub dataset id), or "
                          "lm-evaluation-harness tasks (--lm-eval TASKS).")
    if not isinstance(store, Store):
        store = open_store(store, create=True)
    path, key, name = _eval_model(model, like, store)
    if lm_eval and key is not None:
        raise RecipeError(f"lm-evaluation-harness reads a model directory, but {model} is a merge in the store; export "
                          f"it first (fmerge merge --out DIR, or a merge step's export) and evaluate that directory.")
    scores, report, out = [], None, None
    if data is not None:
        recipe = eval_recipe(path, key, data, task, split, limit, text_column, text_pair_column, label_column,
                             prompt_column, choices_column, label_names, head, batch_size, max_length, seed,
                             allow_pickle)
        rt = runtime(recipe, store, device, console=console)
        (report,) = executor.run(rt, on_report=on_report)
        planned = {p.extra["task"]: p for p in rt.planned["eval"]}
        data_name = Path(str(data)).stem if Path(str(data)).exists() else str(data)
        rows = []
        for row in rt.results.get("eval", []):  # under torchrun only rank 0 gathers the results
            p = planned[row["task"]]
            metrics = {m: row[m] for m in METRIC_NAMES if row.get(m) is not None}
            scores.append(TaskScores(data_name, row.get("task_kind", "classification"), row["split"], row.get("n"),
                                     metrics, p.key))
            content = p.inputs["data"]["content"]
            rows.append({"model": str(model), "model_key": p.inputs["weights"].removeprefix("model:"),
                         "data": str(data), "data_hash": content.get(row["split"]) if isinstance(content, dict)
                         else content, "split": row["split"], "task_kind": row.get("task_kind", "classification"),
                         "metric": row.get("metric"), **metrics, "n": row.get("n"), "eval_key": p.key})
        if output is not None and rows:
            out = _resolved(Path(output))
            write_eval_rows(store, out, rows)
    if lm_eval:
        scores += lm_eval_scores(path, list(lm_eval), limit, device, batch_size)
    return EvalResult(name, report is not None and report.state == "cached", scores, out, report, store)


EVAL_COLUMNS = ("model", "model_key", "data", "data_hash", "split", "task_kind", "metric", *METRIC_NAMES, "n",
                "eval_key")


def write_eval_rows(store: Store, out: Path, rows: list[dict]) -> None:
    """Add `rows` to `out/results.json` and `out/results.csv`, the table of every evaluation
    written there: each row names the model (as given, and its content hash or merge key), the
    data (as given, and its content hash), the split, the metric and the eval's key; a row of the
    same evaluation of the same model name is replaced, every other is kept. Files fmerge did not write are refused."""
    import csv
    import io
    import json

    from .export import read_output, write_outputs

    earlier = read_output(out, "results.json")
    try:
        kept = [r for r in json.loads(earlier or b"[]") if isinstance(r, dict)]
    except ValueError:
        kept = []
    new = {(r["model"], r["eval_key"]) for r in rows}
    table = [*[r for r in kept if (r.get("model"), r.get("eval_key")) not in new], *rows]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=[c for c in EVAL_COLUMNS if any(c in r for r in table)], extrasaction="ignore")
    w.writeheader()
    w.writerows(table)
    write_outputs(store, out, {"results.json": json.dumps(table, indent=2).encode(),
                               "results.csv": text.getvalue().encode()}, {}, False, f"--output {out}")


def eval_recipe(path: str, key: str | None, data: PathLike, task: str | None, split: str,
                limit: int | None, text_column: str, text_pair_column: str | None, label_column: str | None,
                prompt_column: str | None, choices_column: str | None, label_names: Sequence[str] | None,
                head: PathLike | None, batch_size: int, max_length: int, seed: int, allow_pickle: bool) -> Recipe:
    """The one-step recipe of `fmerge eval`: the model (or, for a merge, the model lending it
    config, tokenizer and head) with one data entry, and an eval step of it alone."""
    import yaml

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RecipeError(f"seed={seed!r}: a seed is a whole number from 0 up; use e.g. seed=0.")
    if not str(data):
        raise RecipeError("The evaluation data is named by an empty string; give a data file, a directory of split "
                          "files or a hub dataset id.")
    if task == "multiple_choice" and choices_column is None:
        choices_column = "choices"
    if choices_column is not None and task is None:  # said or implied alike: one cache key
        task = "multiple_choice"
    local = Path(data)
    source = str(local.resolve()) if local.exists() else str(data)
    spec = {**({"splits": {split: source}} if local.is_file() else {"path": source}), "test_split": split,
            "text": text_column, "text_pair": text_pair_column, "label": label_column or None, "task": task,
            "prompt": prompt_column, "choices": choices_column}
    if label_names is not None:
        spec["label_names"] = checked_label_names(label_names, label_column)
    step = {"kind": "eval", "base": False, "individual": key is None, "artifacts": [key] if key else [],
            "split": split, "limit": limit, "batch_size": batch_size, "max_length": max_length, "seed": seed}
    if head is not None:
        step["head_file"] = os.path.abspath(head)
    recipe = {"base": path, "allow_pickle": allow_pickle, "models": {"model": {"path": path, "data": "task"}},
              "data": {"task": {k: v for k, v in spec.items() if v is not None}}, "steps": {"eval": step}}
    return parse_recipe(yaml.safe_dump(recipe), None)


def _eval_model(model: PathLike, like: PathLike | None, store: Store) -> tuple[str, str | None, str]:
    """(model path or hub id for the recipe, merge key or None, display name) of `fmerge eval MODEL`:
    a local directory, a merge artifact's key (or unique prefix) in `store`, else a hub id."""
    from .store import HEX_RE

    text = str(model)
    local = Path(text).expanduser()
    is_key = not local.exists() and HEX_RE.match(text) is not None and len(text) >= 6
    if like is not None and not is_key:
        raise RecipeError(f"--like (like=) lends a merge in the store its config, tokenizer and head, but {text} is "
                          f"no merge's key (a model directory or hub id brings its own); leave --like out.")
    if local.exists():
        if not local.is_dir():
            raise RecipeError(f"{text} is a file, not a model directory; give a directory holding config.json and "
                              f"the weights, a merge's key in the store, or a hub id.")
        return str(_resolved(local)), None, _resolved(local).name or "model"
    if is_key:
        art = store.open(text)
        if art.kind != "merge":
            raise RecipeError(f"Artifact {art.key[:12]} in store {store.root} is of kind '{art.kind}', not a merge; "
                              f"fmerge eval takes a merge's key, a model directory or a hub id.")
        return _lender(art, like), art.key, f"merge {art.key[:12]}"
    return text, None, text.rstrip("/").split("/")[-1]


def _lender(art, like: PathLike | None) -> str:
    """The model directory whose config, tokenizer and head run a merge: `like`, else the base
    model of the recipe recorded with the merge (when it is a local directory that still exists)."""
    if like is not None:
        if not Path(like).is_dir():
            raise RecipeError(f"--like {like} is not a directory; give the model directory whose config, tokenizer "
                              f"and head the merge should run with (e.g. its base or one of its fine-tuned models).")
        return str(_resolved(Path(like)))
    recorded = art.attrs.get("recipe") or {}
    base = (recorded.get("spec") or {}).get("base")
    base = base.get("path") if isinstance(base, dict) else base
    if isinstance(base, str):
        folder = Path(recorded["file"]).parent if recorded.get("file") else Path.cwd()
        candidate = Path(base) if Path(base).is_absolute() else folder / base
        if candidate.is_dir():
            return str(_resolved(candidate))
    raise RecipeError(f"Merge {art.key[:12]} records no base model directory that still exists here ({base!r}), "
                      f"and a merge holds weights only; give --like DIR (like=), the model directory whose config, "
                      f"tokenizer and head it should run with.")


def _check_lm_eval_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError("--lm-eval runs lm-evaluation-harness tasks, but it is not installed in this environment; "
                          "install it with `pip install lm-eval` (its tasks download their datasets, so they need a "
                          "network or a filled Hugging Face cache), or leave --lm-eval out.")


def lm_eval_scores(model: str, tasks: list[str], limit: int | None, device: str | None,
                   batch_size: int) -> list[TaskScores]:
    """Scores of lm-evaluation-harness tasks on a model directory or hub id, as lm-eval computes
    them (its own prompts, caching and metrics; each metric's stderr left out)."""
    import lm_eval

    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model}, tasks=tasks, limit=limit,
                                  device=device or "cpu", batch_size=batch_size)
    scores = []
    for name, metrics in (out or {}).get("results", {}).items():
        values = {k.split(",")[0]: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and "stderr" not in k}
        scores.append(TaskScores(name, "lm-eval", None, limit, values, None))
    return scores
