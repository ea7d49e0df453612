"""Runs a recipe's step graph: plan every key first, compute only what the store lacks.

The executor is the only place that connects steps: it plans them in dependency order, hands
each step the planned artifacts of the steps it depends on (`upstream`), binds the outputs of
model-producing steps into the runtime, and computes a planned artifact's `deps` before it.
"""

from __future__ import annotations

import gc
import time
from contextlib import ExitStack
from dataclasses import dataclass

from . import distributed
from .errors import FmergeError, RecipeError
from .export import check_exports
from .graph import kind_of, step_dependencies, step_order
from .recipe import Recipe
from .runtime import Runtime
from .steps import Planned


@dataclass
class StepReport:
    step: str
    kind: str
    state: str          # "cached", "stale", "computed", "forced"
    keys: list[str]
    seconds: float = 0.0
    note: str = ""

    def as_json(self) -> dict:
        return {"step": self.step, "kind": self.kind, "state": self.state, "keys": self.keys,
                "seconds": round(self.seconds, 3), "note": self.note}


def selected_steps(recipe: Recipe, only: list[str] | None) -> list[str]:
    """All steps in order, or the named ones plus everything they depend on."""
    order = step_order(recipe)
    if not only:
        return order
    only = [step for name in only for step in recipe.step_names(name)]
    unknown = [s for s in only if s not in recipe.steps]
    if unknown:
        raise RecipeError(f"--only names unknown step(s) {', '.join(unknown)}; the recipe's steps are "
                          f"{', '.join(recipe.steps)}.")
    needed: set[str] = set()

    def add(step: str) -> None:
        if step not in needed:
            needed.add(step)
            for dep in step_dependencies(recipe, step):
                add(dep)

    for s in only:
        add(s)
    return [s for s in order if s in needed]


def plan_step(rt: Runtime, step: str) -> list[Planned]:
    """Plan one step from the plans of the steps it depends on (planned first, if need be)."""
    if step in rt.planned:
        return rt.planned[step]
    upstream = {dep: plan_step(rt, dep) for dep in step_dependencies(rt.recipe, step)}
    with rt.planning(step):  # which files' bytes entered this step's keys
        planned = rt.recipe.kinds[kind_of(rt.recipe, step)].plan(rt, step, rt.recipe.steps[step], upstream)
    rt.planned[step] = planned
    if rt.recipe.kinds[kind_of(rt.recipe, step)].produces_model:
        rt.bind_output(step, planned[0].key)
    return planned


def cached(rt: Runtime, p: Planned, locked: bool = False) -> bool:
    """Whether the store holds this artifact intact (the one place the executor asks).

    A run (store opened for writing) reuses an artifact only once its bytes match their checksums;
    a bad one is reported, moved to the store's quarantine/ and recomputed. `locked`: the caller
    holds p.key's lock. status and gc (store opened read-only) ask the same question and move
    nothing: an artifact whose files' stamps still match those kept when it was last verified is
    intact unread, any other is read whole (`Store.check`)."""
    if not distributed.is_main():
        return rt.store.has(p.key)
    if not rt.store.writable:
        return rt.store.check(p.key) == ""

    def report(bad) -> None:
        rt.console.print(f"[yellow]warning:[/] cached artifact {bad.key} ({p.kind}, step {p.step}) in "
                         f"store {rt.store.root} is corrupt: {bad.problem}. Moved it "
                         f"to {bad.path}; recomputing it.", highlight=False, soft_wrap=True)

    return rt.store.has_intact(p.key, on_bad=report, locked=locked)


def status(rt: Runtime, only: list[str] | None = None) -> list[StepReport]:
    """Which steps `run` would compute, write or restore anything for ("stale", with the reason
    in `note`) and which it would leave alone ("cached"): a missing or bad artifact, an export or a
    results file missing, changed, or not what the recipe makes. Computes nothing, reads no dataset."""
    reports = []
    for step in selected_steps(rt.recipe, only):
        planned = plan_step(rt, step)
        kind = rt.recipe.kinds[kind_of(rt.recipe, step)]
        missing = next((p for p in planned if not cached(rt, p)), None)
        note = (f"artifact {missing.key[:12]} missing or changed" if missing else
                kind.outputs_state(rt, step, rt.recipe.steps[step], planned) or "")
        reports.append(StepReport(step, kind.kind, "stale" if note else "cached", [p.key for p in planned], note=note))
    return reports


def run(rt: Runtime, only: list[str] | None = None, force: list[str] | None = None,
        dry_run: bool = False, on_report=None) -> list[StepReport]:
    force = [step for name in force or [] for step in rt.recipe.step_names(name)]
    unknown = [s for s in force if s not in rt.recipe.steps]
    if unknown:
        raise RecipeError(f"--force names unknown step(s) {', '.join(unknown)}; the recipe's steps are "
                          f"{', '.join(rt.recipe.steps)}.")
    check_exports(rt.recipe, rt.store.root)
    reports = []
    computed: set[str] = set()  # keys this run computed: another step or row asking for one reuses it
    for step in selected_steps(rt.recipe, only):
        kind = rt.recipe.kinds[kind_of(rt.recipe, step)]
        cfg = rt.recipe.steps[step]
        start = time.perf_counter()
        planned = plan_step(rt, step)
        forced = step in force
        todo = [p for p in distinct(planned) if p.key not in computed and (forced or not cached(rt, p))]
        report = StepReport(step, kind.kind, "cached", [p.key for p in planned])
        if dry_run:
            report.state = "stale" if todo else "cached"
        else:
            if todo or distributed.active():
                resume_gc()
            if distributed.active():
                todo = compute_distributed(rt, kind, step, cfg, planned, todo, forced)
            elif todo:
                todo = compute_locked(rt, kind, step, cfg, todo, forced)
            computed.update(p.key for p in todo)
            report.state = ("forced" if forced else "computed") if todo else "cached"
            if distributed.is_main():
                report.note = kind.export(rt, step, cfg, planned) or ""
        report.seconds = time.perf_counter() - start
        reports.append(report)
        if on_report:
            on_report(report)
    rt.data_hashes.save()
    return reports


def resume_gc() -> None:
    """Turn the cyclic GC back on if the CLI kept it off for start-up (cli.main), first moving
    everything alive now (torch's modules, the plan) to the permanent generation, so that
    collections during the work never traverse them."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def compute_distributed(rt: Runtime, kind, step: str, cfg, planned: list[Planned], todo: list[Planned],
                        forced: bool) -> list[Planned]:
    """Under torchrun: rank 0 locks and decides; sharded steps run on all ranks, others on rank 0."""
    with ExitStack() as stack:
        if distributed.is_main():
            ensure_deps(rt, todo)
            todo = claim(rt, stack, todo, forced)
        keys = distributed.broadcast([p.key for p in todo])
        todo = [p for p in distinct(planned) if p.key in keys]
        if todo and (kind.distributed or distributed.is_main()):
            compute_in_order(rt, kind, step, cfg, todo)
        distributed.barrier()
    return todo


def compute_locked(rt: Runtime, kind, step: str, cfg, todo: list[Planned], forced: bool) -> list[Planned]:
    """Compute under per-key locks; keys another process finished meanwhile are not redone."""
    ensure_deps(rt, todo)
    with ExitStack() as stack:
        todo = claim(rt, stack, todo, forced)
        if todo:
            compute_in_order(rt, kind, step, cfg, todo)
    return todo


def compute_in_order(rt: Runtime, kind, step: str, cfg, todo: list[Planned]) -> None:
    """Compute `todo` in waves, each artifact after those of `todo` it depends on."""
    left = list(todo)
    while left:
        pending = {p.key for p in left}
        ready = [p for p in left if not any(d.key in pending for d in p.deps)]
        if not ready:
            raise FmergeError(f"Step '{step}': its planned artifacts depend on each other in a cycle.")
        kind.compute(rt, step, cfg, ready)
        done = {p.key for p in ready}
        left = [p for p in left if p.key not in done]


def ensure_deps(rt: Runtime, todo: list[Planned]) -> None:
    """Compute the deps of `todo` that belong to no step being run (e.g. CLIP heads), each under
    its lock, with the step kind that makes them; deps inside `todo` are left to its waves."""
    own = {p.key for p in todo}
    seen: set[str] = set()
    for dep in (d for p in todo for d in p.deps):
        if dep.key in own or dep.key in seen:
            continue
        seen.add(dep.key)
        ensure_deps(rt, [dep])
        if not cached(rt, dep):
            with rt.store.lock(dep.key):
                if not cached(rt, dep, locked=True):
                    rt.recipe.kinds[dep.kind].compute(rt, dep.step, None, [dep])


def distinct(planned: list[Planned]) -> list[Planned]:
    """The first planned artifact of each key, in order: rows asking for one artifact (two merges
    that are the same, one merge scored twice) share one computation, and its key is locked once."""
    first: dict[str, Planned] = {}
    for p in planned:
        first.setdefault(p.key, p)
    return list(first.values())


def claim(rt: Runtime, stack: ExitStack, todo: list[Planned], forced: bool) -> list[Planned]:
    """Lock every key once (one global order: no deadlock between runs); return those still to compute."""
    todo = distinct(todo)
    for p in sorted(todo, key=lambda p: p.key):
        stack.enter_context(rt.store.lock(p.key))
    if not forced:
        return [p for p in todo if not cached(rt, p, locked=True)]
    for p in todo:
        if rt.store.has(p.key):
            rt.store.remove(p.key)
    return todo
