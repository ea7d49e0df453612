"""What every step kind is: typed config in, planned artifacts (keys) out, computed on demand.

Planning is pure: a step's `plan` sees its config, the runtime (model hashes, data fingerprints)
and `upstream`, the planned artifacts of exactly the steps it depends on, handed over by the
executor. It reads no weights beyond content hashes, loads no dataset, computes nothing. An
artifact that must exist before another (a CLIP head, a sweep's choice) is listed in its `deps`;
the executor computes deps first, under their locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from pydantic import BaseModel

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
    deps: list["Planned"] = field(default_factory=list)  # artifacts to compute before this one


Upstream = Mapping[str, list[Planned]]  # dependency step name -> its planned artifacts


class StepKind:
    kind: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    description: ClassVar[str] = ""  # one line for `fmerge methods` (iterative algorithms)
    uses_base: ClassVar[bool] = True
    # True if compute() splits its work across torchrun ranks (writing only on rank 0).
    distributed: ClassVar[bool] = False
    # True if the step's one artifact is a model that `models:` entries may name with `from_step`.
    produces_model: ClassVar[bool] = False

    def step_refs(self, cfg: BaseModel) -> list[tuple[str, str]]:
        """(config field, step name) pairs this step reads."""
        return []

    def model_refs(self, cfg: BaseModel) -> list[tuple[str, str]]:
        """(config field, model name) pairs named explicitly in the config."""
        return []

    def models_used(self, cfg: BaseModel, recipe: "Recipe") -> list[str]:
        return list(recipe.models)

    def fitted_on(self, recipe: "Recipe", cfg: BaseModel) -> list[tuple[str, str, str, str, str]]:
        """The data this step fits anything to, for the eval step's leak check: (config field,
        what it does, how to change it, data entry, split) per use."""
        return []

    def check(self, recipe: "Recipe", name: str, cfg: BaseModel) -> None:
        """Deeper validation at recipe load (e.g. method parameters); raise FmergeError."""

    def plan(self, rt: "Runtime", name: str, cfg: BaseModel, upstream: Upstream) -> list[Planned]:
        raise NotImplementedError

    def compute(self, rt: "Runtime", name: str, cfg: BaseModel, todo: list[Planned]) -> None:
        raise NotImplementedError

    def export(self, rt: "Runtime", name: str, cfg: BaseModel, planned: list[Planned]) -> str | None:
        """Write the step's result outside the store if the recipe asks; return what was done."""
        return None

    def outputs_state(self, rt: "Runtime", name: str, cfg: BaseModel, planned: list[Planned]) -> str | None:
        """None when what `export` writes outside the store is there exactly as it would write it
        now, else what it would change (for `fmerge status`; every planned artifact is cached and
        intact). By default: the model directory `export` of the step's one artifact."""
        export = getattr(cfg, "export", None)
        if not export or len(planned) != 1:
            return None
        from ..export import export_dir_state

        return export_dir_state(rt.recipe.resolve(export), planned[0].key)


STEP_KINDS: dict[str, StepKind] = {}


def register(cls: type[StepKind]) -> type[StepKind]:
    """Class decorator: a step kind module registers itself when `fmerge.steps` discovers it."""
    STEP_KINDS[cls.kind] = cls()
    return cls
