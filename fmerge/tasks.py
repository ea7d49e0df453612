"""A model's task: its data, tokenizer and a runnable model, for the data-aware steps.

Task kinds (`task_kind`): `image` (a CLIP zero-shot task), `classification` (a sequence
classifier), `causal_lm` (language modelling: per-token loss over a text column) and
`multiple_choice` (a causal LM scoring each choice's log-likelihood). A data entry's `task` says
which; without it, an entry with `choices` is multiple choice, and otherwise the model's
config decides (`config_is_causal_lm`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .compat import usable_positions
from .data import (DataSpec, encode_batches, encode_choice_batches, encode_lm_batches, label_targets,
                   load_dataset_split, select_examples)
from .distributed import launched
from .errors import FmergeError, ModelError, RecipeError
from .finetune import MODEL_BUILD_LOCK
from .io import ModelDir
from .recipe import BASE


# Decoder-only model types, for a config that names no architecture (or only the bare body).
DECODER_ONLY_TYPES = frozenset({
    "bloom", "falcon", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj",
    "llama", "mistral", "mixtral", "olmo", "olmo2", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "smollm3", "stablelm", "starcoder2"})


def config_is_causal_lm(config: dict) -> bool:
    """Whether a config.json (as a dict) describes a causal LM: an architecture ending in ForCausalLM
    or LMHeadModel; or, naming no architecture with a head, a decoder-only model type."""
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    headless = all(a.endswith("Model") and not a.endswith("LMHeadModel") for a in archs)
    return headless and config.get("model_type") in DECODER_ONLY_TYPES


def raw_config(rt, model: str) -> dict:
    """A model's config as plain JSON, read without transformers (cheap enough for planning)."""
    spec = rt.recipe.base if model == BASE else rt.recipe.models[model]
    if spec.from_step is not None:
        return dict(rt.store.open(rt.output_of(spec.from_step)).meta["config"])
    local = rt.recipe.resolve(spec.path)
    file = (local if local.is_dir() else rt.model_dir(model)) / "config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        name = "base" if model == BASE else model
        raise ModelError(f"Model '{name}': cannot read {file} ({exc}); a model directory needs the transformers "
                         f"config.json saved with its weights.") from exc


def task_kind(rt, model: str) -> str:
    """'image', 'classification', 'causal_lm' or 'multiple_choice': the data entry's `task`, else
    multiple choice if it names `choices`, else what the model's config is (see module doc)."""
    data = rt.recipe.models[model].data if model in rt.recipe.models else None
    entry = rt.recipe.spec.data[data] if data is not None else None
    if entry is not None and entry.image is not None:
        return "image"
    if entry is not None and entry.task is not None:
        return entry.task
    if entry is not None and entry.choices is not None:
        return "multiple_choice"
    return "causal_lm" if config_is_causal_lm(raw_config(rt, model)) else "classification"


def model_kind(rt, model: str) -> str:
    """How `build_task_model` builds the model: 'clip', 'causal_lm' (also for multiple choice) or 'classifier'."""
    kind = task_kind(rt, model)
    return {"image": "clip", "classification": "classifier"}.get(kind, "causal_lm")


def data_task(rt, data_name: str) -> str:
    """The task kind of a data entry: its own say (`task`, `choices`, `image`), else what
    `task_kind` says for the first model using it that is a directory (a model a step makes, e.g.
    by fine-tuning, may not exist yet: the base's config stands for it)."""
    d = rt.recipe.spec.data[data_name]
    if d.image is not None or d.task is not None or d.choices is not None:
        return "image" if d.image else d.task or "multiple_choice"
    judged = _judging_model(rt, data_name)
    if judged is None:
        return "classification"
    try:
        config = raw_config(rt, judged)
    except ModelError:  # said when the model is built, by the step that needs it
        return "classification"
    return "causal_lm" if config_is_causal_lm(config) else "classification"


def _judging_model(rt, data_name: str) -> str | None:
    """The model directory whose config.json decides a data entry's task kind when the entry does
    not say it (`data_task`), or None."""
    d = rt.recipe.spec.data[data_name]
    if d.image is not None or d.task is not None or d.choices is not None:
        return None
    models = rt.recipe.models
    users = [m for m, spec in models.items() if spec.data == data_name]
    judged = next((m for m in users if models[m].from_step is None), BASE if users else None)
    if judged is None or (models[judged] if judged != BASE else rt.recipe.base).from_step is not None:
        return None
    return judged


def data_spec(rt, data_name: str, split: str) -> DataSpec:
    """The loader's spec of one split of a data entry: its own file (`splits`), a block of a
    partitioned file, or a split of a directory or hub dataset. A split the entry lacks is an error.
    Language-modelling data has no label column (an entry's `label` default is not asked for)."""
    recipe = rt.recipe
    d = recipe.spec.data[data_name]
    task = data_task(rt, data_name)
    d.rows_of(recipe, data_name, split)  # raises, naming the recipe key, if the entry has no such split
    partition = d.partition_for(recipe)
    if d.splits is not None:
        path = str(recipe.resolve(d.splits[split]))
    else:
        local = recipe.resolve(d.path)
        path = str(local) if local.exists() else d.path
    content = rt.data_hashes.tree(Path(path)) if Path(path).exists() else None  # cached by file stamp
    return DataSpec(path=path, content=content, text_column=d.image or d.text, text_pair_column=d.text_pair,
                    label_column=None if task == "causal_lm" else d.label, split=split, config=d.config,
                    partition=tuple(sorted(partition.items())) if partition else None,
                    partition_seed=d.partition_seed, prompt_column=d.prompt if task == "causal_lm" else None,
                    choices_column=d.choices if task == "multiple_choice" else None)


def task_data(rt, model: str, where: tuple) -> str:
    data = rt.recipe.models[model].data
    if data is None:
        raise RecipeError(f"{rt.recipe.where(*where)}: model '{model}' has no task data; give it "
                          f"'data: <name of an entry in data>' in models.")
    return data


@dataclass
class Subset:
    """A seeded subset of a task's rows, its label column (if any) holding `data.label_targets`."""

    spec: DataSpec
    rows: object  # datasets.Dataset


def load_subset(rt, data_name: str, split: str, n: int | None, seed: int, head=None) -> Subset:
    """A seeded subset of n rows (all rows if n is None or larger). `head`: the config (num_labels,
    id2label) of the classifier reading the labels; its label column is then replaced by each row's
    class index or target under the label rule (`data.label_targets`), checked over the whole
    split so that a bad row is refused whichever rows are drawn. Without it the rows are as read,
    for steps that read no labels (the spec they batch with has no label column)."""
    spec = data_spec(rt, data_name, split)
    ds = load_dataset_split(spec)
    if head is not None and spec.label_column is not None and spec.choices_column is None:
        targets = label_targets(ds, spec, head.num_labels, rt.recipe.spec.data[data_name].label_names,
                                getattr(head, "id2label", None))
        ds = ds.remove_columns(spec.label_column).add_column(spec.label_column, targets)
    count = len(ds) if n is None else min(n, len(ds))
    if count < (n or 0):
        rt.console.print(f"[yellow]warning[/]: {n} examples asked of data '{data_name}' (split '{split}'), "
                         f"which has {len(ds)} rows: all of them are used.", highlight=False)
    return Subset(spec, select_examples(ds, count, seed, source=f"{data_name}:{split}"))


def data_inputs(rt, data_name: str, split: str) -> dict:
    """What a data split contributes to a cache key: the content hash of its files and every
    setting that changes which rows or labels are read — never the entry's name or its path.
    Nothing is loaded: local files are hashed (once per stat stamp), a hub dataset is named."""
    d = rt.recipe.spec.data[data_name]
    settings = d.model_dump(mode="json", exclude={"path", "splits", "partition", "partition_seed"}, exclude_none=True)
    partition = d.partition_for(rt.recipe)
    if partition is not None:  # the shares actually used (defaults included) and their seed
        settings["partition"] = {"shares": partition, "seed": d.partition_seed}
    local = rt.recipe.resolve(d.path) if d.path else None
    if local is not None and local.exists():
        content = rt.data_hashes.tree(local)
    elif d.path:
        content = f"hub:{d.path}:{d.config or ''}"
    else:
        content = None
    files = getattr(d, "splits", None)
    if files:
        content = {s: rt.data_hashes.tree(rt.recipe.resolve(f)) for s, f in sorted(files.items())}
    inputs = {"content": content, "split": split, "settings": settings}
    judged = _judging_model(rt, data_name)
    if judged is not None and rt.model_dir(judged) is not None:  # its config.json decides the label column
        inputs["task_from"] = rt.data_hashes.named_files(rt.model_dir(judged), (CONFIG_FILE,))
    return inputs


CONFIG_FILE = "config.json"
# What AutoTokenizer.from_pretrained may read in a directory: the tokenizer's own files and the
# model's config.json (which it consults for the tokenizer's class).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", CONFIG_FILE)
# What AutoImageProcessor.from_pretrained may read: the processor's config and the model's.
PROCESSOR_FILES = ("preprocessor_config.json", CONFIG_FILE)


def side_inputs(rt, model: str) -> dict:
    """What running `model` reads besides its tensors, by content, for the key of a step that runs
    it: its config.json (a model a step made carries its config in that artifact, whose key is its
    hash) and its task's tokenizer or, for a CLIP task, image processor files, from the directory
    they are read from (its own, else the base's). No name or path enters; a missing file is
    simply absent. Merges read tensors only and do not take these."""
    inputs = {}
    directory = rt.model_dir(model) if rt.spec(model).from_step is None else None
    if directory is not None:
        inputs["config"] = rt.data_hashes.named_files(directory, (CONFIG_FILE,))
    if model != BASE and is_image_task(rt, model):
        where = _side_dir(rt, model, ("preprocessor_config.json",))
        inputs["processor"] = rt.data_hashes.named_files(where, PROCESSOR_FILES) if where else None
    else:
        where = _side_dir(rt, model, TOKENIZER_MARKERS)
        inputs["tokenizer"] = rt.data_hashes.named_files(where, TOKENIZER_FILES) if where else None
    return inputs


TOKENIZER_MARKERS = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")  # a directory that has a tokenizer


def _side_dir(rt, model: str, markers: tuple[str, ...]) -> Path | None:
    """The model's directory if it holds one of `markers` (tokenizer or processor files), else the
    base's, else None."""
    for name in (model, BASE):
        d = rt.model_dir(name) if rt.spec(name).from_step is None else None
        if d is not None and any((d / f).is_file() for f in markers):
            return d
    return None


def tokenizer_dir(rt, model: str) -> Path:
    """The model's own tokenizer if its directory has one, else the base's."""
    d = _side_dir(rt, model, TOKENIZER_MARKERS)
    if d is None:
        raise ModelError(f"No tokenizer found for model '{model}' nor the base model.")
    return d


def load_tokenizer(rt, model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(rt, model), local_files_only=True)


def model_config(rt, model: str):
    """The transformers config of a model: its directory's, or the one its finetune step recorded."""
    from transformers import AutoConfig

    spec = rt.spec(model)
    if spec.from_step is not None:
        meta = rt.store.open(rt.output_of(spec.from_step)).meta
        cfg = dict(meta["config"])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    try:
        return AutoConfig.from_pretrained(rt.model_dir(model), local_files_only=True,
                                          trust_remote_code=rt.recipe.spec.trust_remote_code)
    except (OSError, ValueError) as exc:  # no/invalid config.json, or custom code not trusted
        hint = (" Its config asks to run the model's own Python code, which fmerge does only when the "
                "recipe sets 'trust_remote_code: true'." if "trust_remote_code" in str(exc) else "")
        raise ModelError(f"Model '{rt.label(model)}': cannot read the transformers config in "
                          f"{rt.model_dir(model)} ({str(exc).splitlines()[0]}).{hint}") from exc


def build_classifier(rt, model: str, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The model as a runnable sequence classifier; `weights` (model naming) override its own."""
    from transformers import AutoModelForSequenceClassification

    config = model_config(rt, model)
    config._attn_implementation = "eager"
    with MODEL_BUILD_LOCK:  # see fmerge/finetune.py
        net = AutoModelForSequenceClassification.from_config(config)
    src = rt.source(model)
    state = {n: src.get(n) for n in src.names()}
    if weights:
        state.update(weights)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing:
        raise ModelError(f"Model '{model}': its weights lack {len(missing)} tensor(s) the architecture "
                          f"needs, e.g. {', '.join(missing[:3])}.")
    del unexpected  # e.g. a pooler a classifier does not use
    return placed(rt, net)


def placed(rt, net: torch.nn.Module) -> torch.nn.Module:
    """The model in eval mode on the run's device or, where the recipe sets `device_map`, spread
    over the devices by accelerate (each layer where `max_memory` leaves room, activations moved
    between them by hooks), so a model bigger than one GPU still runs."""
    spec = rt.recipe.spec
    if spec.device_map is None:
        return net.eval().to(rt.device)
    if launched():
        raise RecipeError(f"{rt.recipe.where('device_map')}: device_map spreads one model over this machine's "
                          f"devices, but this run is one of several torchrun processes, each with a device of its "
                          f"own; run without torchrun, or remove device_map.")
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        raise RecipeError(f"{rt.recipe.where('device_map')}: device_map '{spec.device_map}' spreads models over "
                          f"devices with accelerate, which is not installed here; `pip install accelerate` (or "
                          f"`pip install fmerge[big]`), or remove device_map to run each model on {rt.device}.") from None
    max_memory = {int(k) if k.isdigit() else k: v for k, v in spec.max_memory.items()} if spec.max_memory else None
    layout = infer_auto_device_map(net, max_memory=max_memory,
                                   no_split_module_classes=getattr(net, "_no_split_modules", None) or [])
    return dispatch_model(net.eval(), device_map=layout)


def is_image_task(rt, model: str) -> bool:
    """A CLIP zero-shot task: the model's data entry names an image column."""
    data = rt.recipe.models[model].data
    return data is not None and rt.recipe.spec.data[data].image is not None


def build_causal_lm(rt, model: str, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The model as a runnable causal LM (its own LM head; a head tied to the input embeddings, as
    saved without a copy of its own, is taken from them); `weights` (model naming) override its own."""
    from transformers import AutoModelForCausalLM

    config = model_config(rt, model)
    config._attn_implementation = "eager"
    try:
        with MODEL_BUILD_LOCK:
            net = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:  # a config of no causal-LM architecture
        raise ModelError(f"Model '{rt.label(model)}': its config (model_type '{config.model_type}') has no causal "
                         f"language-model architecture in transformers, so it cannot be run as a causal LM; set "
                         f"the data entry's task to 'classification' if it is a classifier.") from exc
    src = rt.source(model)
    state = {n: src.get(n) for n in src.names()}
    state.update(weights or {})
    params = dict(net.named_parameters(remove_duplicate=False))
    loaded = {id(params[n]) for n in state if n in params}
    missing, _ = net.load_state_dict(state, strict=False)
    # A missing name that is the same parameter as a loaded one is a tied copy (lm_head = embeddings).
    missing = [m for m in missing if not m.endswith("position_ids") and id(params.get(m)) not in loaded]
    if missing:
        raise ModelError(f"Model '{rt.label(model)}': its weights lack {len(missing)} tensor(s) a causal LM of its "
                         f"config needs, e.g. {', '.join(missing[:3])}; is it a causal LM (or a classifier, whose "
                         f"data entry should say task: classification)?")
    return placed(rt, net)


def build_task_model(rt, model: str, weights: dict[str, torch.Tensor] | None = None,
                     head: str | None = None) -> torch.nn.Module:
    """The runnable model of a model's task (see `model_kind`): a sequence classifier, a causal LM,
    or for a CLIP task the model's vision tower with the task's zero-shot head (artifact key
    `head`, a dependency the executor computed). `weights` (model naming) override its own."""
    kind = model_kind(rt, model)
    if kind == "clip":
        if head is None:
            raise FmergeError(f"Task '{model}' is a CLIP task but no zero-shot head was planned for it.")
        return build_clip_classifier(rt, model, rt.store.open(head), weights)
    if kind == "causal_lm":
        return build_causal_lm(rt, model, weights)
    return build_classifier(rt, model, weights)


def task_batches(rt, model: str, rows, spec: DataSpec, batch_size: int, max_length: int):
    """Batches of `rows` for the model's task model: tokenized text, or CLIP-processed images
    (`pixel_values`), with `labels` and `example_ids` as `data.encode_batches` gives them; for a
    causal LM, next-token `labels` (`data.encode_lm_batches`, or one row per choice with
    `choice_ids` for multiple choice: `data.encode_choice_batches`). `max_length` is capped at the
    model's position table (`capped_length`), whatever route asked for more."""
    kind = task_kind(rt, model)
    if kind != "image":
        max_length = capped_length(rt, model, max_length)
    if kind == "causal_lm":
        return encode_lm_batches(load_tokenizer(rt, model), rows, spec, batch_size, max_length)
    if kind == "multiple_choice":
        return encode_choice_batches(load_tokenizer(rt, model), rows, spec, batch_size, max_length)
    if kind != "image":
        return encode_batches(load_tokenizer(rt, model), rows, spec, batch_size, max_length)
    from .clip import image_batches
    from .data import EXAMPLE_ID_COLUMN, mapped_labels

    values = mapped_labels(rows, spec.label_column) if spec.label_column is not None else None
    ids = rows[EXAMPLE_ID_COLUMN] if EXAMPLE_ID_COLUMN in rows.column_names else None
    return image_batches(load_image_processor(rt, model), rows, spec.text_column, values, batch_size, ids)


def capped_length(rt, model: str, max_length: int) -> int:
    """`max_length`, or the model's usable positions if fewer (`compat.usable_positions`): a longer
    sequence would index past the position table (and crash, or read garbage)."""
    try:
        positions = usable_positions(raw_config(rt, model))
    except (ModelError, KeyError):  # no config to read: the model says so when it is built
        positions = None
    return min(max_length, positions) if positions else max_length


def load_image_processor(rt, model: str):
    """The model's own CLIP image processor if its directory has one, else the base's."""
    from transformers import AutoImageProcessor

    d = _side_dir(rt, model, ("preprocessor_config.json",))
    if d is not None:
        return AutoImageProcessor.from_pretrained(d, local_files_only=True)
    raise ModelError(f"No image processor (preprocessor_config.json) found for model '{model}' nor the base model.")


def build_clip_classifier(rt, model: str, head, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The model's vision tower (a CLIPVisionModel, or the vision part of a CLIPModel) with its
    task's zero-shot head; parameters are named `vision_model.*` like the tower's tensors."""
    from .clip import VISION_PREFIX, ClipClassifier, vision_tower_module

    config = model_config(rt, model)
    vision_config = getattr(config, "vision_config", config)
    vision_config._attn_implementation = "eager"
    with MODEL_BUILD_LOCK:
        tower = vision_tower_module(vision_config)
    src = rt.source(model)
    state = {n: src.get(n) for n in src.names()}
    state.update(weights or {})
    own = {n[len(VISION_PREFIX):]: t for n, t in state.items() if n.startswith(VISION_PREFIX)}
    missing, _ = tower.load_state_dict(own, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing:
        raise ModelError(f"Model '{model}': its vision tower lacks {len(missing)} tensor(s) the architecture "
                          f"needs, e.g. {', '.join(VISION_PREFIX + m for m in missing[:3])}.")
    net = ClipClassifier(tower, head.get("visual_projection"), head.get("head"), head.get("logit_scale"),
                         head.meta.get("labels"))
    return placed(rt, net)


def is_model_dir(src) -> bool:
    return isinstance(src, ModelDir)
