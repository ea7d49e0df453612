"""Every bad input of issue 7 gives one FmergeError paragraph naming the file, key or tensor.

Through the real CLI (exit 2, no traceback) for a few cases; in process for the rest. Cases
already covered elsewhere (misspelt keys, wrong types, unknown method, missing model directory,
step cycles, dangling step references, all-zero weights, density > 1) live in test_recipe.py and
test_cli.py.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ZOO_RECIPE, fmerge_cli, tiny_bert_config, write_recipe
from fmerge import executor
from fmerge.errors import FmergeError
from fmerge.api import load_recipe
from fmerge.runtime import Runtime
from fmerge.store import Store

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "cat", "dog"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def run_recipe(recipe: Path):
    r = load_recipe(recipe)
    rt = Runtime(r, Store(r.resolve(r.spec.store or "store")))
    return rt, executor.run(rt)


def run_error(recipe: Path) -> str:
    with pytest.raises(FmergeError) as info:
        run_recipe(recipe)
    return str(info.value)


def cli_error(*args, cwd=None) -> str:
    proc = fmerge_cli(*args, cwd=cwd, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    return " ".join(proc.stderr.split())  # rich may wrap long paths


def copy_model(src: Path, dst: Path, edit=None, dtype: torch.dtype | None = None) -> Path:
    """A copy of a model directory, its tensors changed by `edit(dict)` or cast to `dtype`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    if dtype is not None:
        tensors = {n: t.to(dtype) for n, t in tensors.items()}
    if edit:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def classifier_project(root: Path, rows: list[dict] | None = None, num_labels: int = 2) -> Path:
    """A word-level tokenizer, a base BertModel and two classifier directories, plus task data."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    base = BertModel(tiny_bert_config(vocab_size=len(VOCAB)))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, name in enumerate(("clf_a", "clf_b")):
        torch.manual_seed(10 + i)
        clf = BertForSequenceClassification(tiny_bert_config(vocab_size=len(VOCAB), num_labels=num_labels))
        clf.bert.load_state_dict(base.state_dict())
        clf.save_pretrained(root / name)
    if rows is None:
        rows = [{"text": f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]}", "label": i % 2} for i in range(24)]
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


FISHER_RECIPE = """
base: base
store: store
data:
  t: {path: data/t.jsonl}
models:
  a: {path: clf_a, data: t}
  b: {path: clf_b, data: t}
steps:
  fish: {kind: fisher, estimator: exact, examples: 16, batch_size: 8, max_length: 8}
  fm: {kind: merge, method: fisher, fisher: fish}
"""


# ------------------------------------------------------------------------------------------
# Recipe-level mistakes through the real CLI


def test_malformed_yaml_via_cli(tmp_path):
    recipe = write_recipe(tmp_path, "base: zoo/base\nmodels: {a: zoo/a\nsteps: {}\n")
    msg = cli_error("run", recipe)
    assert "recipe.yaml:" in msg and "malformed YAML" in msg


def test_yaml_is_safe_loaded_python_tags_refused(tmp_path):
    marker = tmp_path / "pwned"
    recipe = write_recipe(tmp_path, f"base: !!python/object/apply:os.system ['touch {marker}']\nmodels: {{a: x}}\nsteps: {{}}\n")
    msg = cli_error("validate", recipe)
    assert "malformed YAML" in msg and "python/object/apply" in msg
    assert not marker.exists()


def test_unwritable_store_via_cli(tmp_path, zoo):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    (tmp_path / "blocker").write_text("a file, not a directory")  # unwritable even for root
    msg = cli_error("run", recipe, "--store", tmp_path / "blocker" / "store")
    assert "blocker/store cannot be created or written" in msg and "--store" in msg


def test_directory_without_weights_via_cli(tmp_path, zoo):
    (tmp_path / "zoo" / "empty").mkdir()
    (tmp_path / "zoo" / "empty" / "config.json").write_text("{}")
    recipe = write_recipe(tmp_path, ZOO_RECIPE.replace("zoo/task1", "zoo/empty"))
    msg = cli_error("run", recipe)
    assert "Model 'b': no weights in" in msg and "zoo/empty" in msg and "model.safetensors" in msg


def test_nan_in_weights_via_cli_names_model_and_tensor(tmp_path, zoo):
    def poison(t):
        t["bert.encoder.layer.1.output.dense.weight"][0, 3] = float("nan")

    copy_model(zoo["task1"], tmp_path / "zoo" / "nan", poison)
    recipe = write_recipe(tmp_path, ZOO_RECIPE.replace("zoo/task1", "zoo/nan"))
    msg = cli_error("run", recipe)
    assert "Tensor 'bert.encoder.layer.1.output.dense.weight' of model 'b' holds 1 NaN or Inf value(s)" in msg
    assert list(Store(tmp_path / "store").list()) == []  # nothing half-written committed
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_artifact_key_cannot_escape_store_via_cli(tmp_path):
    msg = cli_error("show", "../../etc", "--store", tmp_path / "s")
    assert "'../../etc' is not an artifact key" in msg


# ------------------------------------------------------------------------------------------
# Recipe-level mistakes in process


def test_unknown_estimator_suggests(tmp_path):
    classifier_project(tmp_path)
    with pytest.raises(FmergeError, match=r"recipe.yaml:10: steps.fish.estimator: unknown estimator 'exakt'; "
                                          r"did you mean 'exact'\?"):
        load_recipe(write_recipe(tmp_path, FISHER_RECIPE.replace("estimator: exact", "estimator: exakt")))


def test_missing_data_path(tmp_path):
    classifier_project(tmp_path)
    with pytest.raises(FmergeError, match=r"recipe.yaml:5: data.t.path: data file .*data/nope.jsonl does not exist"):
        load_recipe(write_recipe(tmp_path, FISHER_RECIPE.replace("data/t.jsonl", "data/nope.jsonl")))


def test_examples_below_one(tmp_path):
    classifier_project(tmp_path)
    with pytest.raises(FmergeError, match=r"steps.fish.examples: Input should be greater than or equal to 1"):
        load_recipe(write_recipe(tmp_path, FISHER_RECIPE.replace("examples: 16", "examples: 0")))


@pytest.mark.parametrize("step, expected", [
    ("{kind: merge, method: task_arithmetic, params: {lambda: 0}}", "all λ are zero"),
    ("{kind: merge, method: weighted_average, params: {weights: [1, -1, 0]}}", "'weights' sums to 0"),
    ("{kind: merge, method: ties, params: {density: 0}}", "density: Input should be greater than 0"),
    ("{kind: merge, method: dare, params: {p: 1}}", "p: Input should be less than 1"),
])
def test_degenerate_method_parameters(tmp_path, zoo, step, expected):
    recipe = write_recipe(tmp_path, "base: zoo/base\nmodels: {a: zoo/task0, b: zoo/task1, c: zoo/task2}\n"
                                    f"steps:\n  m: {step}\n")
    with pytest.raises(FmergeError) as info:
        load_recipe(recipe)
    assert "recipe.yaml:4: steps.m.params" in str(info.value) and expected in str(info.value)


# ------------------------------------------------------------------------------------------
# Incompatible or broken models


def test_shape_mismatch_names_first_tensors(tmp_path, zoo):
    from transformers import BertForSequenceClassification

    torch.manual_seed(3)
    BertForSequenceClassification(tiny_bert_config(intermediate_size=48, num_labels=3)).save_pretrained(tmp_path / "zoo" / "wide")
    recipe = ZOO_RECIPE.replace("zoo/task1", "zoo/wide")
    assert "intermediate_size is 32 in base, 32 in a, 48 in b" in run_error(write_recipe(tmp_path, recipe))
    # allowed as a crime (tests/test_crimes.py), the tensors that do not fit are still refused
    msg = run_error(write_recipe(tmp_path, recipe + "allow_crimes: true\n"))
    assert "Tensor shapes differ between the models: 'encoder.layer.0.intermediate.dense.bias' is [32] in the base " \
           "but [48] in b; 'encoder.layer.0.intermediate.dense.weight' is [32, 16] in the base but [48, 16] in b" in msg
    assert "(and 3 more)" in msg and "exclude" in msg


def test_vocabulary_size_mismatch_is_named(tmp_path, zoo):
    from transformers import BertForSequenceClassification

    BertForSequenceClassification(tiny_bert_config(vocab_size=80, num_labels=3)).save_pretrained(tmp_path / "zoo" / "bigvocab")
    recipe = ZOO_RECIPE.replace("zoo/task1", "zoo/bigvocab")
    assert "vocab_size is 64 in base, 64 in a, 80 in b" in run_error(write_recipe(tmp_path, recipe))
    msg = run_error(write_recipe(tmp_path, recipe + "allow_crimes: true\n"))
    assert "'embeddings.word_embeddings.weight' is [64, 16] in the base but [80, 16] in b" in msg
    assert "vocabulary-size mismatch" in msg


def test_unrelated_tensor_names_are_shown(tmp_path, zoo):
    copy_model(zoo["task1"], tmp_path / "zoo" / "renamed")
    tensors = load_file(tmp_path / "zoo" / "renamed" / "model.safetensors")
    save_file({"other." + n.replace(".", "_"): t for n, t in tensors.items()}, tmp_path / "zoo" / "renamed" / "model.safetensors")
    recipe = write_recipe(tmp_path, "base: zoo/base\nmodels: {b: zoo/renamed}\nstore: store\n"
                                    "steps:\n  avg: {kind: merge, method: simple_average}\n")
    msg = run_error(recipe)
    assert "share no floating-point tensor" in msg
    assert "The base has 'embeddings.LayerNorm.bias'" in msg and "'b' has 'other.bert_embeddings_LayerNorm_bias'" in msg


def test_inf_in_base_names_the_base(tmp_path, zoo):
    def poison(t):
        t["pooler.dense.bias"][1] = float("inf")

    copy_model(zoo["base"], tmp_path / "zoo" / "infbase", poison)
    msg = run_error(write_recipe(tmp_path, ZOO_RECIPE.replace("base: zoo/base", "base: zoo/infbase")))
    assert "Tensor 'pooler.dense.bias' of the base model holds 1 NaN or Inf value(s)" in msg


def test_nan_in_task_vector_step(tmp_path, zoo):
    def poison(t):
        t["bert.pooler.dense.weight"][:] = float("nan")

    copy_model(zoo["task0"], tmp_path / "zoo" / "nan", poison)
    recipe = write_recipe(tmp_path, "base: zoo/base\nmodels: {a: zoo/nan}\nstore: store\n"
                                    "steps:\n  tv: {kind: task_vectors}\n")
    msg = run_error(recipe)
    assert "Task vector of model 'a' has NaN or Inf in tensor 'pooler.dense.weight'" in msg
    assert list(Store(tmp_path / "store").list()) == []


def test_nan_in_fisher_statistics_is_named():
    from fmerge.merging import merge_stream, plan_tensors
    from fmerge.methods import MergeContext, get_method

    class Tensors(dict):
        def names(self):
            return list(self)

        def shape(self, n):
            return tuple(self[n].shape)

        def dtype(self, n):
            return self[n].dtype

        def get(self, n):
            return self[n]

    base = Tensors(w=torch.zeros(4))
    models = {"a": Tensors(w=torch.ones(4)), "b": Tensors(w=2 * torch.ones(4))}
    fisher = {"a": Tensors(w=torch.ones(4)), "b": Tensors(w=torch.tensor([1.0, float("nan"), 1.0, 1.0]))}
    method = get_method("fisher")
    params = method.Params.model_validate({})
    plan = plan_tensors(base, models, [], [])
    stream = merge_stream(method, params, MergeContext(["a", "b"]), plan, base, models, with_base=False,
                          stats={"fisher": fisher})
    with pytest.raises(FmergeError, match=r"Tensor 'w' of the fisher statistics of model 'b' holds 1 NaN or Inf"):
        list(stream)


def test_mixed_dtypes_merge_in_fp32_and_write_the_base_dtype(tmp_path, zoo):
    """Decision: models in fp16/bf16 next to fp32 ones are upcast to fp32, merged, and written in the
    base's dtype (or out_dtype): the same as merging the upcast values by hand."""
    copy_model(zoo["task1"], tmp_path / "zoo" / "half", dtype=torch.float16)
    copy_model(zoo["task2"], tmp_path / "zoo" / "bf16", dtype=torch.bfloat16)
    recipe = write_recipe(tmp_path, "base: zoo/base\nmodels: {a: zoo/task0, b: zoo/half, c: zoo/bf16}\nstore: store\n"
                                    "steps:\n  avg: {kind: merge, method: simple_average}\n")
    rt, _ = run_recipe(recipe)
    merged = rt.store.open(rt.planned["avg"][0].key).view("weights/")
    sources = [load_file(tmp_path / "zoo" / m / "model.safetensors") for m in ("task0", "half", "bf16")]
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"):
        by_hand = sum(s["bert." + name].to(torch.float32) for s in sources) / 3
        assert merged.dtype(name) == torch.float32
        assert torch.allclose(merged.get(name), by_hand, atol=1e-6)


def test_unreadable_safetensors_file_is_named(tmp_path, zoo):
    shutil.copytree(zoo["task1"], tmp_path / "zoo" / "broken")
    (tmp_path / "zoo" / "broken" / "model.safetensors").write_bytes(b"\x05\x00")
    msg = run_error(write_recipe(tmp_path, ZOO_RECIPE.replace("zoo/task1", "zoo/broken")))
    assert "Model 'b':" in msg and "broken/model.safetensors is not a readable safetensors file" in msg


# ------------------------------------------------------------------------------------------
# Data mistakes through the fisher step


def test_empty_dataset(tmp_path):
    classifier_project(tmp_path, rows=[])
    msg = run_error(write_recipe(tmp_path, FISHER_RECIPE))
    assert "t.jsonl' (split 'train') has no rows" in msg


def test_labels_outside_the_head(tmp_path):
    rows = [{"text": "good cat", "label": i % 3} for i in range(24)]  # label 2 for a 2-class head
    classifier_project(tmp_path, rows=rows)
    msg = run_error(write_recipe(tmp_path, FISHER_RECIPE))
    assert "t.jsonl': row 3 of label column 'label' holds 2, outside the model's head of 2 classes" in msg
    assert "(labels 0..1; " in msg  # a count of the split's rows


def test_text_column_missing(tmp_path):
    rows = [{"sentence": "good cat", "label": i % 2} for i in range(24)]
    classifier_project(tmp_path, rows=rows)
    msg = run_error(write_recipe(tmp_path, FISHER_RECIPE))
    assert "has no column 'text' (the spec's text_column); its columns are sentence, label" in msg


# ------------------------------------------------------------------------------------------
# A full disk


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_artifact_write(tmp_path, zoo, monkeypatch):
    from fmerge.io import StreamingSafetensorsWriter  # a merge writes its weights as safetensors files

    calls = {"n": 0}
    real = StreamingSafetensorsWriter.write

    def fill_up(self, name, tensor):  # the disk fills on the fifth tensor written
        calls["n"] += 1
        if calls["n"] == 5:
            enospc()
        return real(self, name, tensor)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", fill_up)
    msg = run_error(write_recipe(tmp_path, ZOO_RECIPE))
    assert "Writing tensor 'weights/" in msg and "(merge) to artifact store" in msg
    assert "No space left on device" in msg and "Nothing was committed" in msg and "Free some space" in msg
    store = tmp_path / "store"
    assert list(Store(store).list()) == [] and list((store / "tmp").iterdir()) == []
    monkeypatch.setattr(StreamingSafetensorsWriter, "write", real)
    _, reports = run_recipe(tmp_path / "recipe.yaml")  # space freed: the next run completes
    assert [r.state for r in reports] == ["computed"] * 3


def test_full_disk_during_export_keeps_the_previous_export(tmp_path, zoo, monkeypatch):
    from fmerge import export

    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    run_recipe(recipe)
    before = (tmp_path / "out" / "ties" / "model.safetensors").read_bytes()
    (tmp_path / "recipe.yaml").write_text(ZOO_RECIPE.replace("density: 0.5", "density: 0.4"))
    monkeypatch.setattr(export, "place_file", enospc)  # the merge's files copied to another file system
    msg = run_error(recipe)
    assert f"Exporting the model to {tmp_path / 'out' / 'ties'} failed: No space left on device" in msg
    assert "previous one kept" in msg
    assert (tmp_path / "out" / "ties" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ties"]  # no .ties.tmp-* left
