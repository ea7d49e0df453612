"""Exports a Hugging Face user can trust: the tokenizer saved through save_pretrained, the model
card, one classifier directory per task that loads right, and swept steps' exports."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_recipe
from test_pipeline import two_task_project, two_task_recipe

from fmerge import executor
from fmerge.api import load_recipe
from fmerge.errors import ExportError, ModelError, RecipeError
from fmerge.export import copy_side_files
from fmerge.model_card import CardFacts, render_card
from fmerge.runtime import Runtime
from fmerge.store import Store

CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

PROJECT = two_task_recipe("path: {}", "")


def fine_tune(root: Path, task: str, classes: int) -> None:
    """A classifier trained briefly from the base on its task's train split, saved without tokenizer."""
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    base = BertModel.from_pretrained(root / "base")
    torch.manual_seed(classes)
    model = BertForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": classes}))
    model.bert.load_state_dict(base.state_dict(), strict=False)
    rows = [json.loads(line) for line in (root / "data" / task / "train.jsonl").read_text().splitlines()]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(20):
        batch = rows[(step * 16) % len(rows):][:16]
        enc = tokenizer([r["text"] for r in batch], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([r["label"] for r in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(root / task)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Two tiny BERT classifiers fine-tuned from one base (with a chat template), and their data."""
    root = tmp_path_factory.mktemp("hf")
    two_task_project(root)
    (root / "base" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    fine_tune(root, "sentiment", 2)
    fine_tune(root, "animal", 3)
    return root


def run(root: Path, steps: str, name: str = "recipe.yaml") -> Runtime:
    rt = Runtime(load_recipe(write_recipe(root, PROJECT + steps, name)), Store(root / "store"))
    executor.run(rt)
    return rt


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def accuracy_through_transformers(directory: Path, rows: Path) -> float:
    """A user's check: load the directory as a classifier and score it, one example at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    correct = []
    for line in rows.read_text().splitlines():
        row = json.loads(line)
        with torch.no_grad():
            logits = model(**tokenizer(row["text"], truncation=True, max_length=16, return_tensors="pt")).logits
        correct.append(int(logits.argmax(-1)) == row["label"])
    return float(torch.tensor(correct).float().mean())  # as the eval step computes it


def test_each_task_directory_loads_as_its_classifier_with_the_eval_accuracy(project):
    rt = run(project, """
  ta: {kind: merge, method: task_arithmetic, params: {lambda: 0.7}, export: out/ta}
  eval: {kind: eval, merges: [ta], individual: false, base: false, max_length: 16}
""")
    out = project / "out" / "ta"
    table = {r["task"]: r["accuracy"] for r in rt.results["eval"] if r["variant"] == "ta"}
    for task, labels in (("sentiment", ["pos", "neg"]), ("animal", ["cat", "dog", "fish"])):
        config = json.loads((out / task / "config.json").read_text())
        assert config["id2label"] == {str(i): n for i, n in enumerate(labels)}
        assert config["label2id"] == {n: i for i, n in enumerate(labels)}
        got = accuracy_through_transformers(out / task, project / "data" / task / "test.jsonl")
        assert got == table[task], task
        assert front_matter(out / task / "README.md")["tags"] == ["merge", "fmerge", "task_arithmetic"]
    # the task directory holds the task model's own head, not the base's nor another task's
    from safetensors.torch import load_file

    sentiment = load_file(out / "sentiment" / "model.safetensors")
    own = rt.source("sentiment")
    assert torch.equal(sentiment["classifier.weight"], own.get("classifier.weight"))
    merged = rt.store.open(rt.planned["ta"][0].key).view("weights/")
    assert torch.equal(sentiment["bert.encoder.layer.0.attention.self.query.weight"],
                       merged.get("encoder.layer.0.attention.self.query.weight"))
    # every file is readable by others, as save_pretrained's are
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert all(m & 0o044 == 0o044 for m in modes.values()), modes
    assert "heads/sentiment.safetensors" in modes and "animal/tokenizer.json" in modes
    card = (out / "README.md").read_text()
    assert "AutoModelForSequenceClassification.from_pretrained(\"path/to/export/sentiment\")" in card
    assert "Any classification head it holds is the base model's, not a task's" in card


def test_an_adamerging_export_gets_the_same_card_and_task_directories(project):
    from transformers import AutoModelForSequenceClassification

    rt = run(project, """
  ada: {kind: adamerging, steps: 2, lr: 0.05, batch_size: 8, examples: 8, max_length: 16, export: out/ada}
""", "ada.yaml")
    out = project / "out" / "ada"
    assert front_matter(out / "README.md") == {"library_name": "transformers",
                                               "tags": ["merge", "fmerge", "adamerging"]}
    card = (out / "README.md").read_text()
    assert "`adamerging` with parameters:" in card and "lr: 0.05" in card and "## Recipe" in card
    model = AutoModelForSequenceClassification.from_pretrained(out / "animal")
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "fish"}
    assert torch.equal(model.classifier.weight, rt.source("animal").get("classifier.weight"))


# -- the tokenizer ---------------------------------------------------------------------------------


def test_the_tokenizer_is_saved_with_its_chat_template(project, tmp_path):
    from transformers import AutoTokenizer

    notes: list[str] = []
    written = copy_side_files(project / "base", tmp_path, notes)
    assert "chat_template.jinja" in written and "config.json" in written and notes == []
    saved = AutoTokenizer.from_pretrained(tmp_path)
    original = AutoTokenizer.from_pretrained(project / "base")
    assert saved.chat_template == CHAT_TEMPLATE
    text = "good cat awful fish zebra"
    assert saved(text)["input_ids"] == original(text)["input_ids"]
    assert (saved.apply_chat_template([{"role": "user", "content": "dog"}], tokenize=False)
            == original.apply_chat_template([{"role": "user", "content": "dog"}], tokenize=False) == "<user>dog")


def test_a_tokenizer_that_does_not_load_is_copied_and_the_card_says_so(project, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(project / "base", base)
    (base / "tokenizer.json").write_text("not json")
    dest = tmp_path / "dest"
    dest.mkdir()
    notes: list[str] = []
    written = copy_side_files(base, dest, notes)
    assert written == ["config.json", "tokenizer.json", "tokenizer_config.json"]  # the fixed list, as they are
    assert (dest / "tokenizer.json").read_text() == "not json"
    (note,) = notes
    assert f"The base model's tokenizer in `{base}` could not be loaded (Expecting value" in note
    assert "its tokenizer files were copied as they are" in note and "a chat template" in note


def test_a_model_without_tokenizer_files_gets_none(zoo, tmp_path):
    notes: list[str] = []
    assert copy_side_files(zoo["base"], tmp_path, notes) == ["config.json"] and notes == []


def test_a_chat_template_linked_out_of_the_model_directory_is_refused(project, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(project / "base", base)
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (base / "chat_template.jinja").unlink()
    (base / "chat_template.jinja").symlink_to(secret)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ExportError) as exc:
        copy_side_files(base, dest)
    assert str(exc.value).startswith(f"Base model file {base / 'chat_template.jinja'} is a symbolic link to {secret}, "
                                     f"outside the model directory {base}.")
    assert list(dest.iterdir()) == []


# -- the model card --------------------------------------------------------------------------------


def test_the_card_names_a_hub_base_in_its_front_matter():
    facts = CardFacts(step="ta", method="ties", params={"density": 0.5}, base="hub model `org/base`",
                      base_hub_id="org/base", models={"a": "hub model `org/a`"}, key="k" * 32, inputs={},
                      recipe_text="base: org/base\n", sets=["ta.params.density=0.5"])
    card = render_card(facts)
    assert ("## Recipe\n\nThe recipe, verbatim:\n\n```yaml\nbase: org/base\n```\n\nRun with these overrides on "
            "the command line: --set ta.params.density=0.5\n") in card
    assert yaml.safe_load(card.split("---\n")[1]) == {"base_model": "org/base", "library_name": "transformers",
                                                      "tags": ["merge", "fmerge", "ties"]}
    assert "Base model: the hub model [org/base](https://huggingface.co/org/base)." in card
    assert "density: 0.5" in card and "- `a`: hub model `org/a`" in card
    quoted = render_card(CardFacts(**{**facts.__dict__, "recipe_text": "# a note: ```yaml\nbase: x\n", "sets": []}))
    assert "````yaml\n# a note: ```yaml\nbase: x\n````\n" in quoted  # the quote's fence outlasts its backticks


MERGEKIT = """\
# a mergekit config, read by fmerge as it is
merge_method: task_arithmetic
base_model: zoo/base
models:
  - model: zoo/task0
    parameters: {weight: 0.5}
  - model: zoo/task1
    parameters: {weight: 0.25}
dtype: float32
"""


def test_a_mergekit_config_is_quoted_verbatim_in_the_card(zoo, tmp_path):
    config = write_recipe(tmp_path, MERGEKIT, "merge.yml")
    executor.run(Runtime(load_recipe(config), Store(tmp_path / "store")))
    out = tmp_path / "merge-merged"
    card = (out / "README.md").read_text()
    assert f"The mergekit configuration, verbatim (fmerge read it as the equivalent recipe):\n\n```yaml\n{MERGEKIT}```" in card
    assert front_matter(out / "README.md") == {"library_name": "transformers",
                                               "tags": ["merge", "fmerge", "task_arithmetic"]}
    assert f"Base model: local directory `{zoo['base']}` (not a hub id" in card
    # the zoo's classifiers have 2 and 3 classes: each gets its directory, its own head, no label names
    from transformers import AutoModelForSequenceClassification

    for task, classes in (("task0", 2), ("task1", 3)):
        model = AutoModelForSequenceClassification.from_pretrained(out / task)
        assert model.config.num_labels == classes


def test_label_names_that_do_not_fit_the_head_are_refused(project):
    text = "  ta: {kind: merge, method: task_arithmetic, export: out/mislabelled}\n"
    recipe = write_recipe(project, (PROJECT + text).replace("label_names: [pos, neg]", "label_names: [pos, neg, mixed]"),
                          "mislabelled.yaml")
    with pytest.raises(ModelError) as exc:
        executor.run(Runtime(load_recipe(recipe), Store(project / "store")))
    assert str(exc.value) == ("Data 'sentiment' names 3 labels (label_names), but model 'sentiment' has 2 classes; fix "
                              "label_names in the recipe's data entry, then run again.")
    assert not (project / "out" / "mislabelled").exists()


# -- sweeps ----------------------------------------------------------------------------------------

SWEPT = """
  ta: {kind: merge, method: task_arithmetic, params: {lambda: 0.5}, export: out/swept}
sweep:
  ta.params.lambda: [0.05, 1.0]
"""


def test_a_sweep_chosen_by_eval_exports_the_chosen_variant_only(project):
    rt = run(project, SWEPT.replace("sweep:", "  eval: {kind: eval, merges: [ta], max_length: 16}\nsweep:"),
             "chosen.yaml")
    (summary,) = rt.sweep_results["eval"]
    chosen = summary["chosen"]
    out = project / "out" / "swept"
    manifest = json.loads((out / ".fmerge-export.json").read_text())
    assert manifest["key"] == rt.planned[chosen][0].key
    assert not [p for p in out.iterdir() if p.name.startswith("lambda=")]
    card = (out / "README.md").read_text()
    assert "this is the variant eval step `eval` chose on the selection split" in card and f"step `{chosen}`" in card
    # the choice, recomputed plainly: highest mean selection accuracy over the tasks, the first on ties
    means = [sum(summary["accuracy"][t][i] for t in summary["tasks"]) / len(summary["tasks"])
             for i in range(len(summary["variants"]))]
    assert chosen == summary["variants"][means.index(max(means))]


def test_a_sweep_without_a_choosing_eval_exports_each_variant_to_its_own_directory(project):
    rt = run(project, SWEPT.replace("out/swept", "out/each"), "each.yaml")
    out = project / "out" / "each"
    assert sorted(p.name for p in out.iterdir()) == ["lambda=0.05", "lambda=1.0"]
    for v in rt.recipe.sweeps["ta"]:
        sub = out / v.name[len("ta["):-1]
        assert json.loads((sub / ".fmerge-export.json").read_text())["key"] == rt.planned[v.name][0].key
        assert "each variant is exported to its own directory, named by its swept values" in (sub / "README.md").read_text()


def test_two_evals_choosing_an_exported_sweep_are_refused(project):
    text = PROJECT + SWEPT.replace("sweep:", "  e1: {kind: eval, merges: [ta]}\n  e2: {kind: eval, merges: [ta]}\nsweep:")
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(project, text, "two_evals.yaml"))
    assert str(exc.value).startswith(
        f"{project / 'two_evals.yaml'}:12: steps.ta.export: step 'ta' is swept and exports its chosen variant, but "
        f"eval steps 'e1', 'e2' each choose one, so which to export is unclear. List 'ta' in the merges of one eval "
        f"step only")


def test_a_swept_value_that_cannot_name_a_directory_is_refused(zoo, tmp_path):
    text = """
base: zoo/base
models: {a: zoo/task0, b: zoo/task1}
steps:
  m: {kind: merge, method: simple_average, export: out/m}
sweep:
  m.method: [simple_average, a/b]
"""
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(tmp_path, text))
    assert str(exc.value).startswith(
        f"{tmp_path / 'recipe.yaml'}:5: steps.m.export: variant 'm[method=a/b]' of swept step 'm' would export to a "
        f"sub-directory named by its swept values, 'method=a/b', which is not a usable directory name.")


def test_a_clip_export_says_how_to_attach_the_zero_shot_head(tmp_path):
    from transformers import CLIPModel, CLIPVisionModel

    from test_clip import make_project

    rt = Runtime(load_recipe(make_project(tmp_path) / "recipe.yaml"), Store(tmp_path / "store"), device="cpu")
    executor.run(rt, only=["avg"])
    out = tmp_path / "out" / "avg"
    card = (out / "README.md").read_text()
    assert "## Zero-shot classification (CLIP)" in card and 'model = CLIPModel.from_pretrained("base")' in card
    assert "Classifiers, one directory per task" not in card
    # the card's way: the base's CLIPModel with the exported tower in place of its own is the merge
    model = CLIPModel.from_pretrained(tmp_path / "base")
    model.vision_model.load_state_dict(CLIPVisionModel.from_pretrained(out).state_dict())
    merged = rt.store.open(rt.planned["avg"][0].key).view("weights/")
    tower = {n: t for n, t in model.vision_model.state_dict().items() if not n.endswith("position_ids")}
    assert tower and all(torch.equal(t, merged.get("vision_model." + n)) for n, t in tower.items())
