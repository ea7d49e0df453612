"""Runs a recipe's step graph: plan every key first, compute only what the store lacks."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass

from . import distributed
from .errors import FmergeError
from .recipe import Recipe, kind_of, step_dependencies, step_order
from .runtime import Runtime
from .steps import STEP_KINDS, Planned


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
        raise FmergeError(f"--only names unknown step(s) {', '.join(unknown)}; the recipe's steps are "
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
    kind = STEP_KINDS[kind_of(rt.recipe, step)]
    planned = kind.plan(rt, step, rt.recipe.steps[step])
    rt.planned[step] = planned
    return planned


def status(rt: Runtime, only: list[str] | None = None) -> list[StepReport]:
    """Which steps are cached and which would run; computes nothing but model hashes."""
    reports = []
    for step in selected_steps(rt.recipe, only):
        planned = plan_step(rt, step)
        cached = all(rt.store.has(p.key) for p in planned)
        reports.append(StepReport(step, kind_of(rt.recipe, step), "cached" if cached else "stale",
                                  [p.key for p in planned]))
    return reports


def run(rt: Runtime, only: list[str] | None = None, force: list[str] | None = None,
        dry_run: bool = False, on_report=None) -> list[StepReport]:
    force = [step for name in force or [] for step in rt.recipe.step_names(name)]
    unknown = [s for s in force if s not in rt.recipe.steps]
    if unknown:
        raise FmergeError(f"--force names unknown step(s) {', '.join(unknown)}; the recipe's steps are "
                          f"{', '.join(rt.recipe.steps)}.")
    reports = []
    for step in selected_steps(rt.recipe, only):
        kind = STEP_KINDS[kind_of(rt.recipe, step)]
        cfg = rt.recipe.steps[step]
        start = time.perf_counter()
        planned = plan_step(rt, step)
        forced = step in force
        todo = [p for p in planned if forced or not rt.store.has(p.key)]
        report = StepReport(step, kind.kind, "cached", [p.key for p in planned])
        if dry_run:
            report.state = "stale" if todo else "cached"
        else:
            if distributed.active():
                todo = compute_distributed(rt, kind, step, cfg, planned, todo, forced)
            elif todo:
                todo = compute_locked(rt, kind, step, cfg, todo, forced)
            report.state = ("forced" if forced else "computed") if todo else "cached"
            if distributed.is_main():
                report.note = kind.export(rt, step, cfg, planned) or ""
        report.seconds = time.perf_counter() - start
        reports.append(report)
        if on_report:
            on_report(report)
    return reports


def compute_distributed(rt: Runtime, kind, step: str, cfg, planned: list[Planned], todo: list[Planned],
                        forced: bool) -> list[Planned]:
    """Under torchrun: rank 0 locks and decides; sharded steps run on all ranks, others on rank 0."""
    with ExitStack() as stack:
        if distributed.is_main():
            todo = claim(rt, stack, todo, forced)
        keys = distributed.broadcast([p.key for p in todo])
        todo = [p for p in planned if p.key in keys]
        if todo and (kind.distributed or distributed.is_main()):
            kind.compute(rt, step, cfg, todo)
        distributed.barrier()
    return todo


def compute_locked(rt: Runtime, kind, step: str, cfg, todo: list[Planned], forced: bool) -> list[Planned]:
    """Compute under per-key locks; keys another process finished meanwhile are not redone."""
    with ExitStack() as stack:
        todo = claim(rt, stack, todo, forced)
        if todo:
            kind.compute(rt, step, cfg, todo)
    return todo


def claim(rt: Runtime, stack: ExitStack, todo: list[Planned], forced: bool) -> list[Planned]:
    """Lock every key (one global order: no deadlock between runs); return those still to compute."""
    for p in sorted(todo, key=lambda p: p.key):
        stack.enter_context(rt.store.lock(p.key))
    if not forced:
        return [p for p in todo if not rt.store.has(p.key)]
    for p in todo:
        if rt.store.has(p.key):
            rt.store.remove(p.key)
    return todo
