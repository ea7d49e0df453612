"""Merge methods, one module each, found by discovery: adding a module here is its registration."""

import importlib
import pkgutil
from difflib import get_close_matches

from ..errors import RecipeError
from .base import REGISTRY, MergeContext, MergeMethod, MethodParams, TensorGroup, per_model

# Importing a method module registers its method (`@register`); iterative algorithms that are not
# per-tensor merge methods (adamerging, frank_wolfe) live here too and register nothing.
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get_method(name: str) -> MergeMethod:
    if name not in REGISTRY:
        close = get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(
            f"Unknown merge method '{name}'.{hint} Known methods: {', '.join(sorted(REGISTRY))}."
        )
    return REGISTRY[name]


__all__ = ["REGISTRY", "MergeContext", "MergeMethod", "MethodParams", "TensorGroup", "get_method", "per_model"]
