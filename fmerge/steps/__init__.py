"""Step kinds: each turns a typed recipe config into planned artifacts (keys) and computes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, Field

from ..recipe import Strict

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..runtime import Runtime


@dataclass
class Planned:
    """One artifact a step will produce: its key is known before anything is computed."""

    step: str
    label: str
    kind: str
    key: str
    inputs: dict[str, Any]
    params: Any
    version: int
    extra: dict[str, Any] = field(default_factory=dict)  # planning facts reused by compute


class StepKind:
    kind: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    uses_base: ClassVar[bool] = True
    # True if compute() splits its work across torchrun ranks (writing only on rank 0).
    distributed: ClassVar[bool] = False

    def step_refs(self, cfg: BaseModel) -> list[tuple[str, str]]:
        """(config field, step name) pairs this step reads."""
        return []

    def model_refs(self, cfg: BaseModel) -> list[tuple[str, str]]:
        """(config field, model name) pairs named explicitly in the config."""
        return []

    def models_used(self, cfg: BaseModel, recipe: "Recipe") -> list[str]:
        return list(recipe.models)

    def check(self, recipe: "Recipe", name: str, cfg: BaseModel) -> None:
        """Deeper validation at recipe load (e.g. method parameters); raise FmergeError."""

    def plan(self, rt: "Runtime", name: str, cfg: BaseModel) -> list[Planned]:
        raise NotImplementedError

    def compute(self, rt: "Runtime", name: str, cfg: BaseModel, todo: list[Planned]) -> None:
        raise NotImplementedError

    def export(self, rt: "Runtime", name: str, cfg: BaseModel, planned: list[Planned]) -> str | None:
        """Write the step's result outside the store if the recipe asks; return what was done."""
        return None


class PerModelStep(StepKind):
    """A statistic of each model on its own task data (Fisher, Grams): one artifact per model."""

    uses_base = False

    def model_refs(self, cfg):
        return [("models", m) for m in cfg.models or []]

    def models_used(self, cfg, recipe):
        return cfg.models or list(recipe.models)

    def subsets(self, rt, name: str, cfg):
        """(model, data entry, split, seed, seeded subset) for each model the step covers."""
        from ..tasks import load_subset, task_data

        seed = cfg.seed if cfg.seed is not None else rt.recipe.spec.seed
        for m in self.models_used(cfg, rt.recipe):
            data = task_data(rt, m, ("steps", name))
            split = cfg.split or rt.recipe.spec.data[data].train_split
            yield m, data, split, seed, load_subset(rt, data, split, cfg.examples, seed)


class StatisticsConfig(Strict):
    """The settings every per-model statistic shares: a seeded subset of each task's rows."""

    examples: int = Field(256, ge=1, description="seeded random subset of the task's rows")
    split: str | None = Field(None, description="data split (default: the task's train split)")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(64, ge=2)
    seed: int | None = None
    models: list[str] | None = None


STEP_KINDS: dict[str, StepKind] = {}


def register(cls: type[StepKind]) -> type[StepKind]:
    STEP_KINDS[cls.kind] = cls()
    return cls


from . import task_vectors, merge, finetune, fisher, eval  # noqa: E402,F401  (registration)
from . import frank_wolfe, adamerging  # noqa: E402,F401  (registration)
from . import gram  # noqa: E402,F401  (registration)
from . import zeroshot_head  # noqa: E402,F401  (registration)
