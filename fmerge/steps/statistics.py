"""What the per-model statistic steps (fisher, gram, kfac) share: a seeded subset of each model's
task data, the artifact's params and inputs, the rows a gradient statistic reads, and the check
of its estimator."""

from __future__ import annotations

from difflib import get_close_matches

from pydantic import Field

from ..compat import DEFAULT_MAX_LENGTH, MAX_LENGTH_HELP
from ..data import EXAMPLE_ID_COLUMN
from ..errors import RecipeError
from ..recipe import Strict
from .base import Planned, StepKind
from .zeroshot_head import head_dependency


class PerModelStep(StepKind):
    """A statistic of each model on its own task data (Fisher, Grams): one artifact per model."""

    uses_base = False

    def model_refs(self, cfg):
        return [("models", m) for m in cfg.models or []]

    def models_used(self, cfg, recipe):
        return cfg.models or list(recipe.models)

    def fitted_on(self, recipe, cfg):
        data = recipe.spec.data
        return [("split", "estimates its statistics on", "Estimate on another split (steps.{step}.split; default: "
                 "the train split)", recipe.models[m].data, cfg.split or data[recipe.models[m].data].train_split)
                for m in self.models_used(cfg, recipe) if m in recipe.models and recipe.models[m].data in data]

    def subset_artifacts(self, rt, name: str, cfg, settings: dict):
        """(model, data entry, params, inputs, deps) of each covered model's artifact: `settings`
        and the seeded subset (examples, split, max_length, seed) as params; the model's (its
        tensors and side files), the data's and any zero-shot head's hashes as inputs, the head's
        artifact as a dep. The rows themselves are drawn when computing (`tasks.load_subset`)."""
        from ..tasks import data_inputs, side_inputs, task_data

        seed = cfg.seed if cfg.seed is not None else rt.recipe.spec.seed
        for m in self.models_used(cfg, rt.recipe):
            data = task_data(rt, m, ("steps", name))
            split = cfg.split or rt.recipe.spec.data[data].train_split
            params = {**settings, "examples": cfg.examples, "split": split, "max_length": cfg.max_length, "seed": seed}
            head, deps = head_dependency(rt, m)
            inputs = {"model": rt.model_hash(m), "side": side_inputs(rt, m), "data": data_inputs(rt, data, split), **head}
            yield m, data, params, inputs, deps

    @staticmethod
    def labelled_rows(rt, p: Planned):
        """(task model, data spec, subset rows) of a gradient statistic's item: the labels under
        the label rule of the model's head (`tasks.load_subset`), checked whether or not the
        estimator reads them, as a sign of data paired with the wrong model; each row numbered in EXAMPLE_ID_COLUMN by its
        position in the whole subset, which seeds its label draws whatever shard or chunk runs it."""
        from ..tasks import build_task_model, data_spec, load_subset

        model = build_task_model(rt, p.label, head=p.inputs.get("head"))
        spec = data_spec(rt, p.extra["data"], p.params["split"])
        sub = load_subset(rt, p.extra["data"], p.params["split"], p.params["examples"], p.params["seed"], model.config)
        return model, spec, sub.rows.add_column(EXAMPLE_ID_COLUMN, list(range(len(sub.rows))))


def check_estimator(recipe, name: str, estimator: str, estimators, what: str = "estimator") -> None:
    """Refuse an estimator not in `estimators`, suggesting the closest one."""
    if estimator not in estimators:
        close = get_close_matches(estimator, estimators, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"{recipe.where('steps', name, 'estimator')}: unknown {what} "
                          f"'{estimator}'{hint} Estimators: {', '.join(estimators)}.")


class StatisticsConfig(Strict):
    """The settings every per-model statistic shares: a seeded subset of each task's rows."""

    examples: int = Field(256, ge=1, description="seeded random subset of the task's rows")
    split: str | None = Field(None, description="data split (default: the task's train split)")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=2, description=MAX_LENGTH_HELP)
    seed: int | None = None
    models: list[str] | None = None
