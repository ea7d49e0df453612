"""PEFT LoRA adapters as full models: the base's weights with each adapted weight replaced by
W + ΔW, so that merging sees whole models and never averages A and B factors apart (the average of
products is not the product of averages).

ΔW = B·A·s per adapted module (transposed for fan_in_fan_out layers, e.g. GPT-2's Conv1D; for an
embedding, (B·A)ᵀ), s = lora_alpha / r, or lora_alpha / √r with use_rslora; r is each module's
rank read from its A matrix (so rank_pattern needs no parsing). Names: PEFT saves
`base_model.model.<module>.lora_A.weight` for the base's `<module>.weight`; other tensors it saves
(modules_to_save, trained biases) replace the base's tensor of the same name; a LoRA layer's own
tensors, saved as `<module>.base_layer.weight`/`.bias` (a trained bias with `bias: lora_only` or
`all`, an adapted embedding saved whole), stand for the base's `<module>.weight`/`.bias`, ΔW added
to a saved weight as to the base's. The adapter is
applied to the recipe's base model, computed in fp32. Refused, with the reason: other PEFT types,
DoRA, alpha_pattern, convolution LoRA, and adapter tensors that match no base tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

from .errors import ModelError
from .io import ModelDir, TensorSource

ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<which>[AB])(?:\.weight)?$")
BASE_LAYER = re.compile(r"\.base_layer\.(?=(weight|bias)$)")  # PEFT's LoRA layer wraps the base's module


def is_adapter_dir(path: Path | None) -> bool:
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_refusal(path: Path, label: str) -> str:
    """Why an adapter folder cannot be read as a model on its own, and what to do."""
    return (f"Model '{label}': {path} is a PEFT adapter ({ADAPTER_CONFIG}), not a full model: its LoRA factors are "
            f"no weights of their own. fmerge applies an adapter to the recipe's base model when the adapter is one "
            f"of the models to merge (ΔW = B·A·alpha/r added to the base's weight); it cannot serve as the base, nor "
            f"be used where a complete model is loaded. Merge it into its base first (PEFT's merge_and_unload) and "
            f"give that directory.")


def read_adapter_config(path: Path, label: str) -> dict:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"Model '{label}': cannot read {path / ADAPTER_CONFIG} ({exc}).") from None
    if not isinstance(config, dict):
        raise ModelError(f"Model '{label}': {path / ADAPTER_CONFIG} is not a JSON object.")
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r} (only LORA adapters are a sum W + B·A·scale)")
    if config.get("use_dora"):
        problems.append("use_dora is true (DoRA rescales each column by a learned magnitude; fmerge does not apply it)")
    if config.get("alpha_pattern"):
        problems.append("alpha_pattern is set (per-module alphas; fmerge applies one lora_alpha)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config.get(key) <= 0:
            problems.append(f"'{key}' is {config.get(key)!r}, not a positive number")
    if problems:
        raise ModelError(f"Model '{label}': the adapter in {path} cannot be applied: " + "; ".join(problems)
                         + ". Merge it into its base with PEFT (merge_and_unload) and give that directory.")
    return config


class LoraMerged:
    """A TensorSource: the base's tensors, with the adapter's ΔW added and its saved tensors in place."""

    def __init__(self, base: TensorSource, adapter: ModelDir, label: str):
        self.base, self.adapter, self.label = base, adapter, label
        self.config = read_adapter_config(adapter.path, label)
        self.rslora = bool(self.config.get("use_rslora"))
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        base_names = set(base.names())
        factors: dict[str, dict[str, str]] = {}
        self.replaced: dict[str, str] = {}  # base name -> adapter tensor replacing it
        unmatched = []
        for name in adapter.names():
            inner = BASE_LAYER.sub(".", name[len(PREFIX):] if name.startswith(PREFIX) else name)
            m = FACTOR.match(inner)
            if m:
                factors.setdefault(m.group("module") + ".weight", {})[m.group("which") + ("e" if m.group("embedding") else "")] = name
            elif inner in base_names and tuple(adapter.shape(name)) == tuple(base.shape(inner)):
                self.replaced[inner] = name
            else:
                unmatched.append(name)
        self.deltas: dict[str, tuple[str, str, bool]] = {}  # base weight -> (A, B, embedding)
        for weight, parts in factors.items():
            embedding = "Ae" in parts or "Be" in parts
            a, b = parts.get("Ae" if embedding else "A"), parts.get("Be" if embedding else "B")
            if a is None or b is None or weight not in base_names:
                unmatched.extend(n for n in parts.values())
                continue
            if len(adapter.shape(a)) != 2 or len(adapter.shape(b)) != 2:
                raise ModelError(f"Model '{label}': LoRA factor '{a}' is {len(adapter.shape(a))}-dimensional "
                                 f"(a convolution LoRA); fmerge applies LoRA to linear and embedding layers only. "
                                 f"Merge it into its base with PEFT (merge_and_unload) first.")
            self.deltas[weight] = (a, b, embedding)
        if unmatched:
            raise ModelError(f"Model '{label}': adapter tensors in {adapter.path} match no tensor of the base model "
                             f"({', '.join(repr(n) for n in unmatched[:3])}{' ...' if len(unmatched) > 3 else ''}): "
                             f"the adapter was trained on another model, or its names are not PEFT's "
                             f"({PREFIX}<module>.lora_A.weight). Give the base it was trained on.")
        if not self.deltas:
            raise ModelError(f"Model '{label}': the adapter in {adapter.path} holds no LoRA factors (lora_A/lora_B).")

    def scale(self, rank: int) -> float:
        alpha = float(self.config["lora_alpha"])
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def delta(self, weight: str) -> torch.Tensor:
        """ΔW of one adapted weight, in fp32, in the base weight's layout."""
        a_name, b_name, embedding = self.deltas[weight]
        a = self.adapter.get(a_name).to(torch.float32)
        b = self.adapter.get(b_name).to(torch.float32)
        product = (b @ a) * self.scale(a.shape[0])  # the module's rank r: A is r × in
        if embedding or self.fan_in_fan_out:
            product = product.T
        want = tuple(self.base.shape(weight))
        if tuple(product.shape) != want:
            raise ModelError(f"Model '{self.label}': B·A of '{a_name}' is {list(product.shape)} but the base's "
                             f"'{weight}' is {list(want)}: the adapter does not fit this base (or fan_in_fan_out "
                             f"is set wrongly in its {ADAPTER_CONFIG}).")
        return product

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.shape(name))

    def dtype(self, name: str) -> torch.dtype:
        if name in self.deltas:
            return torch.float32
        return self.adapter.dtype(self.replaced[name]) if name in self.replaced else self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        weight = self.adapter.get(self.replaced[name]) if name in self.replaced else self.base.get(name)
        return weight.to(torch.float32) + self.delta(name) if name in self.deltas else weight

    def content_key(self, adapter_hash: str, base_hash: str) -> str:
        """A content hash of the adapted model: the adapter's tensors, the settings that shape ΔW, the base."""
        settings = {"lora_alpha": self.config["lora_alpha"], "use_rslora": self.rslora,
                    "fan_in_fan_out": self.fan_in_fan_out}
        text = json.dumps({"adapter": adapter_hash, "base": base_hash, "settings": settings}, sort_keys=True)
        return "lora:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
