"""Models that do not belong together are refused (issue 22, part 4): their config.json files are
compared before anything is merged, and `allow_crimes: true` (mergekit's --allow-crimes) merges
them anyway, saying so in the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import fmerge_cli, write_recipe
from fmerge.compat import architecture_fields, config_differences

# Tiny Llamas: a base and a fine-tune sharing its architecture, and variants differing in one field.
LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)


def llama(path: Path, seed: int, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llamas")
    return {"base": llama(root / "base", 0), "same": llama(root / "same", 1),
            "rope": llama(root / "rope", 2, rope_theta=500000.0), "wide": llama(root / "wide", 3, hidden_size=32,
                                                                                 intermediate_size=64),
            "deep": llama(root / "deep", 4, num_hidden_layers=3)}


def recipe_for(tmp_path: Path, llamas, other: str, extra: str = "") -> Path:
    return write_recipe(tmp_path, f"base: {llamas['base']}\nmodels: {{a: {llamas['same']}, b: {llamas[other]}}}\n"
                                  f"store: store\n{extra}steps:\n  ta:\n    kind: merge\n    method: task_arithmetic\n"
                                  f"    params: {{lambda: 0.5}}\n    export: out\n")


def refused(tmp_path: Path, *args) -> str:
    """`fmerge run ARGS` exits 2 with one paragraph, no traceback, and writes no export."""
    proc = fmerge_cli("run", *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "\n\n" not in proc.stderr.strip()  # one paragraph
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "store").rglob("zarr.json"))  # nothing merged
    return " ".join(proc.stderr.split())  # rich wraps long lines


# ----------------------------------------------------------------------------- the comparison, on dicts

def test_fields_fine_tunes_change_are_not_compared():
    base = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 16, "torch_dtype": "float32",
            "transformers_version": "4.40.0", "_name_or_path": "base", "use_cache": True}
    tuned = {**base, "architectures": ["BertForSequenceClassification"], "id2label": {"0": "x", "1": "y"},
             "label2id": {"x": 0, "y": 1}, "num_labels": 2, "problem_type": "single_label_classification",
             "finetuning_task": "sst2", "torch_dtype": "bfloat16", "transformers_version": "5.0.0",
             "_name_or_path": "ft", "use_cache": False, "hidden_dropout_prob": 0.0}
    assert config_differences({"base": base, "a": tuned}) == []


def test_each_architecture_field_is_compared_under_its_family_names():
    gpt2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "vocab_size": 64}
    for key, other in [("n_embd", 32), ("n_layer", 3), ("n_head", 4), ("n_positions", 64),
                       ("activation_function", "relu"), ("layer_norm_epsilon", 1e-6), ("vocab_size", 65),
                       ("model_type", "gpt_neo")]:
        diff = config_differences({"base": gpt2, "b": {**gpt2, key: other}})
        assert len(diff) == 1 and diff[0][1] == {"base": gpt2[key], "b": other}, key


def test_rope_spellings_of_transformers_4_and_5_compare_equal():
    v4 = {"model_type": "llama", "rope_theta": 10000.0, "rope_scaling": None}
    v5 = {"model_type": "llama", "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    assert config_differences({"base": v4, "a": v5}) == []
    scaled4 = {**v4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    scaled5 = {"model_type": "llama", "rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}}
    assert config_differences({"base": scaled4, "a": scaled5}) == []
    diff = dict(config_differences({"base": v4, "a": scaled5}))
    assert diff == {"rope_scaling": {"base": None, "a": {"rope_type": "linear", "factor": 2.0}}}
    assert dict(config_differences({"base": v4, "a": {**v4, "rope_theta": 5e5}})) == \
        {"rope_theta": {"base": 10000.0, "a": 5e5}}


def test_a_field_one_config_does_not_state_is_not_compared_but_sub_configs_are():
    assert config_differences({"base": {"hidden_size": 16}, "a": {"hidden_size": 16, "head_dim": 8}}) == []
    composite = {"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": 16}}
    other = {"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": 32}}
    assert dict(config_differences({"base": composite, "a": other})) == \
        {"text_config.hidden_size": {"base": 16, "a": 32}}
    assert "hidden_size" not in architecture_fields({"quantization_config": {"hidden_size": 1}})


# ----------------------------------------------------------------------------- recipes

def test_rope_theta_difference_is_refused_naming_both_values(tmp_path, llamas):
    message = refused(tmp_path, recipe_for(tmp_path, llamas, "rope"))
    assert "steps.ta" in message and "do not share one architecture" in message
    assert "rope_theta is 10000.0 in base, 10000.0 in a, 500000.0 in b" in message
    assert "allow_crimes: true" in message


def test_allow_crimes_merges_and_the_card_says_so(tmp_path, llamas):
    fmerge_cli("run", recipe_for(tmp_path, llamas, "rope", "allow_crimes: true\n"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "allow_crimes" in card and "rope_theta is 10000.0 in base, 10000.0 in a, 500000.0 in b" in card
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_card_of_an_ordinary_merge_says_nothing_of_crimes(tmp_path, llamas):
    fmerge_cli("run", recipe_for(tmp_path, llamas, "same"))
    assert "allow_crimes" not in (tmp_path / "out" / "README.md").read_text()


def test_width_and_layer_count_differences_are_refused(tmp_path, llamas):
    message = refused(tmp_path, recipe_for(tmp_path, llamas, "wide"))
    assert "hidden_size is 16 in base, 16 in a, 32 in b" in message
    assert "intermediate_size is 32 in base, 32 in a, 64 in b" in message
    message = refused(tmp_path, recipe_for(tmp_path, llamas, "deep"))
    assert "num_hidden_layers is 2 in base, 2 in a, 3 in b" in message


def test_status_refuses_too_before_anything_runs(tmp_path, llamas):
    proc = fmerge_cli("status", recipe_for(tmp_path, llamas, "rope"), check=False)
    assert proc.returncode == 2 and "rope_theta" in proc.stderr and "Traceback" not in proc.stderr


def test_allow_crimes_must_be_a_boolean(tmp_path, llamas):
    proc = fmerge_cli("validate", recipe_for(tmp_path, llamas, "rope", "allow_crimes: 2\n"), check=False)
    assert proc.returncode == 2 and "allow_crimes" in proc.stderr


# ----------------------------------------------------------------------------- mergekit configs

def mergekit_config(tmp_path: Path, llamas, other: str, extra: str = "") -> Path:
    return write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - {{model: {llamas['base']}, parameters: "
                                  f"{{weight: 1}}}}\n  - {{model: {llamas[other]}, parameters: {{weight: 1}}}}\n"
                                  f"dtype: float32\n{extra}", "merge.yml")


def test_mergekit_config_refused_then_merged_with_allow_crimes(tmp_path, llamas):
    proc = fmerge_cli("run", mergekit_config(tmp_path, llamas, "rope"), "--store", tmp_path / "store", check=False)
    assert proc.returncode == 2 and "rope_theta" in proc.stderr and "--allow-crimes" in proc.stderr
    assert not (tmp_path / "merge-merged").exists()
    fmerge_cli("run", mergekit_config(tmp_path, llamas, "rope", "allow_crimes: true\n"), "--store", tmp_path / "store")
    assert "allow_crimes" in (tmp_path / "merge-merged" / "README.md").read_text()


def test_passthrough_of_different_widths_is_refused_before_writing(tmp_path, llamas):
    config = write_recipe(tmp_path, f"merge_method: passthrough\nslices:\n"
                                    f"  - sources: [{{model: {llamas['base']}, layer_range: [0, 2]}}]\n"
                                    f"  - sources: [{{model: {llamas['wide']}, layer_range: [0, 1]}}]\n", "stack.yml")
    proc = fmerge_cli("run", config, "--store", tmp_path / "store", check=False)
    assert proc.returncode == 2 and "hidden_size is 16 in base, 32 in wide" in " ".join(proc.stderr.split())
    assert not (tmp_path / "stack-merged").exists()
    # allowed as a crime, the widths still do not fit: refused by the tensors' shapes, before writing
    text = config.read_text() + "allow_crimes: true\n"
    config.write_text(text)
    proc = fmerge_cli("run", config, "--store", tmp_path / "store", check=False)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "do not fit together" in message and "is [16] in base but" in message
    assert "is [32] in wide" in message
    assert "Traceback" not in proc.stderr and not (tmp_path / "stack-merged").exists()
    assert not [p for p in (tmp_path / "store" / "objects").rglob("zarr.json")]


def test_passthrough_of_different_layer_counts_is_what_it_is_for(tmp_path, llamas):
    config = write_recipe(tmp_path, f"merge_method: passthrough\nslices:\n"
                                    f"  - sources: [{{model: {llamas['base']}, layer_range: [0, 2]}}]\n"
                                    f"  - sources: [{{model: {llamas['deep']}, layer_range: [1, 3]}}]\n", "stack.yml")
    fmerge_cli("run", config, "--store", tmp_path / "store")
    assert json.loads((tmp_path / "stack-merged" / "config.json").read_text())["num_hidden_layers"] == 4


def test_validate_compares_local_model_directories(tmp_path, llamas):
    proc = fmerge_cli("validate", recipe_for(tmp_path, llamas, "rope"), check=False)
    assert proc.returncode == 2 and "rope_theta is 10000.0 in base, 10000.0 in a, 500000.0 in b" in \
        " ".join(proc.stderr.split())
    fmerge_cli("validate", recipe_for(tmp_path, llamas, "rope", "allow_crimes: true\n"))
    fmerge_cli("validate", recipe_for(tmp_path, llamas, "same"))


def test_adamerging_refuses_models_of_other_architectures(tmp_path, llamas):
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    recipe = write_recipe(tmp_path, f"base: {llamas['base']}\nmodels:\n  a: {{path: {llamas['same']}, data: lm}}\n"
                                    f"  b: {{path: {llamas['wide']}, data: lm}}\n"
                                    f"data: {{lm: {{path: {data}, task: causal_lm, label: null}}}}\nstore: store\n"
                                    f"steps:\n  ada: {{kind: adamerging, steps: 1, examples: 2}}\n")
    proc = fmerge_cli("validate", recipe, check=False)
    assert proc.returncode == 2 and "steps.ada" in proc.stderr and "hidden_size" in proc.stderr


def test_a_stack_allowed_as_a_crime_says_so_in_its_card(tmp_path, llamas):
    config = write_recipe(tmp_path, f"merge_method: passthrough\nslices:\n"
                                    f"  - sources: [{{model: {llamas['base']}, layer_range: [0, 2]}}]\n"
                                    f"  - sources: [{{model: {llamas['rope']}, layer_range: [0, 2]}}]\n", "stack.yml")
    proc = fmerge_cli("run", config, "--store", tmp_path / "store", check=False)
    assert proc.returncode == 2 and "for stacking" in proc.stderr and "rope_theta" in proc.stderr
    config.write_text(config.read_text() + "allow_crimes: true\n")
    fmerge_cli("run", config, "--store", tmp_path / "store")
    card = (tmp_path / "stack-merged" / "README.md").read_text()
    assert "allow_crimes" in card and "rope_theta is 10000.0 in base, 500000.0 in rope" in card
    assert "that of model 'base' (the first slice's)" in card
