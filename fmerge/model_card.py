"""Model cards (README.md) of fmerge's model exports, one format for every merge kind.

A card is what a Hugging Face user reads before trusting a merged model: the hub metadata (front
matter: `base_model` when the base is a hub id, `library_name`, tags naming the method), the method
and its parameters, the models merged, the recipe as written (a mergekit config verbatim), and how
to load what the directory holds. The steps gather these facts; this module only renders them, so
merge, Frank-Wolfe and AdaMerging exports read alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import yaml

from . import __version__
from .store import library_versions


@dataclass
class CardFacts:
    step: str                       # the step (or sweep variant) exported
    method: str                     # merge method, or the step kind of an iterative merge
    params: dict                    # the method's parameters as the recipe gives them
    base: str                       # how the base was given: a hub id, a local path, a finetune step
    base_hub_id: str | None         # the base's hub id, if it is one (front matter `base_model`)
    models: dict[str, str]          # merged model -> how it was given
    key: str                        # the merge's artifact key
    inputs: dict                    # content hashes of everything the merge read
    recipe_file: str | None = None
    recipe_text: str | None = None  # the recipe file as read
    mergekit: bool = False          # the recipe is a mergekit config (quoted verbatim as such)
    sets: list[str] = field(default_factory=list)  # --set items the run applied over the recipe text
    sections: list[str] = field(default_factory=list)  # further markdown: heads, tasks, sweeps, ...


def render_card(facts: CardFacts) -> str:
    """The README.md of an export."""
    front = {"library_name": "transformers", "tags": ["merge", "fmerge", facts.method]}
    if facts.base_hub_id:
        front = {"base_model": facts.base_hub_id, **front}
    base_line = (f"the hub model [{facts.base_hub_id}](https://huggingface.co/{facts.base_hub_id})"
                 if facts.base_hub_id else f"{facts.base} (not a hub id, so the front matter names no base_model)")
    models = "".join(f"- `{name}`: {given}\n" for name, given in facts.models.items())
    params = yaml.safe_dump(facts.params, sort_keys=False).strip() if facts.params else "{}"
    parts = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n",
        f"# {facts.step}: a {facts.method} merge\n",
        f"Merged with fmerge {__version__}, step `{facts.step}` of "
        f"recipe `{facts.recipe_file or '(command line)'}`.\n",
        f"## Method\n\n`{facts.method}` with parameters:\n\n```yaml\n{params}\n```\n",
        f"## Models\n\nBase model: {base_line}.\n\nMerged models:\n\n{models}",
    ]
    if facts.recipe_text is not None:
        what = ("The mergekit configuration, verbatim (fmerge read it as the equivalent recipe):" if facts.mergekit
                else "The recipe, verbatim:")
        sets = "".join(f" --set {item}" for item in facts.sets)
        fence = fence_for(facts.recipe_text)
        parts.append(f"## {'Configuration' if facts.mergekit else 'Recipe'}\n\n{what}\n\n"
                     f"{fence}yaml\n{facts.recipe_text.rstrip()}\n{fence}\n"
                     + (f"\nRun with these overrides on the command line:{sets}\n" if sets else ""))
    parts += [s.strip() + "\n" for s in facts.sections if s]
    parts.append(f"## Reproducibility\n\nArtifact key `{facts.key}`. Inputs (content hashes):\n\n"
                 f"```json\n{json.dumps(facts.inputs, indent=2)}\n```\n\n"
                 f"Library versions:\n\n```json\n{json.dumps(library_versions(), indent=2)}\n```\n")
    return "\n".join(parts)


def fence_for(text: str) -> str:
    """A code fence longer than any run of backticks in `text`, so the quote cannot end early."""
    runs = [len(r) for r in re.findall(r"`+", text)]
    return "`" * max(3, max(runs, default=0) + 1)


def task_dirs_section(tasks: dict[str, list[str]]) -> str:
    """How to load the per-task classifier directories of a classifier merge."""
    rows = "".join(f"- `{task}/`: labels {', '.join(labels) if labels else '(numbered)'}\n"
                   for task, labels in tasks.items())
    first = next(iter(tasks))
    return (
        "## Classifiers, one directory per task\n\n"
        "Task heads are never averaged. Each task has its own directory holding the merged body with that "
        "task's own classification head, its config (`id2label` from the recipe's `label_names`), tokenizer "
        "and card; it loads as that task's classifier:\n\n"
        f"```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        f"model = AutoModelForSequenceClassification.from_pretrained(\"path/to/export/{first}\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"path/to/export/{first}\")\n```\n\n{rows}\n"
        "The top-level directory holds the merged body under the base model's tensor names: load it with "
        "`AutoModel`. Any classification head it holds is the base model's, not a task's. "
        "`heads/<task>.safetensors` hold each task's head alone, under the model's own tensor names.")


def clip_section(base: str) -> str:
    """How to classify with an exported merged CLIP vision tower (`base`: where the base model is)."""
    return (
        "## Zero-shot classification (CLIP)\n\n"
        "Only the vision tower was merged, and it is all this directory holds: it loads as a `CLIPVisionModel`. "
        "A task's classifier is CLIP's zero-shot head, built with the base model's text tower, projections and "
        "`logit_scale`: embed each class name through the prompt templates, L2-normalise each embedding, average "
        "over templates and normalise again; an image's logits are `logit_scale.exp() * normalize(image_embeds) "
        "@ heads.T`. With the base model as a `CLIPModel` and this tower in place of its own:\n\n"
        "```python\nimport torch\nfrom torch.nn.functional import normalize\n"
        "from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel\n\n"
        f"model = CLIPModel.from_pretrained(\"{base}\")\n"
        "tower = CLIPVisionModel.from_pretrained(\"path/to/export\")  # transformers 5; with 4.x: .vision_model\n"
        "model.vision_model.load_state_dict(tower.state_dict())\n"
        f"processor = CLIPProcessor.from_pretrained(\"{base}\")\n"
        "with torch.no_grad():\n"
        "    heads = normalize(torch.stack([normalize(model.get_text_features(**processor(\n"
        "        text=[t.format(c) for t in templates], return_tensors=\"pt\", padding=True)), dim=-1).mean(0)\n"
        "        for c in class_names]), dim=-1)\n"
        "    images = normalize(model.get_image_features(**processor(images=pictures, return_tensors=\"pt\")), dim=-1)\n"
        "    logits = model.logit_scale.exp() * images @ heads.T\n```")


def crimes_section(differences: str, config_from: str = "the base model's") -> str:
    """Said in the card of a merge whose recipe sets `allow_crimes: true`: `differences`, the
    architecture fields the models' configs disagree on (fmerge/compat.py), or ''; `config_from`:
    whose config.json the export holds."""
    found = (f"Their config.json files differ: {differences}. The merged tensors mix models that do not compute "
             f"alike, and this directory's config.json is {config_from}." if differences else
             "Their config.json files agree on every architecture field fmerge compares.")
    return (f"## Architectures differ (allow_crimes)\n\nThe recipe sets `allow_crimes: true`: fmerge merged these "
            f"models without requiring them to share one architecture. {found}")


def tokenizer_fallback_note(model_dir: str, reason: str) -> str:
    """Said in the card when the base's tokenizer could not be loaded and saved again."""
    return (f"\n## Tokenizer\n\nThe base model's tokenizer in `{model_dir}` could not be loaded ({reason}), so "
            f"its tokenizer files were copied as they are (a fixed list of names: a chat template or other "
            f"tokenizer file outside that list is not here). Check that the tokenizer loads before sharing.\n")
