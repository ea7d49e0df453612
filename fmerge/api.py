"""The Python API: load a recipe, open a store, plan and run — what the CLI does, as functions.

    from fmerge import api
    recipe = api.load_recipe("recipes/demo.yaml")
    reports = api.run(recipe)                      # or api.status(recipe)
"""

from __future__ import annotations

import os
from pathlib import Path

from . import executor, graph
from .recipe import Recipe
from .runtime import Runtime
from .steps import step_kinds
from .store import Store


def load_recipe(file: Path | str, sets: list[str] | None = None) -> Recipe:
    """A validated recipe, with every registered step kind."""
    return graph.load_recipe(file, step_kinds(), sets)


def parse_recipe(text: str, file: Path | None = None, sets: list[str] | None = None) -> Recipe:
    """A validated recipe from YAML text (paths relative to `file`'s directory, or the cwd)."""
    return graph.parse_recipe(text, step_kinds(), file, sets)


def runtime(recipe: Recipe, store: Store | Path | str | None = None, device: str | None = None,
            create: bool = True) -> Runtime:
    """The recipe bound to a store: `store`, else the recipe's `store:`, $FMERGE_STORE, ./artifacts."""
    if not isinstance(store, Store):
        store = open_store(store, recipe, create=create, missing_ok=not create)
    return Runtime(recipe, store, device=device)


def open_store(store: Path | str | None, recipe: Recipe | None = None, create: bool = False,
               missing_ok: bool = False) -> Store:
    """The store named by `store`, the recipe's `store:`, $FMERGE_STORE or ./artifacts. Only a
    writing command (`create`: run, merge, fisher) may create one; every other command opens an
    existing store and creates nothing (`missing_ok`: a missing one reads as empty)."""
    root = store_root(store, recipe)
    return Store.create_or_open(root) if create else Store.open_existing(root, missing_ok=missing_ok)


def store_root(store: Path | str | None, recipe: Recipe | None = None) -> Path:
    """Where the store is, without opening it: `store`, the recipe's `store:`, $FMERGE_STORE, ./artifacts."""
    if store is None and recipe is not None and recipe.spec.store:
        store = recipe.resolve(recipe.spec.store)
    return Path(store or os.environ.get("FMERGE_STORE") or "artifacts")


def run(recipe: Recipe, store: Store | Path | str | None = None, **kwargs) -> list[executor.StepReport]:
    """Run the recipe's step graph (see `executor.run` for `only`, `force`, `dry_run`)."""
    return executor.run(runtime(recipe, store), **kwargs)


def status(recipe: Recipe, store: Store | Path | str | None = None) -> list[executor.StepReport]:
    """Which steps are cached and which would run; creates, writes and computes nothing."""
    return executor.status(runtime(recipe, store, create=False))
