"""Merge methods, one module each, registered by name."""

from difflib import get_close_matches

from ..errors import FmergeError
from .base import REGISTRY, MergeContext, MergeMethod, MethodParams, TensorGroup, per_model

# Importing a module registers its method.
from . import simple_average, weighted_average, task_arithmetic, ties, dare, fisher  # noqa: E402,F401
from . import regmean  # noqa: E402,F401


def get_method(name: str) -> MergeMethod:
    if name not in REGISTRY:
        close = get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise FmergeError(
            f"Unknown merge method '{name}'.{hint} Known methods: {', '.join(sorted(REGISTRY))}."
        )
    return REGISTRY[name]


__all__ = ["REGISTRY", "MergeContext", "MergeMethod", "MethodParams", "TensorGroup", "get_method", "per_model"]
