"""A cache key holds every byte a step reads: for every step kind, each file a step opens while it
computes is in the store, in Python's or the system's own directories, or among the files whose
bytes entered that step's keys (`Runtime.key_files_of`, recorded while the step was planned).

Opens are seen through `sys.addaudithook`, only while the step's `compute` runs. A file a step
reads but its key lacks (a tokenizer, a config.json, a data file) fails the test by name."""

from __future__ import annotations

import site
import sys
import sysconfig
from pathlib import Path

import pytest

import _iterative_project as proj
from fmerge import executor
from fmerge.api import load_recipe
from fmerge.graph import kind_of
from fmerge.runtime import Runtime
from fmerge.steps import step_kinds
from fmerge.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_STEPS = """
  fisher: {kind: fisher, examples: 6, batch_size: 3, max_length: 16}
  gram: {kind: gram, examples: 6, batch_size: 3, max_length: 16}
  kfac: {kind: kfac, examples: 6, batch_size: 3, chunk_size: 3, max_length: 16}
  tv: {kind: task_vectors}
  fm: {kind: merge, method: fisher, fisher: fisher}
  rm: {kind: merge, method: regmean, gram: gram}
  ta: {kind: merge, method: task_arithmetic, params: {lambda: {sentiment: 0.3, animal: 0.4, color: 0.5}}}
  ada: {kind: adamerging, steps: 1, examples: 4, batch_size: 2, max_length: 16}
  fw: {kind: frank_wolfe, max_iters: 1, dataset_size: 4, max_length: 16}
  fws: {kind: frank_wolfe_soft, max_iters: 1, ada_iters: 1, dataset_size: 4, max_length: 16}
  stack: {kind: stack_layers, slices: [{model: sentiment, layers: [0, 1]}, {model: animal, layers: [1, 2]}]}
  ft: {kind: finetune, data: labelled, examples: 8, steps: 1, batch_size: 4, max_length: 16}
  ev: {kind: eval, merges: [fm, ada], base: true, limit: 6, max_length: 16}
"""

CLIP_RECIPE = """
base: base
store: store
data:
  colors: {path: data/colors, image: image, templates: ["a photo of a {}."]}
models:
  colors: {path: ft_colors, data: colors}
  shades: {path: ft_shades, data: colors}
steps:
  heads: {kind: zeroshot_head, models: [colors]}
  fisher: {kind: fisher, examples: 4, batch_size: 2, chunk_size: 2, models: [colors]}
  avg: {kind: merge, method: simple_average}
  ev: {kind: eval, merges: [avg], models: [colors], batch_size: 4}
"""

_opened: list[str] | None = None  # file names opened while a step computes, else None


def _audit(event: str, args) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(args[0].decode() if isinstance(args[0], bytes) else str(args[0]))


sys.addaudithook(_audit)


def text_project(root: Path) -> Path:
    proj.build(root)
    header = proj.HEADER.replace("data:\n", "data:\n  labelled: {path: data/sentiment, label_names: [pos, neg]}\n", 1)
    (root / "recipe.yaml").write_text(header + TEXT_STEPS)
    return root / "recipe.yaml"


def clip_project(root: Path) -> Path:
    from test_clip import save_base, save_finetuned, write_images

    base = save_base(root / "base")
    save_finetuned(root / "ft_colors", base, 1)
    save_finetuned(root / "ft_shades", base, 2)
    write_images(root / "data" / "colors", 3)
    (root / "recipe.yaml").write_text(CLIP_RECIPE)
    return root / "recipe.yaml"


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    recipes = [text_project(tmp_path_factory.mktemp("text")), clip_project(tmp_path_factory.mktemp("clip"))]
    for recipe in recipes:
        proj.run(recipe)  # everything computed once: each step is then recomputed alone
    return recipes


def allowed_outside(path: Path) -> bool:
    """Python's own files, the system's, and the datasets library's cache of what it parsed."""
    import datasets

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), *sysconfig.get_paths().values(),
             "/usr", "/lib", "/lib64", "/etc", "/proc", "/sys", "/dev", str(datasets.config.HF_DATASETS_CACHE)}
    return any(path.is_relative_to(Path(r).resolve()) for r in roots if r)


def reads_outside_key(recipe: Path, step: str, monkeypatch) -> tuple[set[Path], list[Path]]:
    """(the files that entered `step`'s keys, the files it opened while computing that are not among
    them, nor in the store, nor Python's or the system's)."""
    global _opened
    r = load_recipe(recipe)
    rt = Runtime(r, Store(r.resolve(r.spec.store)), device="cpu")
    kind = r.kinds[kind_of(r, step)]
    compute = kind.compute
    opened: list[Path] = []

    def recorded(*args, **kwargs):
        global _opened
        _opened = []
        try:
            return compute(*args, **kwargs)
        finally:
            opened.extend(Path(f).resolve() for f in _opened)
            _opened = None

    monkeypatch.setattr(kind, "compute", recorded)
    try:
        reports = {rep.step: rep.state for rep in executor.run(rt, only=[step], force=[step])}
    finally:
        _opened = None
    assert reports[step] == "forced"
    keyed = rt.key_files_of[step]
    store = rt.store.root.resolve()
    project = recipe.parent.resolve()
    stray = sorted({f for f in opened if f not in keyed and not f.is_relative_to(store)
                    and (f.is_relative_to(project) or not allowed_outside(f))})
    return keyed, stray


TEXT_KINDS = ["fisher", "gram", "kfac", "tv", "fm", "rm", "ta", "ada", "fw", "fws", "stack", "ft", "ev"]
CLIP_KINDS = ["heads", "fisher", "avg", "ev"]


def test_every_step_kind_is_covered():
    """A new step kind must join the recipes above (and so this test)."""
    text = {s.split(":")[0].strip(): s.split("kind: ")[1].split(",")[0].split("}")[0]
            for s in TEXT_STEPS.strip().splitlines()}
    clip = {s.split(":")[0].strip(): s.split("kind: ")[1].split(",")[0].split("}")[0]
            for s in CLIP_RECIPE.split("steps:\n")[1].strip().splitlines()}
    assert set(text) == set(TEXT_KINDS) and set(clip) == set(CLIP_KINDS)
    assert set(text.values()) | set(clip.values()) == set(step_kinds())


@pytest.mark.parametrize("step", TEXT_KINDS)
def test_a_text_step_reads_only_what_its_key_holds(projects, step, monkeypatch):
    keyed, stray = reads_outside_key(projects[0], step, monkeypatch)
    assert not stray, f"step {step} read files its key does not hold: {stray}"
    names = {f.name for f in keyed}
    if step not in ("tv", "fm", "rm", "ta", "stack"):  # these run no model: tensors only
        assert {"tokenizer.json", "config.json"} <= names, names  # the base's tokenizer, the model's config


@pytest.mark.parametrize("step", CLIP_KINDS)
def test_a_clip_step_reads_only_what_its_key_holds(projects, step, monkeypatch):
    keyed, stray = reads_outside_key(projects[1], step, monkeypatch)
    assert not stray, f"step {step} read files its key does not hold: {stray}"
    if step in ("fisher", "ev"):
        assert "preprocessor_config.json" in {f.name for f in keyed}
