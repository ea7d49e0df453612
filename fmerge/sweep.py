"""Sweeps: a grid over step parameters, expanded into ordinary steps before anything runs.

    sweep:
      ta.params.lambda: [0.1, 0.3, 0.5]       # step.path.to.parameter: values
      ties.params.density: [0.1, 0.2]
      ties.params.lambda: [0.5, 1.0]          # two keys on one step: their grid (2 × 2 variants)

Each swept step becomes one step per grid point, named `ta[lambda=0.3]`, so every variant is its
own cached artifact and shares whatever it reads (Fisher, task vectors) with the others. A step
that reads a swept step (a merge reading a swept Fisher step) is expanded along with it. An eval
step that lists a swept merge evaluates every variant on the selection split, picks the best
average accuracy there, and reports only that variant on its test split (Matena & Raffel's
protocol): the recipe keeps the groups in `Recipe.sweeps`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import FmergeError


@dataclass
class Variant:
    """One grid point of a swept step: its step name and the values that define it."""

    name: str
    group: str
    values: dict[str, Any] = field(default_factory=dict)  # parameter path -> value, upstream ones too


def variant_name(step: str, values: dict[str, Any]) -> str:
    parts = [f"{key.split('.')[-1]}={_short(value)}" for key, value in values.items()]
    return f"{step}[{','.join(parts)}]"


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return text.replace(", ", ",")


def parse_set(items: list[str]) -> tuple[dict[str, Any], dict[str, list]]:
    """`--set step.path=v` (an override) or `--set step.path=v1,v2,...` (a sweep); values are YAML."""
    overrides: dict[str, Any] = {}
    sweeps: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise FmergeError(f"--set '{item}' must look like STEP.PARAM=VALUE or STEP.PARAM=V1,V2,... "
                              f"(e.g. --set ta.params.lambda=0.1,0.3,0.5).")
        try:
            values = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError:
            raise FmergeError(f"--set '{item}': the values are not valid YAML (lists go in brackets: [1, 2]).")
        if len(values) == 1:
            overrides[key.strip()] = values[0]
        else:
            sweeps[key.strip()] = values
    return overrides, sweeps


def apply_overrides(data: dict, overrides: dict[str, Any], sweeps: dict[str, list]) -> None:
    """Put command-line overrides and sweeps into a parsed recipe before validation."""
    steps = data.get("steps") or {}
    for key, value in overrides.items():
        step, path = _split(key, steps, "--set")
        _assign(steps[step], path, value)
    if sweeps:
        data["sweep"] = {**(data.get("sweep") or {}), **sweeps}


def _split(key: str, steps: dict, where: str) -> tuple[str, list[str]]:
    from difflib import get_close_matches

    step, _, path = key.partition(".")
    if step not in steps:
        close = get_close_matches(step, steps, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise FmergeError(f"{where}: '{key}' names no step '{step}'{hint} Steps: {', '.join(steps)}.")
    if not path or path == "kind":
        raise FmergeError(f"{where}: '{key}' must name a parameter of step '{step}' (e.g. {step}.params.lambda).")
    return step, path.split(".")


def _assign(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise FmergeError(f"'{'.'.join(path)}': '{part}' is not a mapping in this step.")
        node = node.setdefault(part, {})
    node[path[-1]] = value


def swept_values(variants: list[Variant]) -> dict[str, list]:
    """The parameters that change across a group's variants, with their values in variant order."""
    keys = list(dict.fromkeys(k for v in variants for k in v.values))
    return {k: [v.values.get(k) for v in variants] for k in keys
            if len({_short(v.values.get(k)) for v in variants}) > 1}
