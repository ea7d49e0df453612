"""A model's task: its data, tokenizer and a runnable classifier, for the data-aware steps."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import DataSpec, label_names_for, load_dataset_split, select_examples
from .errors import FmergeError
from .io import ModelDir
from .recipe import BASE


def data_spec(rt, data_name: str, split: str) -> DataSpec:
    d = rt.recipe.spec.data[data_name]
    local = rt.recipe.resolve(d.path)
    path = str(local) if local.exists() else d.path
    return DataSpec(path=path, text_column=d.text, text_pair_column=d.text_pair, label_column=d.label,
                    split=split, config=d.config)


def task_data(rt, model: str, where: tuple) -> str:
    data = rt.recipe.models[model].data
    if data is None:
        raise FmergeError(f"{rt.recipe.where(*where)}: model '{model}' has no task data; give it "
                          f"'data: <name of an entry in data>' in models.")
    return data


def load_examples(rt, data_name: str, split: str, n: int | None, seed: int):
    """(rows, fingerprint, label names) of a seeded subset (all rows if n is None or larger)."""
    spec = data_spec(rt, data_name, split)
    ds = load_dataset_split(spec)
    names = rt.recipe.spec.data[data_name].label_names or label_names_for(ds, spec)
    count = len(ds) if n is None else min(n, len(ds))
    subset, fingerprint = select_examples(ds, count, seed, source=f"{data_name}:{split}")
    return spec, subset, fingerprint, names


def tokenizer_dir(rt, model: str) -> Path:
    """The model's own tokenizer if its directory has one, else the base's."""
    for name in (model, BASE):
        d = rt.model_dir(name) if rt.spec(name).from_step is None else None
        if d is not None and any((d / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            return d
    raise FmergeError(f"No tokenizer found for model '{model}' nor the base model.")


def load_tokenizer(rt, model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(rt, model), local_files_only=True)


def model_config(rt, model: str):
    """The transformers config of a model: its directory's, or the one its finetune step recorded."""
    from transformers import AutoConfig

    spec = rt.spec(model)
    if spec.from_step is not None:
        meta = rt.store.open(rt.planned[spec.from_step][0].key).meta
        cfg = dict(meta["config"])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoConfig.from_pretrained(rt.model_dir(model), local_files_only=True,
                                      trust_remote_code=rt.recipe.spec.trust_remote_code)


def build_classifier(rt, model: str, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The model as a runnable sequence classifier; `weights` (model naming) override its own."""
    from transformers import AutoModelForSequenceClassification

    config = model_config(rt, model)
    config._attn_implementation = "eager"
    net = AutoModelForSequenceClassification.from_config(config)
    src = rt.source(model)
    state = {n: src.get(n) for n in src.names()}
    if weights:
        state.update(weights)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing:
        raise FmergeError(f"Model '{model}': its weights lack {len(missing)} tensor(s) the architecture "
                          f"needs, e.g. {', '.join(missing[:3])}.")
    del unexpected  # e.g. a pooler a classifier does not use
    return net.eval().to(rt.device)


def is_model_dir(src) -> bool:
    return isinstance(src, ModelDir)
