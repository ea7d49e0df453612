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

A grid may expand into at most `max_variants` steps (a recipe key, default 1000, all swept steps
together): a larger one is refused before any variant is built, so that a typo such as a
thousand-value list cannot keep `validate` busy for minutes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import RecipeError, quoted


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
    """`--set step.path=v` (an override) or `--set step.path=v1,v2,...` (a sweep); values are YAML,
    read with the recipe's bounded loader (no alias bombs, NaN or duplicate keys)."""
    from .recipe import cut, load_yaml

    overrides: dict[str, Any] = {}
    sweeps: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        shown = quoted(item, 120)
        if not sep or "." not in key:
            raise RecipeError(f"--set {shown} must look like STEP.PARAM=VALUE or STEP.PARAM=V1,V2,... "
                              f"(e.g. --set ta.params.lambda=0.1,0.3,0.5).")
        if any(not part.strip() for part in key.split(".")):
            raise RecipeError(f"--set {shown}: the key {quoted(key, 80)} has an empty part; write "
                              f"STEP.PARAM.SUBKEY with a name between the dots (e.g. ta.params.lambda).")
        try:
            values, _ = load_yaml(f"[{text}]", f"--set {shown}", located=False)
        except RecipeError as exc:
            raise RecipeError(f"{exc} The values of --set are YAML: one value, or several separated by commas "
                              f"(a sweep); lists go in brackets, e.g. [1, 2].") from None
        if not isinstance(values, list) or not values:
            raise RecipeError(f"--set {shown} gives no value; write STEP.PARAM=VALUE (e.g. "
                              f"{cut(key, 60)}=0.3), or quote an empty string: {cut(key, 60)}=''.")
        if key in overrides or key in sweeps:
            raise RecipeError(f"--set {shown}: '{cut(key, 80)}' is set twice on the command line; give it once "
                              f"(several values, separated by commas, make a sweep).")
        if len(values) == 1:
            overrides[key] = values[0]
        else:
            sweeps[key] = values
    return overrides, sweeps


def apply_overrides(data: dict, overrides: dict[str, Any], sweeps: dict[str, list]) -> None:
    """Put command-line overrides and sweeps into a parsed recipe before validation."""
    steps = data.get("steps")
    if not isinstance(steps, dict):
        raise RecipeError(f"--set names a step, but the recipe's 'steps' is {_what(steps)}, not a mapping of "
                          f"step names to steps; fix 'steps' first.")
    for key, value in overrides.items():
        step, path = _split(key, steps, f"--set {quoted(key, 80)}")
        if isinstance(steps[step], dict):  # a copy: a step that is a YAML alias of another stays as written
            steps[step] = dict(steps[step])
        _assign(steps[step], path, value, f"--set {quoted(key, 80)}")
    if sweeps:
        old = data.get("sweep")
        if old is not None and not isinstance(old, dict):
            raise RecipeError(f"--set adds to the recipe's 'sweep', which is {_what(old)}, not a mapping of "
                              f"STEP.PARAM: [values]; fix 'sweep' first.")
        data["sweep"] = {**(old or {}), **sweeps}


# Step keys naming where a step writes outside the store: a run with --set moves them (see below).
OUTPUT_KEYS = ("export", "output")
_PLAIN_SUFFIX = re.compile(r"^[A-Za-z0-9._,=+\-\[\]]{1,120}$")


def overrides_suffix(sets: list[str]) -> str:
    """`@` and the --set items as written (spaces dropped), e.g. `@ta.params.lambda=0.1`; when that
    is no plain file name, `@set-` and a digest of them."""
    text = ",".join("".join(item.split()) for item in sets)
    if _PLAIN_SUFFIX.match(text) and text not in (".", ".."):
        return "@" + text
    return "@set-" + hashlib.sha256("\0".join(sets).encode()).hexdigest()[:12]


def redirect_outputs(data: dict, sets: list[str]) -> None:
    """A recipe's declared `export` and `output` paths only ever hold what the recipe as written
    makes: under --set, every step's export and results go beside them instead, to the declared
    path with `overrides_suffix(sets)` appended (`out/ta@ta.params.lambda=0.1`), unless the --set
    items name that path themselves."""
    given = {item.partition("=")[0].strip() for item in sets}
    suffix = overrides_suffix(sets)
    for name, raw in (data.get("steps") or {}).items():
        for key in OUTPUT_KEYS:
            path = raw.get(key) if isinstance(raw, dict) else None
            if isinstance(path, str) and path.strip() and f"{name}.{key}" not in given:
                path = path.rstrip("/")
                ext = ".safetensors" if path.endswith(".safetensors") else ""  # a file export keeps its type
                raw[key] = path[:len(path) - len(ext)] + suffix + ext


def _what(value: Any) -> str:
    kind = type(value).__name__
    return "missing" if value is None else f"{quoted(value, 60)} (a{'n' if kind[0] in 'aeiou' else ''} {kind})"


def _split(key: str, steps: dict, where: str) -> tuple[str, list[str]]:
    from difflib import get_close_matches

    if not isinstance(key, str):
        raise RecipeError(f"{where}: a sweep key is {quoted(key, 60)}, not STEP.PARAM (e.g. ta.params.lambda).")
    step, _, path = key.partition(".")
    if step not in steps:
        close = get_close_matches(step, [str(s) for s in steps], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        names = ", ".join(map(str, steps))
        raise RecipeError(f"{where}: {quoted(key, 80)} names no step {quoted(step, 60)}{hint} Steps: "
                          f"{names if len(names) < 300 else names[:300] + '...'}.")
    if not path or path.split(".")[0] == "kind":
        raise RecipeError(f"{where}: {quoted(key, 80)} must name a parameter of step '{step}' (e.g. "
                          f"{step}.params.lambda); a step's kind is not swept or overridden.")
    parts = path.split(".")
    if any(not p for p in parts):
        raise RecipeError(f"{where}: {quoted(key, 80)} has an empty part between dots; write "
                          f"STEP.PARAM.SUBKEY (e.g. {step}.params.lambda).")
    return step, parts


def _assign(raw: Any, path: list[str], value: Any, where: str = "") -> None:
    """Set raw[path[0]][path[1]]... = value, creating mappings on the way and copying those it passes
    through (a mapping the recipe shares through a YAML alias, `params: *p`, keeps its value in the
    other places); a path through a value that is not a mapping is an error naming `where` (the
    --set or the sweep key)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix}the step is {_what(raw)}, not a mapping of its settings; give it "
                          f"'kind' and its parameters.")
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{prefix}'{'.'.join(path[:i + 1])}' is {_what(child)}, not a mapping, so "
                              f"'{'.'.join(path)}' cannot be set inside it.")
        node[part] = dict(child)
        node = node[part]
    node[path[-1]] = value


def swept_values(variants: list[Variant]) -> dict[str, list]:
    """The parameters that change across a group's variants, with their values in variant order."""
    keys = list(dict.fromkeys(k for v in variants for k in v.values))
    return {k: [v.values.get(k) for v in variants] for k in keys
            if len({_short(v.values.get(k)) for v in variants}) > 1}
