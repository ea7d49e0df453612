"""The one small interface every merge method implements.

A method is a pure function on tensors: it sees one parameter tensor at a time across the models
(streamed by the caller from memory-mapped files), never files, recipes or the CLI. Methods that
need a view of the whole model (global TIES trim) get one optional `prepare` pass first.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ..errors import RecipeError


@dataclass
class TensorGroup:
    """One parameter tensor across the merge: base and each model, in fp32 on one device.

    `stats` holds per-model statistics, e.g. {"fisher": [F_1, ..., F_N]}, in fp32, or in float64
    where stored so (K-FAC factors).
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # True when the caller hands these model tensors over (fresh copies nobody else reads): a
    # method may then reuse their memory, e.g. form τ_i in place, to hold one buffer per model.
    models_owned: bool = False


@dataclass
class MergeContext:
    """What a method may know beyond the tensors: model names (for per-model parameters),
    per-model scalar summaries of statistics (e.g. {"fisher_mean": [..]}) and the run's seed;
    and where it may leave diagnostics for the artifact's metadata."""

    model_names: list[str]
    seed: int = 0
    summaries: dict[str, list[float]] = field(default_factory=dict)
    # What a method reports per tensor for the artifact's metadata, e.g. {"mats": {tensor: residuals}}.
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.model_names)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _beyond_float32(value: Any) -> float | None:
    """A finite number in `value` (or its lists and maps) that float32 cannot hold, or None."""
    if isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((v for v in map(_beyond_float32, items) if v is not None), None)


class MethodParams(BaseModel):
    """Base of each method's typed parameters: unknown keys are errors, never silently ignored.

    Merges compute in float32, so a number beyond its range (e.g. lambda: 1e300) is refused here;
    NaN and infinity are refused by each field's range or by `per_model`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, defer_build=True)  # built on first use

    @field_validator("*", mode="after")
    @classmethod
    def _within_float32(cls, value: Any) -> Any:
        big = _beyond_float32(value)
        if big is not None:
            raise ValueError(f"{big:g} is beyond float32's range (±{FLOAT32_MAX:.3g}), in which merges are "
                             f"computed; use a smaller number")
        return value


PerModel = float | list[float] | dict[str, float]


def per_model(value: PerModel, ctx: MergeContext, key: str) -> list[float]:
    """Expand a scalar, a list (one per model, in order) or a {model: value} map to a list."""
    names = ctx.model_names
    if isinstance(value, (int, float)):
        values = [float(value)] * len(names)
    elif isinstance(value, list):
        if len(value) != len(names):
            raise RecipeError(
                f"Parameter '{key}' has {len(value)} values but the merge has {len(names)} models "
                f"({', '.join(names)}); give one value per model, a single number, or a map."
            )
        values = [float(v) for v in value]
    else:
        values = _from_map(value, names, key)
    bad = [f"{n}={v:g}" for n, v in zip(names, values) if not math.isfinite(v) or abs(v) > FLOAT32_MAX]
    if bad:
        raise RecipeError(f"Parameter '{key}' must be finite and within float32's range (±{FLOAT32_MAX:.3g}), "
                          f"in which merges are computed; got {', '.join(bad)}.")
    return values


def _from_map(value: dict[str, float], names: list[str], key: str) -> list[float]:
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise RecipeError(
            f"Parameter '{key}' names unknown model(s) {', '.join(unknown)}; the merge's models "
            f"are {', '.join(names)}."
        )
    missing = [n for n in names if n not in value]
    if missing:
        raise RecipeError(f"Parameter '{key}' gives no value for model(s) {', '.join(missing)}.")
    return [float(value[n]) for n in names]


def tensor_seed(seed: int, name: str, model_index: int) -> int:
    """A seed per (run seed, tensor, model) that does not depend on the order tensors stream in."""
    digest = hashlib.blake2b(f"{seed}:{name}:{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class MergeMethod:
    """Subclass, set the class attributes, implement `merge`; register with `@register`."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    needs_base: ClassVar[bool] = True
    needs_stats: ClassVar[tuple[str, ...]] = ()
    # Bumped whenever the numerical result of the method changes: part of every cache key.
    version: ClassVar[int] = 1
    # Parameters whose value may name one of the merged models, with the values that name none;
    # a cache key holds the model's position instead of its name (steps/merge.positional_params).
    model_params: ClassVar[dict[str, tuple[str, ...]]] = {}

    def validate(self, params: MethodParams, ctx: MergeContext) -> None:
        """Check parameters against the models before any tensor is read (fail early)."""

    def base_needed(self, params: MethodParams) -> bool:
        """Whether this merge reads the base model; override where a parameter decides it."""
        return self.needs_base

    def stats_needed(self, params: MethodParams) -> tuple[str, ...]:
        """Statistics this merge reads; override where a parameter decides it."""
        return self.needs_stats

    def needs_prepare(self, params: MethodParams) -> bool:
        return False

    def prepare(self, params: MethodParams, groups: Iterable[TensorGroup], ctx: MergeContext) -> Any:
        """Optional whole-model pass (e.g. a global top-k threshold); returns state for merge."""
        return None

    def merge(
        self, group: TensorGroup, params: MethodParams, ctx: MergeContext, state: Any = None
    ) -> torch.Tensor:
        raise NotImplementedError


REGISTRY: dict[str, MergeMethod] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    REGISTRY[cls.name] = cls()
    return cls
