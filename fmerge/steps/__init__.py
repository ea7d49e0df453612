"""Step kinds, one module each, found by discovery: adding a module here is its registration."""

from __future__ import annotations

import importlib
import pkgutil

from .base import STEP_KINDS, Planned, StepKind, register
from .statistics import PerModelStep, StatisticsConfig


def step_kinds() -> dict[str, StepKind]:
    """Every step kind, by name: imports each module of this package once (they `register`)."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    return STEP_KINDS


__all__ = ["PerModelStep", "Planned", "StatisticsConfig", "StepKind", "register", "step_kinds"]
