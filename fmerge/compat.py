"""Whether models' config.json files describe one architecture ("crimes", in mergekit's word, when not).

Merging averages tensors position by position; that means something only if every model runs
them the same way. Tensor shapes catch some differences (widths, vocabulary), not all: two Llamas
with different `rope_theta` have identical shapes and merge into a model neither of them is. So
before planning a merge, fmerge reads each model's config.json as plain JSON (cheap: no
transformers import) and compares the fields that define the computation, each under the names
model families give it:

- `model_type`: the family (the class name in `architectures` is not compared: its suffix is the
  head, BertModel vs BertForSequenceClassification, which fine-tunes change; its stem is the family
  `model_type` names);
- widths and counts: hidden size, intermediate size, layers, attention heads, key-value heads,
  head dimension, vocabulary, token types, experts and experts per token;
- positions: maximum positions, RoPE base (`rope_theta`) and scaling (`rope_scaling`, or
  transformers 5's `rope_parameters`: the two spellings of one setting compare equal), the rotary
  fraction, the position embedding type;
- the activation, the layer-norm epsilon, whether the output embeddings are tied to the input ones.

A field is compared only where both configs state it (transformers omits some defaults when it
saves), except the RoPE scaling, whose absence means none. Not compared, because a base and its
fine-tunes legitimately differ there: labels (`num_labels`, `id2label`, `label2id`,
`problem_type`, `finetuning_task`), dtype, `architectures`, `_name_or_path`,
`transformers_version`, `use_cache`, dropout rates, token ids, `sliding_window` (a serving limit
some fine-tunes change). Sub-configs that name a `model_type` (`text_config`, `vision_config`)
are compared field by field; a CLIP recipe compares only vision towers.
"""

from __future__ import annotations

from typing import Any

# the field as messages name it -> the names configs give it (the first one a config states is read)
ARCHITECTURE_FIELDS: dict[str, tuple[str, ...]] = {
    "model_type": ("model_type",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_key_value_heads": ("num_key_value_heads", "multi_query_group_num"),
    "head_dim": ("head_dim", "d_kv"),
    "vocab_size": ("vocab_size",),
    "type_vocab_size": ("type_vocab_size",),
    "num_experts": ("num_local_experts", "num_experts"),
    "num_experts_per_tok": ("num_experts_per_tok",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "partial_rotary_factor": ("partial_rotary_factor", "rotary_pct"),
    "position_embedding_type": ("position_embedding_type",),
    "hidden_act": ("hidden_act", "activation_function", "hidden_activation"),
    "layer_norm_eps": ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "norm_eps"),
    "tie_word_embeddings": ("tie_word_embeddings",),
}
# max_length (tokens per example, or per window of a text) when a step or command names none, on
# every route (recipe steps, `fmerge fisher`, `fmerge eval`, the API); always capped at the model's
# usable positions (tasks.capped_length), so a BERT reads 512 tokens and a tiny test model its own.
DEFAULT_MAX_LENGTH = 512
MAX_LENGTH_HELP = (f"tokens per example or per window of a language-modelling text (default {DEFAULT_MAX_LENGTH}, "
                   f"at most the model's position table; a classifier's longer texts are cut)")
# Model types whose position ids start after the padding index (RoBERTa's scheme): pad_token_id + 1
# rows of their position table are never a text's.
PADDING_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "roberta-prelayernorm",
                                      "data2vec-text", "mpnet", "xmod"})
# Fields a layer stack (mergekit's passthrough) changes on purpose: its sources may differ there.
LAYER_COUNT_FIELDS = ("num_hidden_layers",)
_UNSTATED = object()


def _rope(config: dict) -> tuple[Any, Any]:
    """(rope_theta, rope scaling) in one spelling: transformers 4's `rope_theta` and `rope_scaling`,
    or 5's `rope_parameters` (theta inside; rope_type 'default' means no scaling)."""
    params = config.get("rope_parameters")
    theta = config.get("rope_theta", _UNSTATED)
    scaling = config.get("rope_scaling")
    if isinstance(params, dict):
        if "rope_theta" in params:
            theta = params["rope_theta"]
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        else:  # per attention kind (full, sliding): compared whole
            scaling = params
    if isinstance(scaling, dict) and "type" in scaling and "rope_type" not in scaling:  # the older key
        scaling = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    if isinstance(scaling, dict) and set(scaling) <= {"rope_type"} and scaling.get("rope_type") in ("default", None):
        scaling = None
    return theta, scaling


def architecture_fields(config: dict, prefix: str = "") -> dict[str, Any]:
    """The architecture-defining fields a config states, by the names messages use."""
    out: dict[str, Any] = {}
    for field, names in ARCHITECTURE_FIELDS.items():
        name = next((n for n in names if n in config), None)
        if name is not None:
            out[prefix + field] = config[name]
    theta, scaling = _rope(config)
    if theta is not _UNSTATED:
        out[prefix + "rope_theta"] = theta
    if "rope_theta" in config or "rope_scaling" in config or "rope_parameters" in config:
        out[prefix + "rope_scaling"] = scaling
    for key, sub in config.items():
        if key.endswith("_config") and isinstance(sub, dict) and "model_type" in sub:
            out.update(architecture_fields(sub, f"{prefix}{key}."))
    return out


def vision_tower(config: dict) -> dict:
    """The vision tower's config: a CLIPModel's `vision_config`, or a CLIPVisionModel's own."""
    sub = config.get("vision_config")
    return sub if isinstance(sub, dict) else config


def config_differences(configs: dict[str, dict], ignore: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """[(field, {model: value})] for every field two of `configs` ({model: config.json}) state
    differently; `ignore`: fields (as messages name them) not compared."""
    fields = {m: architecture_fields(c) for m, c in configs.items()}
    names = dict.fromkeys(f for fs in fields.values() for f in fs if f.rsplit(".", 1)[-1] not in ignore)
    out = []
    for field in names:
        values = {m: fs[field] for m, fs in fields.items() if field in fs}
        if len(values) > 1 and any(v != next(iter(values.values())) for v in values.values()):
            out.append((field, values))
    return out


def describe_differences(differences: list[tuple[str, dict[str, Any]]], limit: int = 6) -> str:
    """'rope_theta is 10000.0 in base, 500000.0 in b; ...', the first `limit` fields."""
    shown = "; ".join(f"{field} is " + ", ".join(f"{_value(v)} in {m}" for m, v in values.items())
                      for field, values in differences[:limit])
    more = f" (and {len(differences) - limit} more field(s))" if len(differences) > limit else ""
    return shown + more


def _value(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value) \
        if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:80] + "..."


def usable_positions(config: dict) -> int | None:
    """How many tokens the model reads at once: its position table's length (`max_position_embeddings`
    or `n_positions`), less RoBERTa's padding offset; None when the config names no table (relative
    positions, RoPE models without a limit)."""
    positions = next((config[n] for n in ARCHITECTURE_FIELDS["max_position_embeddings"]
                      if isinstance(config.get(n), int)), None)
    if positions is not None and config.get("model_type") in PADDING_OFFSET_POSITIONS:
        positions -= (config.get("pad_token_id") if isinstance(config.get("pad_token_id"), int) else 1) + 1
    return positions
