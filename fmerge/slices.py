"""Layer stacking, mergekit's passthrough `slices` ("frankenmerges"): the output's layers are layer
ranges of the source models, one after another, renumbered from 0.

A layer tensor is one whose name has a numbered block, `<blocks>.<n>.<rest>` (`model.layers.7.mlp...`,
`transformer.h.7...`), `<blocks>` being the prefix most tensors share. The other tensors come from
one model, as mergekit takes them: embeddings (names with `embed`, `wte` or `wpe`) from the first
slice's model, all others (final norm, output head) from the last slice's. A slice may scale its
tensors (`scale`, a number, or a value per tensor resolved as merge parameters are, at depth t
within the slice; the embeddings and the tail use the first and last slice's value at t = 0).
Layer counts are read from config.json (`num_hidden_layers`, or `n_layer`) and written back.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError, RecipeError
from .io import TensorSource
from .merging import resolve_value

LAYER_NAME = re.compile(r"^(?P<blocks>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")
EMBEDDING = re.compile(r"embed|(^|\.)wte\.|(^|\.)wpe\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")


@dataclass(frozen=True)
class Slice:
    model: str
    start: int
    end: int
    scale: Any = None


def layer_blocks(names: list[str]) -> str:
    """The prefix of the numbered layer blocks (`model.layers`), the one most tensor names share."""
    counts = Counter(m.group("blocks") for n in names if (m := LAYER_NAME.match(n)))
    if not counts:
        raise ModelError(f"No numbered layers among the tensors ({', '.join(names[:3])}, ...): slices stack "
                         f"layers named like model.layers.<n>.*; this model has none.")
    return counts.most_common(1)[0][0]


def layer_count(config_file: Path, what: str) -> int:
    """The number of layers config.json declares."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{what}: cannot read {config_file} ({exc}); slices need the model's config.json to "
                         f"know its number of layers.") from None
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    raise ModelError(f"{what}: {config_file} names no layer count ({' or '.join(LAYER_COUNT_KEYS)}).")


def stacked_config(config: dict, layers: int, source_layers: int, what: str) -> dict:
    """config.json of the stacked model: its layer count set; per-layer lists are refused, not guessed."""
    per_layer = [k for k, v in config.items() if isinstance(v, list) and len(v) == source_layers and source_layers > 1]
    if per_layer:
        raise ModelError(f"{what}: config.json has per-layer settings ({', '.join(per_layer)}) that stacking would "
                         f"have to rearrange; fmerge does not guess them. Stack layers of models without them.")
    key = next((k for k in LAYER_COUNT_KEYS if k in config), "num_hidden_layers")
    return {**config, key: layers}


def check_widths(sources: dict[str, TensorSource], stacked: dict[str, tuple], blocks: str, where: str) -> None:
    """Refuse a stack whose layers do not fit one another: each per-layer tensor (`<blocks>.<n>.<rest>`)
    must have the shape it has in the first stacked layer (another width, other heads). Only what is
    stacked is compared (a head taken from the last model alone may differ). Read from the files'
    headers, before anything is written."""
    first: dict[str, tuple[str, str, tuple]] = {}
    wrong = []
    for out, (model, inner, _, _) in stacked.items():
        m = LAYER_NAME.match(out)
        if not m or m.group("blocks") != blocks:
            continue
        shape = tuple(sources[model].shape(inner))
        ref = first.setdefault(m.group("rest"), (model, inner, shape))
        if ref[2] != shape:
            wrong.append((ref, (model, inner, shape)))
    if wrong:
        shown = "; ".join(f"'{a[1]}' is {list(a[2])} in {a[0]} but '{b[1]}' is {list(b[2])} in {b[0]}"
                          for a, b in wrong[:3])
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ModelError(f"{where}: the stacked layers do not fit together: {shown}{more}. Stacked, they would make "
                         f"a model that does not load; stack layers of models of one width (hidden size, heads).")


class StackedLayers:
    """The stacked model's tensors, read lazily from the source models (a TensorSource)."""

    def __init__(self, sources: dict[str, TensorSource], slices: list[Slice], where: str = "slices"):
        self.sources, self.slices, self.where = sources, slices, where
        first, last = sources[slices[0].model], sources[slices[-1].model]
        blocks = layer_blocks(first.names())
        self._map: dict[str, tuple[str, str, Any, float]] = {}  # output name -> (model, name, scale, t)
        for name in first.names():
            if not LAYER_NAME.match(name) and EMBEDDING.search(name):
                self._map[name] = (slices[0].model, name, slices[0].scale, 0.0)
        out_index = 0
        for i, s in enumerate(slices):
            src = sources[s.model]
            by_layer: dict[int, list[tuple[str, str]]] = {}
            for name in src.names():
                m = LAYER_NAME.match(name)
                if m and m.group("blocks") == blocks:
                    by_layer.setdefault(int(m.group("index")), []).append((name, m.group("rest")))
            for j, layer in enumerate(range(s.start, s.end)):
                if layer not in by_layer:
                    raise ModelError(f"{where}[{i}]: model '{s.model}' has no layer {layer} ({blocks}.{layer}.*); its "
                                     f"layers are 0..{max(by_layer, default=-1)}.")
                t = j / (s.end - s.start - 1) if s.end - s.start > 1 else 1.0
                for name, rest in by_layer[layer]:
                    self._map[f"{blocks}.{out_index}.{rest}"] = (s.model, name, s.scale, t)
                out_index += 1
        for name in last.names():
            if not LAYER_NAME.match(name) and not EMBEDDING.search(name):
                self._map[name] = (slices[-1].model, name, slices[-1].scale, 0.0)
        self.layers = out_index
        check_widths(sources, self._map, blocks, where)

    def names(self) -> list[str]:
        return list(self._map)

    def shape(self, name: str) -> tuple[int, ...]:
        model, inner, _, _ = self._map[name]
        return tuple(self.sources[model].shape(inner))

    def dtype(self, name: str) -> torch.dtype:
        model, inner, _, _ = self._map[name]
        return self.sources[model].dtype(inner)

    def get(self, name: str) -> torch.Tensor:
        model, inner, scale, t = self._map[name]
        tensor = self.sources[model].get(inner)
        value = resolve_value(scale, name, t, f"{self.where}: scale") if scale is not None else None
        if value is None or not tensor.is_floating_point():
            return tensor
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecipeError(f"{self.where}: scale resolved for tensor '{name}' to {value!r}; expected a number.")
        return (tensor.to(torch.float32) * value).to(tensor.dtype)
