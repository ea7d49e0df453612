"""The `fisher` step: one diagonal-Fisher artifact per model, on a seeded subset of its task data.

The n-row subset is the first n rows of one seeded permutation, so asking for more examples later
extends the largest cached estimate of the same model, data, seed and settings (its mean × count
is the sum over its rows) with the missing rows only. Under torchrun the rows are sharded across
ranks and the sums all-reduced; rank 0 writes.

A causal LM's task (the data entry's `task`, else the model's config) gets the per-token Fisher
of fisher.py on its text (prompt tokens and padding not counted; `count_unit` tokens); an
`exact` Fisher of an LM whose vocabulary makes it impractical is refused while planning, before
any data is read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from .. import distributed
from ..data import shard_by_rank
from ..fisher import ESTIMATORS, FisherSums, allreduce_sums, check_exact_vocabulary, fisher_diagonal
from ..errors import ModelError, RecipeError
from ..progress import tensor_progress
from ..store import make_key
from ..tasks import raw_config, task_batches, task_kind
from .base import Planned, register
from .statistics import PerModelStep, StatisticsConfig, check_estimator

VERSION = 1


class FisherConfig(StatisticsConfig):
    estimator: str = Field("exact", description=f"one of {', '.join(ESTIMATORS)}")
    samples: int = Field(1, ge=1, description="draws per example for 'sampled'")
    chunk_size: int = Field(32, ge=1)
    export: str | None = Field(None, description="also write the mean diagonal as safetensors: this file "
                               "for one model, else <export>/<model>.safetensors")


@register
class FisherStep(PerModelStep):
    kind = "fisher"
    Config = FisherConfig
    distributed = True

    def check(self, recipe, name, cfg):
        check_estimator(recipe, name, cfg.estimator, ESTIMATORS)

    def plan(self, rt, name, cfg, upstream):
        planned = []
        settings = {"estimator": cfg.estimator, "samples": cfg.samples}
        for m, data, params, inputs, deps in self.subset_artifacts(rt, name, cfg, settings):
            if cfg.estimator == "exact" and task_kind(rt, m) in ("causal_lm", "multiple_choice"):
                self._check_exact_vocabulary(rt, name, m)
            family_params = {k: v for k, v in params.items() if k != "examples"}
            family = make_key("fisher-family", family_params, {k: v for k, v in inputs.items()}, VERSION)
            planned.append(Planned(name, m, "fisher", make_key("fisher", params, inputs, VERSION), inputs,
                                   params, VERSION, {"data": data, "family": family}, deps))
        return planned

    @staticmethod
    def _check_exact_vocabulary(rt, name, model) -> None:
        """Refuse an impractical exact Fisher of a causal LM before any data is read."""
        config = raw_config(rt, model)
        vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
        try:
            check_exact_vocabulary(vocab)
        except RecipeError as exc:
            raise RecipeError(f"{rt.recipe.where('steps', name, 'estimator')}: model '{rt.label(model)}': {exc}") from None

    def compute(self, rt, name, cfg, todo):
        for p in todo:
            model, spec, rows = self.labelled_rows(rt, p)
            previous, done = self._cached_prefix(rt, p)
            rows = shard_by_rank(rows.select(range(done, len(rows))))
            batches = task_batches(rt, p.label, rows, spec, cfg.batch_size, cfg.max_length)
            with tensor_progress(rt.console, f"{name}: {p.label}", -(-len(rows) // cfg.batch_size)) as advance:
                counted = (advance() or b for b in batches)
                sums = allreduce_sums(fisher_diagonal(model, counted, cfg.estimator, samples=cfg.samples,
                                                      seed=p.params["seed"], chunk_size=cfg.chunk_size))
            if previous is not None:
                sums = previous.extend(sums)
            if distributed.is_main():
                self._write(rt, name, p, sums, done)

    @staticmethod
    def _cached_prefix(rt, p) -> tuple[FisherSums | None, int]:
        """The largest cached estimate over a prefix of this subset, as sums, and its row count."""
        found = [i for i in rt.store.find("fisher", family=p.extra["family"])
                 if i.attrs["meta"].get("examples", 0) < p.params["examples"]]
        for info in sorted(found, key=lambda i: i.attrs["meta"]["examples"], reverse=True):
            problem = rt.store.check(info.key)  # a damaged estimate is not extended: the next one is, or none
            if not problem:
                break
            rt.console.print(f"[yellow]warning:[/] cached Fisher {info.key} in store {rt.store.root} is corrupt "
                             f"({problem}); not extending it (`fmerge verify --repair` removes it).",
                             highlight=False, soft_wrap=True)
        else:
            return None, 0
        art = rt.store.open(info.key)
        meta = art.meta
        sums = {n: art.get("fisher/" + n).to(rt.device, torch.float32) * meta["count"]
                for n in art.view("fisher/").names()}
        return FisherSums(sums, meta["count"], meta["count_unit"], meta["examples"], meta["estimator"],
                          p.params["samples"] if meta["estimator"] == "sampled" else 1), meta["examples"]

    @staticmethod
    def _write(rt, name, p, sums: FisherSums, extended_from: int) -> None:
        means = sums.mean()
        for n, t in means.items():
            if not bool(torch.isfinite(t).all()):
                raise ModelError(f"Fisher of model '{p.label}' has NaN or Inf in '{n}'.")
        total = sum(float(t.double().sum()) for t in means.values())
        numel = sum(t.numel() for t in means.values())
        with rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version) as writer:
            for n, t in means.items():
                writer.write("fisher/" + n, t)
            writer.commit({"step": name, "model": p.label, "count": sums.count, "count_unit": sums.count_unit,
                           "examples": sums.examples, "estimator": sums.estimator, "family": p.extra["family"],
                           "extended_from": extended_from, "fisher_mean": total / max(numel, 1)})

    def export(self, rt, name, cfg, planned):
        if not cfg.export:
            return None
        from ..export import export_tensor_file

        out = rt.recipe.resolve(cfg.export)
        notes = []
        for p, target in export_targets(out, planned):
            art = rt.store.open(p.key)
            meta = {k: str(v) for k, v in art.meta.items() if k in ("estimator", "count", "count_unit", "examples")}
            notes.append(export_tensor_file(rt.store, target, p.key, art.view("fisher/"),
                                            where=rt.recipe.where("steps", name, "export"), metadata=meta))
        if all(n.endswith("up to date") for n in notes):
            return f"Fisher export {out} up to date"
        return f"Fisher written to {out}"

    def outputs_state(self, rt, name, cfg, planned):
        if not cfg.export:
            return None
        from ..export import export_file_state

        states = (export_file_state(t, p.key) for p, t in export_targets(rt.recipe.resolve(cfg.export), planned))
        return next((s for s in states if s), None)


def export_targets(out: Path, planned: list[Planned]) -> list[tuple[Planned, Path]]:
    """Where each Fisher goes: `out` itself for one model and a .safetensors name, else
    `out/<model>.safetensors`."""
    single = len(planned) == 1 and out.suffix == ".safetensors"
    return [(p, out if single else out / f"{p.label}.safetensors") for p in planned]
