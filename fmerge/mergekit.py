"""A mergekit config read as a one-step fmerge recipe, strictly.

mergekit ignores parameters it does not know (`densty: 0.5` merges at density 1); here every
unknown key is an error with a did-you-mean. Only the methods both tools share are accepted, with
mergekit 0.1.5's defaults:

| mergekit        | fmerge                                                   | normalize default |
| --------------- | -------------------------------------------------------- | ----------------- |
| linear          | weighted_average (weights)                               | true              |
| task_arithmetic | task_arithmetic (weight, lambda)                         | false             |
| ties            | ties (density, weight, lambda, mean/sum), rule: mergekit | true              |
| dare_ties       | dare, combine: ties, p = 1 − density, rule: mergekit     | false             |
| dare_linear     | dare, combine: task_arithmetic                           | false             |
| breadcrumbs     | breadcrumbs (density, gamma), rule: mergekit             | false             |
| breadcrumbs_ties| breadcrumbs, combine: ties, rule: mergekit               | false             |
| della           | della (density, epsilon), combine: ties, rule: mergekit  | true              |
| della_linear    | della, combine: task_arithmetic, rule: mergekit          | false             |
| slerp           | slerp (t)                                                |                   |
| nuslerp         | nuslerp (weight, over, task_vectors when a base is named)|                   |
| model_stock     | model_stock (filter_wise)                                |                   |
| passthrough     | slices: layers stacked from the sources (frankenmerge)   |                   |

`slices:` are read for passthrough (each slice one source: a frankenmerge, see fmerge/slices.py)
and, for the other methods, when there is one slice whose sources each cover all their model's
layers (the common slerp config): that is the same merge as a `models:` list.
`allow_crimes: true` at the top of the config is mergekit's `--allow-crimes` (a command-line option
there, a key that mergekit's config schema ignores): fmerge then merges models whose configs
describe different architectures (fmerge/compat.py), which it refuses otherwise (mergekit refuses
different architecture classes; fmerge also different widths, RoPE settings or vocabularies).
`tokenizer_source` other than the base, and `tokenizer:` blocks, are refused: they build a new
vocabulary, and every embedding and output row would have to be re-mapped to it.

Values keep mergekit's grammar (a number, a list interpolated over layer depth, `{filter, value}`
entries matched against tensor names), written in fmerge's explicit form (`{gradient: [...]}`)
and resolved per tensor by the merge driver. ties and dare_ties get `rule: mergekit`, mergekit
0.1.5's TIES: k = ⌊density·n⌋ entries kept (at least 1), in its CPU argsort's order among equal
magnitudes; weights applied before the sign vote and λ after; + elected where the sign sum is
exactly 0. (fmerge's own default, `rule: exact`, keeps exactly ⌈density·n⌉, the lowest flat index
winning ties at the cut, and keeps the base value at a zero sum.) Known differences, documented
in the methods: DARE's drop mask comes from fmerge's seeded generator, not mergekit's, and its
rescale divides by 1 − p where mergekit 0.1.5 matches the L1 norm; arithmetic is fp32 whatever
`dtype` says, where mergekit computes in `dtype` (with `dtype: float32` TIES is bit-identical to
mergekit's on the CPU; with bf16 mergekit rounds every intermediate to bf16, so outputs are close,
not bit-identical). `out_dtype` (else `dtype`, else the
base's dtype) is the dtype written. Paths are relative to the config file (then to the working
directory, as mergekit reads them); the merged model is exported beside the
config as `<config name>-merged/`.
"""

from __future__ import annotations

import re
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from .errors import FmergeError, RecipeError, quoted

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "allow_crimes"}
UNSUPPORTED_TOP = {"modules", "chat_template"}
TOKENIZER_REFUSAL = (
    "fmerge keeps the base model's tokenizer and embedding rows. A vocabulary built from other tokenizers (union, "
    "another model's, or added tokens) gives tokens new ids, so every model's embedding and output rows would have "
    "to be re-mapped to those ids, and rows invented for tokens a model never saw; fmerge does not do this. Remove "
    "it (or write tokenizer_source: base) when the models share the base's tokenizer; otherwise merge with "
    "mergekit, or align the vocabularies first.")

# method -> {parameter: (scope, default)}; scope "model" may be given per model or globally.
_GTA = {"weight": ("model", None), "lambda": ("global", 1.0), "int8_mask": ("global", False)}


def _gta(normalize: bool, rescale: bool, **extra) -> dict[str, tuple[str, Any]]:
    return {**_GTA, "density": ("model", 1.0), "normalize": ("global", normalize), "rescale": ("global", rescale),
            **extra}


METHODS: dict[str, dict[str, tuple[str, Any]]] = {
    "linear": {"weight": ("model", None), "normalize": ("global", True)},
    "task_arithmetic": {**_GTA, "normalize": ("global", False)},
    "ties": _gta(True, False),
    "dare_ties": _gta(False, True),
    "dare_linear": _gta(False, True),
    "breadcrumbs": _gta(False, False, gamma=("model", 0.01)),
    "breadcrumbs_ties": _gta(False, False, gamma=("model", 0.01)),
    "della": _gta(True, True, epsilon=("model", 0.15)),
    "della_linear": _gta(False, True, epsilon=("model", 0.15)),
    "slerp": {"t": ("global", None)},
    "nuslerp": {"weight": ("model", None), "nuslerp_flatten": ("global", True), "nuslerp_row_wise": ("global", False)},
    "model_stock": {"filter_wise": ("global", False)},
    "passthrough": {"scale": ("model", None)},
}
NOT_SHARED = ("multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hint(word: str, known) -> str:
    close = get_close_matches(str(word), sorted(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(known))}"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _spec(value, where: str):
    """A mergekit numeric setting in fmerge's grammar: number, {gradient}, or [{filter, value}]."""
    if _is_number(value):
        return value
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return {"gradient": list(value)}
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        out = []
        for i, entry in enumerate(value):
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                bad = sorted(unknown)[0] if unknown else "value"
                raise RecipeError(f"{where}[{i}]: a conditional value has 'value' and optional 'filter'; "
                                  + (f"unknown key {quoted(bad, 60)}{_hint(bad, ['filter', 'value'])}" if unknown else "'value' is missing") + ".")
            item = {"value": _spec(entry["value"], f"{where}[{i}].value")}
            if entry.get("filter") is not None:
                item["filter"] = str(entry["filter"])
            out.append(item)
        return out
    raise RecipeError(f"{where}: expected a number, a list of numbers (interpolated over layer depth) or "
                      f"a list of {{filter, value}} entries, got {quoted(value, 80)}.")


def _map(spec, f):
    """Apply f to every number of a spec (interpolation and filters commute with affine maps)."""
    if _is_number(spec):
        return f(spec)
    if isinstance(spec, dict):
        return {"gradient": [f(v) for v in spec["gradient"]]}
    return [{**e, "value": _map(e["value"], f)} for e in spec]


def _with_fallback(spec, fallback):
    """A filter list that may match no tensor falls back to the global setting or the default."""
    if isinstance(spec, list) and fallback is not None and not any("filter" not in e for e in spec):
        return spec + [{"value": fallback}]
    return spec


def _resolve_model_path(ref: Any, where: str, config_dir: Path) -> str:
    if not isinstance(ref, str) or not ref.strip():
        raise RecipeError(f"{where}: expected a model directory or hub id (a non-empty string), got "
                          f"{quoted(ref, 80)}.")
    if "+" in ref:
        raise RecipeError(f"{where}: {quoted(ref, 80)} applies a LoRA with '+', which fmerge does not support. If "
                          f"the adapter was trained on base_model, list the adapter folder itself as the model "
                          f"(fmerge adds its B·A·alpha/r to the base); otherwise merge it into its model first.")
    for root in (config_dir, Path.cwd()):
        p = (root / ref).expanduser()
        try:
            if p.exists():
                return str(p.resolve())
        except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
            raise RecipeError(f"{where}: {quoted(ref, 80)} cannot name a model directory "
                              f"({getattr(exc, 'strerror', None) or exc}).")
    if _HUB_ID.match(ref) and not (config_dir / ref.split("/")[0]).exists():
        return ref  # 'org/name' is a hub id unless 'org' is a local directory (then a path that is missing)
    raise RecipeError(f"{where}: model directory {quoted(ref, 80)} does not exist (looked beside the config, in "
                      f"{config_dir}, and in the working directory), nor is it a hub id of the form org/name.")


def _model_name(ref: str, taken: set[str]) -> str:
    name = _NAME_BAD.sub("_", Path(ref.rstrip("/")).name) or "model"
    if not name[0].isalnum():
        name = "m" + name
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _slice_list(slices, where) -> list[list[tuple[dict, tuple]]]:
    """Each slice's sources, checked for shape: (source entry, its place in the config)."""
    if not isinstance(slices, list) or not slices:
        raise RecipeError(f"{where(('slices',))}: 'slices' must be a non-empty list of {{sources: [{{model, "
                          f"layer_range}}]}} (mergekit's slices are not supported in any other form), got "
                          f"{quoted(slices, 80)}.")
    out = []
    for i, entry in enumerate(slices):
        at = ("slices", i)
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise RecipeError(f"{where(at)}: each slice needs 'sources', a non-empty list of {{model, layer_range}}; "
                              f"got {quoted(entry, 80)}.")
        for key in entry:
            if key not in ("sources", "parameters"):
                raise RecipeError(f"{where(at + (key,))}: '{key}' in a slice is not supported (fmerge reads "
                                  f"'sources' and 'parameters'){_hint(key, ['sources', 'parameters'])}.")
        sources = []
        for j, src in enumerate(entry["sources"]):
            sat = at + ("sources", j)
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise RecipeError(f"{where(sat)}: a slice source needs 'model' and 'layer_range' ([start, end), "
                                  f"end excluded), got {quoted(src, 80)}.")
            for key in src:
                if key not in ("model", "layer_range", "parameters"):
                    raise RecipeError(f"{where(sat + (key,))}: unknown key"
                                      f"{_hint(key, ['model', 'layer_range', 'parameters'])}.")
            lr = src["layer_range"]
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in lr) and 0 <= lr[0] < lr[1]):
                raise RecipeError(f"{where(sat + ('layer_range',))}: layer_range is [start, end) with 0 ≤ start < "
                                  f"end, got {quoted(lr, 80)}.")
            sources.append((src, sat))
        out.append(sources)
    return out


def _layers_of(path: str, where: str) -> int:
    from .slices import layer_count

    config = Path(path) / "config.json"
    if not config.is_file():
        raise RecipeError(f"{where}: slices need the model's layer count from {config}, which does not exist "
                          f"(a hub id must be downloaded first).")
    return layer_count(config, where)


def _one_full_slice(slices, where, config_dir: Path, method: str) -> list[dict]:
    """The `models:` list equal to one slice whose sources each cover all their model's layers."""
    sliced = _slice_list(slices, where)
    if len(sliced) == 1 and "parameters" not in slices[0]:
        models = []
        for src, sat in sliced[0]:
            path = _resolve_model_path(src["model"], where(sat + ("model",)), config_dir)
            if src["layer_range"] != [0, _layers_of(path, where(sat))]:
                break
            models.append({k: v for k, v in src.items() if k != "layer_range"})
        else:
            return models
    raise RecipeError(f"{where(('slices',))}: with merge_method {method}, slices are supported only as one slice whose "
                      f"sources each cover all of their model's layers (the same merge as a 'models:' list); "
                      f"merging some layer ranges only is not supported. Use passthrough to stack layers, or "
                      f"'models:' to merge whole models.")


def _stacked_recipe(data: dict, where, file: Path | None, config_dir: Path) -> dict:
    """A passthrough frankenmerge as a `stack_layers` step (fmerge/slices.py)."""
    for key in ("base_model", "models"):
        if data.get(key) is not None:
            raise RecipeError(f"{where((key,))}: passthrough slices take every tensor from the slices' models; "
                              f"remove '{key}'.")
    global_params = data.get("parameters") or {}
    if not isinstance(global_params, dict) or set(global_params) - {"scale"}:
        raise RecipeError(f"{where(('parameters',))}: passthrough takes only 'scale' as a parameter, got "
                          f"{quoted(global_params, 80)}.")
    taken: set[str] = set()
    models: dict[str, str] = {}
    names_by_path: dict[str, str] = {}
    stack = []
    for i, sources in enumerate(_slice_list(data["slices"], where)):
        if len(sources) != 1:
            raise RecipeError(f"{where(('slices', i, 'sources'))}: passthrough takes one source per slice "
                              f"(it copies layers, it merges nothing); this slice has {len(sources)}.")
        src, sat = sources[0]
        path = _resolve_model_path(src["model"], where(sat + ("model",)), config_dir)
        if path not in names_by_path:
            names_by_path[path] = _model_name(src["model"], taken)
            models[names_by_path[path]] = path
        start, end = src["layer_range"]
        if end > _layers_of(path, where(sat)):
            raise RecipeError(f"{where(sat + ('layer_range',))}: layer_range {[start, end]} goes past the model's "
                              f"{_layers_of(path, where(sat))} layers.")
        params = {**global_params, **(data["slices"][i].get("parameters") or {}), **(src.get("parameters") or {})}
        if set(params) - {"scale"}:
            raise RecipeError(f"{where(sat + ('parameters',))}: passthrough takes only 'scale' as a parameter, got "
                              f"{', '.join(sorted(set(params) - {'scale'}))}.")
        entry = {"model": names_by_path[path], "layers": [start, end]}
        if "scale" in params:
            entry["scale"] = _spec(params["scale"], where(sat + ("parameters", "scale")))
        stack.append(entry)
    step: dict[str, Any] = {"kind": "stack_layers", "slices": stack}
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype:
        step["out_dtype"] = str(out_dtype)
    step["export"] = f"{file.stem if file else 'mergekit'}-merged"
    return {"name": "mergekit passthrough" + (f" ({file.name})" if file else ""),
            "base": models[stack[0]["model"]], "models": models, "steps": {"merge": step}}


def recipe_from_mergekit(data: dict, lines, file: Path | None) -> dict:
    """The fmerge recipe (a dict, as parsed YAML) equivalent to a mergekit config."""
    try:
        recipe = _convert(data, lines, file)
    except FmergeError as exc:
        raise type(exc)(f"{exc} (Read as a mergekit config because it has 'merge_method'.)") from None
    if "allow_crimes" in data:  # mergekit's --allow-crimes, which its command line takes and its configs do not
        recipe["allow_crimes"] = data["allow_crimes"]
    return recipe


def _convert(data: dict, lines, file: Path | None) -> dict:
    where = lines.where
    for key in data:
        if key in UNSUPPORTED_TOP:
            raise RecipeError(f"{where((key,))}: mergekit's '{key}' is not supported by fmerge; only plain "
                              f"configs (merge_method, base_model, models, parameters, dtype, out_dtype) are read.")
        if key not in TOP_KEYS:
            raise RecipeError(f"{where((key,))}: unknown mergekit key{_hint(key, TOP_KEYS)} (mergekit would "
                              f"ignore it; fmerge refuses to guess).")
    method = data["merge_method"]
    if not isinstance(method, str) or method not in METHODS:
        shared = ", ".join(sorted(METHODS))
        why = (" (a mergekit method fmerge does not share)" if method in NOT_SHARED
               else _hint(method, METHODS) if isinstance(method, str) else "")
        raise RecipeError(f"{where(('merge_method',))}: merge_method {quoted(method, 80)} is not supported{why}"
                          f"{'' if why.endswith('?') else '.'} "
                          f"Methods both tools share: {shared}.")
    spec = METHODS[method]
    config_dir = file.parent if file else Path.cwd()

    tok = data.get("tokenizer_source")
    if tok not in (None, "base") and tok != data.get("base_model"):
        raise RecipeError(f"{where(('tokenizer_source',))}: tokenizer_source {quoted(tok, 80)} is not supported. "
                          + TOKENIZER_REFUSAL)
    if data.get("tokenizer") is not None:
        raise RecipeError(f"{where(('tokenizer',))}: a 'tokenizer' block is not supported. " + TOKENIZER_REFUSAL)
    if "slices" in data:
        if "models" in data:
            raise RecipeError(f"{where(('slices',))}: 'slices' together with 'models' is not supported: give one of "
                              f"them (slices for layer ranges, models for whole models).")
        if method == "passthrough":
            return _stacked_recipe(data, where, file, config_dir)
        data = {**data, "models": _one_full_slice(data["slices"], where, config_dir, method)}
    elif method == "passthrough":
        raise RecipeError(f"{where(('merge_method',))}: passthrough stacks layers given by 'slices' (a "
                          f"frankenmerge); this config has no 'slices'.")

    global_params = data.get("parameters") or {}
    if not isinstance(global_params, dict):
        raise RecipeError(f"{where(('parameters',))}: 'parameters' must be a mapping of parameter: value "
                          f"(e.g. {{normalize: true}}), got {quoted(global_params, 80)}.")
    for key in global_params:
        if key not in spec:
            raise RecipeError(f"{where(('parameters', key))}: unknown parameter for merge_method {method}"
                              f"{_hint(key, spec)} (mergekit would silently ignore it).")

    base_ref = data.get("base_model")
    if base_ref is None and method not in ("linear", "nuslerp"):
        raise RecipeError(f"{file or '<config>'}: merge_method {method} needs 'base_model'.")
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise RecipeError(f"{where(('models',))}: 'models' must be a non-empty list of {{model, parameters}}, "
                          f"got {quoted(models_raw, 80)}.")

    taken: set[str] = set()
    base_path = _resolve_model_path(base_ref, where(("base_model",)), config_dir) if base_ref is not None else None
    models: dict[str, str] = {}
    per_model: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(models_raw):
        at = ("models", i)
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{where(at)}: each entry needs 'model' (and optional 'parameters'), got "
                              f"{quoted(entry, 80)}.")
        for key in entry:
            if key not in ("model", "parameters"):
                raise RecipeError(f"{where(at + (key,))}: unknown key{_hint(key, ['model', 'parameters'])}.")
        ref = entry["model"]
        path = _resolve_model_path(ref, where(at + ("model",)), config_dir)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"{where(at + ('parameters',))}: a model's 'parameters' must be a mapping of "
                              f"parameter: value (e.g. {{weight: 0.5}}), got {quoted(params, 80)}.")
        if method != "linear" and base_path is not None and path == base_path:
            continue  # mergekit treats the base model listed among the models as the base
        for key in params:
            if key not in spec:
                raise RecipeError(f"{where(at + ('parameters', key))}: unknown parameter for merge_method "
                                  f"{method}{_hint(key, spec)} (mergekit would silently ignore it).")
            if spec[key][0] == "global":
                raise RecipeError(f"{where(at + ('parameters', key))}: '{key}' is one value for the whole merge "
                                  f"in mergekit; give it under the top-level 'parameters'.")
        name = _model_name(ref, taken)
        models[name] = path
        per_model[name] = {k: (v, at + ("parameters", k)) for k, v in params.items()}
    if not models:
        raise RecipeError(f"{where(('models',))}: no model to merge besides the base model.")

    def model_values(key: str) -> dict[str, Any]:
        default = spec[key][1]
        glob = _spec(global_params[key], where(("parameters", key))) if key in global_params else None
        out = {}
        for name, params in per_model.items():
            if key in params:
                value, at = params[key]
                out[name] = _with_fallback(_spec(value, where(at)), glob if glob is not None else default)
            elif glob is not None:
                out[name] = glob
            elif default is not None:
                out[name] = default
            else:
                raise RecipeError(f"{where(('models',))}: model '{name}' has no '{key}' (required by mergekit's "
                                  f"{method}; give it per model or under 'parameters').")
        return out

    def flag(key: str) -> bool:
        value = global_params.get(key, spec[key][1])
        if not isinstance(value, bool):
            raise RecipeError(f"{where(('parameters', key))}: '{key}' must be true or false, got {quoted(value, 80)}.")
        return value

    def scalar_weights_normalized(weights: dict[str, Any], key_where) -> dict[str, Any]:
        if not all(_is_number(w) for w in weights.values()):
            raise RecipeError(f"{key_where}: normalize: true with weights that vary by tensor is supported for "
                              f"{', '.join(m for m in METHODS if METHODS[m].get('normalize', ('', False))[1])} only; "
                              f"give plain numbers or normalize: false.")
        total = sum(weights.values())
        total = 1.0 if abs(total) < 1e-8 else total  # mergekit's guard
        return {n: w / total for n, w in weights.items()}

    if "int8_mask" in spec:
        flag("int8_mask")  # accepted for compatibility: a memory option of mergekit's, no effect on the result
    lam = _spec(global_params["lambda"], where(("parameters", "lambda"))) if "lambda" in global_params else 1.0
    listed = f"{len(models)} ({', '.join(models)})"
    if method == "linear":
        fmerge_method, params = "weighted_average", {"weights": model_values("weight"), "normalize": flag("normalize")}
    elif method == "task_arithmetic":
        weights = model_values("weight")
        if flag("normalize"):
            weights = scalar_weights_normalized(weights, where(("parameters", "normalize")))
        fmerge_method, params = "task_arithmetic", {"lambda": lam, "weight": weights}
    elif method == "ties":
        if flag("rescale"):
            raise RecipeError(f"{where(('parameters', 'rescale'))}: rescale: true (L1 rescaling after the "
                              f"magnitude trim) is not supported for ties.")
        fmerge_method = "ties"
        params = {"density": model_values("density"), "weight": model_values("weight"), "lambda": lam,
                  "merge": "mean" if flag("normalize") else "sum", "rule": "mergekit"}
    elif method in ("dare_ties", "dare_linear"):
        p = {n: _map(d, lambda v: 1.0 - v) for n, d in model_values("density").items()}
        fmerge_method = "dare"
        params = {"p": p, "rescale": flag("rescale"), "lambda": lam}
        weights = model_values("weight")
        if method == "dare_ties":
            params.update(combine="ties", merge="mean" if flag("normalize") else "sum", weight=weights,
                          rule="mergekit")
        else:
            if flag("normalize"):
                weights = scalar_weights_normalized(weights, where(("parameters", "normalize")))
            params.update(combine="task_arithmetic", weight=weights)
    elif method in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        fmerge_method = method.split("_")[0]
        params = {"density": model_values("density"), "weight": model_values("weight"), "lambda": lam,
                  "combine": "task_arithmetic" if method in ("breadcrumbs", "della_linear") else "ties",
                  "merge": "mean" if flag("normalize") else "sum", "rescale": flag("rescale"), "rule": "mergekit"}
        extra = "gamma" if fmerge_method == "breadcrumbs" else "epsilon"
        params[extra] = model_values(extra)
    elif method == "slerp":
        if len(models) != 1:
            raise RecipeError(f"{where(('models',))}: slerp interpolates base_model and exactly one other model; "
                              f"this config has {listed} besides the base.")
        if "t" not in global_params:
            raise RecipeError(f"{where(('parameters',))}: slerp needs 't' under 'parameters' (0 = base_model, 1 = "
                              f"the other model; a list is interpolated over layer depth).")
        fmerge_method, params = "slerp", {"t": _spec(global_params["t"], where(("parameters", "t")))}
    elif method == "nuslerp":
        if len(models) != 2:
            raise RecipeError(f"{where(('models',))}: nuslerp interpolates exactly two models besides the base; "
                              f"this config has {listed}.")
        over = "tensor" if flag("nuslerp_flatten") else "columns" if flag("nuslerp_row_wise") else "rows"
        fmerge_method = "nuslerp"
        params = {"weight": model_values("weight"), "over": over, "task_vectors": base_path is not None}
    else:  # model_stock
        if len(models) < 2:
            raise RecipeError(f"{where(('models',))}: model_stock needs at least two models besides the base; "
                              f"this config has {listed}.")
        fmerge_method, params = "model_stock", {"filter_wise": flag("filter_wise")}

    step: dict[str, Any] = {"kind": "merge", "method": fmerge_method, "params": params}
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype:
        step["out_dtype"] = str(out_dtype)
    stem = file.stem if file else "mergekit"
    step["export"] = f"{stem}-merged"  # beside the config: recipe paths resolve against its directory
    return {
        "name": f"mergekit {method}" + (f" ({file.name})" if file else ""),
        "base": base_path or next(iter(models.values())),
        "models": models,
        "steps": {"merge": step},
    }
