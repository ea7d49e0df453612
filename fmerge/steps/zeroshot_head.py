"""The `zeroshot_head` step: each CLIP task's zero-shot head, computed once from the base's text tower.

A head's key is the content of what determines it: the base's tensors outside the vision tower
(text tower, projections, logit scale), its config and tokenizer files, the class names and the templates;
never a model name, so a reused hub id with new weights cannot serve a stale head. A
recipe needs this step only to precompute heads (or to see them in `fmerge status`): the Fisher,
eval, gram and iterative steps declare a CLIP task's head as a dependency (`head_dependency`) and
the executor computes it, under its lock, before them.

The artifact holds `head` (classes × projection dim, unit rows), and the base's
`visual_projection` and `logit_scale`: with a vision tower, everything the classifier needs.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from pydantic import Field

from ..clip import GENERIC_TEMPLATES, builtin_task, names_from_labels, text_side_hash, zeroshot_head
from ..data import label_names_for, load_dataset_split
from ..errors import ModelError, RecipeError
from ..io import ModelDir
from ..recipe import BASE, Strict
from ..store import make_key
from .base import Planned, StepKind, register

VERSION = 2  # 2: the meta's labels name the classes (the classifier's id2label)


class ZeroshotHeadConfig(Strict):
    models: list[str] | None = Field(None, description="models whose tasks get heads (default: all)")


@register
class ZeroshotHeadStep(StepKind):
    kind = "zeroshot_head"
    Config = ZeroshotHeadConfig

    def model_refs(self, cfg):
        return [("models", m) for m in cfg.models or []]

    def models_used(self, cfg, recipe):
        return cfg.models or list(recipe.models)

    def check(self, recipe, name, cfg):
        for m in self.models_used(cfg, recipe):
            data = recipe.models[m].data
            if data is None or recipe.spec.data[data].image is None:
                raise RecipeError(f"{recipe.where('steps', name)}: model '{m}' has no image task; a zero-shot "
                                  f"head needs 'data: <entry with an image column>' in models.{m}.")

    def plan(self, rt, name, cfg, upstream):
        return [head_planned(rt, m, name) for m in self.models_used(cfg, rt.recipe)]

    def compute(self, rt, name, cfg, todo):
        encoder = TextEncoder(rt)
        for p in todo:
            write_head(rt, p, encoder)


def prompts(rt, data: str) -> tuple[list[str] | None, list[str]]:
    """(class names in label order, templates) of a CLIP task as the recipe and the built-in table
    give them, reading no data: class names are None when they must come from the dataset."""
    d = rt.recipe.spec.data[data]
    builtin = builtin_task(d.classnames if isinstance(d.classnames, str) else data) or {}
    classnames = d.classnames if isinstance(d.classnames, list) else builtin.get("classnames")
    if classnames is None and d.label_names:
        classnames = names_from_labels(d.label_names)
    builtin = builtin_task(d.templates if isinstance(d.templates, str) else data) or {}
    templates = d.templates if isinstance(d.templates, list) else builtin.get("templates") or GENERIC_TEMPLATES
    return (list(classnames) if classnames is not None else None), list(templates)


def labels_from_data(rt, data: str) -> list[str]:
    """The dataset's label names (a ClassLabel column's, or its sorted string labels), which define
    the head's classes in that order (the head records them as its id2label)."""
    from ..tasks import data_spec

    d = rt.recipe.spec.data[data]
    where = rt.recipe.where("data", data)
    labels = None
    if d.label is not None:
        spec = data_spec(rt, data, d.test_split)
        labels = label_names_for(load_dataset_split(spec), spec)
    if not labels:
        raise RecipeError(f"{where}: CLIP task '{data}' has no class names: give 'classnames' (a list in label "
                          f"order) or 'label_names', or use a dataset whose label column is a ClassLabel.")
    return labels


def head_planned(rt, model: str, step: str = "") -> Planned:
    """A task's head: keyed by the base's text side, the prompts, and, where class names come from
    the dataset, the data's content (read when the head is computed, not now)."""
    from ..tasks import TOKENIZER_FILES, data_inputs, task_data

    data = task_data(rt, model, ("models", model))
    classnames, templates = prompts(rt, data)
    params = {"classnames": classnames, "templates": templates}
    # the text side's tensors, and the base's config and tokenizer files (TextEncoder reads them)
    inputs = {"text_side": text_hash(rt), "side": rt.data_hashes.named_files(rt.model_dir(BASE), TOKENIZER_FILES)}
    if classnames is None:
        inputs["labels_from"] = data_inputs(rt, data, rt.recipe.spec.data[data].test_split)
    return Planned(step, model, "zeroshot_head", make_key("zeroshot_head", params, inputs, VERSION), inputs,
                   params, VERSION, {"data": data})


def head_dependency(rt, model: str) -> tuple[dict[str, str], list[Planned]]:
    """({"head": key}, [the head's planned artifact]) for a CLIP task, ({}, []) for any other:
    what a step using the task's classifier adds to its inputs and its dependencies."""
    from ..tasks import is_image_task

    if not is_image_task(rt, model):
        return {}, []
    head = head_planned(rt, model)
    return {"head": head.key}, [head]


def text_hash(rt) -> str:
    """`clip.text_side_hash` of the base, remembered per base content hash (hashing a text tower
    costs seconds; the base's content hash is itself cached by file stamp)."""
    if rt.spec(BASE).from_step is not None:
        raise RecipeError(f"{rt.recipe.where('base')}: a CLIP recipe's base must be a CLIPModel checkpoint "
                          f"(directory or hub id), not a step's output.")
    base_hash = rt.model_hash(BASE)
    if base_hash in _TEXT_HASHES:  # every CLIP task of every step asks: read the cache file once
        return _TEXT_HASHES[base_hash]
    _TEXT_HASHES[base_hash] = _text_hash(rt, base_hash)
    return _TEXT_HASHES[base_hash]


_TEXT_HASHES: dict[str, str] = {}  # base content hash -> text-side hash, for this process


def _text_hash(rt, base_hash: str) -> str:
    cache = rt.store.root / "cache" / "clip_text_tensor_hashes.json"  # the tensors' hash only (no tokenizer)
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if base_hash in known:
        return known[base_hash]
    digest = text_side_hash(_full_base(rt))
    if not rt.store.writable:
        return digest
    try:
        from filelock import FileLock

        with FileLock(str(cache) + ".lock"):
            try:
                known = json.loads(cache.read_text())
            except (OSError, json.JSONDecodeError):
                known = {}
            known[base_hash] = digest
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
    except OSError:
        pass  # a read-only store hashes again next time
    return digest


def _full_base(rt) -> ModelDir:
    """The whole base checkpoint (rt.source serves only its vision tower in a CLIP recipe)."""
    src = rt.source(BASE)
    return getattr(src, "inner", src)


class TextEncoder:
    """The base CLIPModel's text side, loaded on first use: projected text features of prompts."""

    def __init__(self, rt):
        self.rt, self.net, self.tokenizer = rt, None, None

    def _load(self):
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        rt = self.rt
        directory = rt.model_dir(BASE)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        if config.model_type != "clip":
            raise ModelError(f"{rt.recipe.where('base')}: zero-shot heads need the base CLIPModel checkpoint "
                              f"(with its text tower); {directory} holds a '{config.model_type}' model.")
        full = _full_base(rt)
        net = CLIPModel(config)
        missing, _ = net.load_state_dict({n: full.get(n) for n in full.names()}, strict=False)
        needed = [m for m in missing if not m.startswith("vision_model.") and not m.endswith("position_ids")]
        if needed:
            raise ModelError(f"{rt.recipe.where('base')}: the base checkpoint lacks {len(needed)} tensor(s) of "
                              f"CLIP's text side, e.g. {', '.join(needed[:3])}; zero-shot heads need a full CLIPModel.")
        self.net = net.eval().to(rt.device)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.max_length = config.text_config.max_position_embeddings

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.net is None:
            self._load()
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.rt.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        pooled = self.net.text_model(**enc).pooler_output
        return self.net.text_projection(pooled)


def write_head(rt, p: Planned, encoder: TextEncoder) -> None:
    full = _full_base(rt)
    labels = p.params["classnames"] or labels_from_data(rt, p.extra["data"])
    classnames = p.params["classnames"] or names_from_labels(labels)
    with torch.no_grad():
        head = zeroshot_head(encoder, classnames, p.params["templates"]).cpu()
    with rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version) as writer:
        writer.write("head", head)
        writer.write("visual_projection", full.get("visual_projection.weight").float())
        writer.write("logit_scale", full.get("logit_scale").float().reshape(()))
        prompts_id = hashlib.blake2b(json.dumps(p.params).encode(), digest_size=8).hexdigest()
        writer.commit({"step": p.step, "model": p.label, "data": p.extra["data"], "classes": head.shape[0], "labels": labels,
                       "templates": len(p.params["templates"]), "prompts": prompts_id})
