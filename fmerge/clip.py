"""CLIP zero-shot classification: the heads, the classifier built on a vision tower, image batches.

A CLIP task is classified without a trained head: the text tower embeds each class name through
prompt templates, and an image's logits are the scaled cosine similarities between its projected
image features and these class embeddings. The head of one class is computed as in CLIP's
zero-shot notebook and open_clip's `build_zero_shot_classifier`: embed every template filled with
the class name, L2-normalise each embedding, average over templates, L2-normalise the mean. The
logit scale is `logit_scale.exp()` of the pretrained model (100 for the OpenAI checkpoints).

Only the vision tower is ever merged. `VisionTower` serves the vision part of any CLIP checkpoint
(a `CLIPModel`, a `CLIPVisionModel` saved by transformers 4 with `vision_model.` names, or one
saved by transformers 5 without that prefix) under one naming, `vision_model.*`, so that text
tower tensors are neither merged, hashed into a merge nor exported, whatever the checkpoints hold.

Built-in prompts: the class names and templates of CLIP's published zero-shot prompts (OpenAI's
CLIP repository, data/prompts.md), which Task Arithmetic and FusionBench also use, so heads and
accuracies are comparable with theirs. For SUN397 and Stanford Cars (397 and 196 classes) only the
templates are built in; their class names come from the dataset's ClassLabel feature at run time
(`names_from_labels`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError, ModelError, RecipeError

VISION_PREFIX = "vision_model."
# Bare CLIPVisionModel names as transformers 5 saves them (no `vision_model.` prefix).
_BARE_VISION_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_DIGITS = [str(d) for d in range(10)]
_NUMBER = ['a photo of the number: "{}".']

BUILTIN: dict[str, dict[str, list[str] | None]] = {
    "sun397": {"classnames": None, "templates": ["a photo of a {}.", "a photo of the {}."]},
    "stanford_cars": {"classnames": None, "templates": [
        "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
        "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."]},
    "resisc45": {"classnames": [
        "airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge", "chaparral",
        "church", "circular farmland", "cloud", "commercial area", "dense residential", "desert", "forest",
        "freeway", "golf course", "ground track field", "harbor", "industrial area", "intersection",
        "island", "lake", "meadow", "medium residential", "mobile home park", "mountain", "overpass",
        "palace", "parking lot", "railway", "railway station", "rectangular farmland", "river",
        "roundabout", "runway", "sea ice", "ship", "snowberg", "sparse residential", "stadium",
        "storage tank", "tennis court", "terrace", "thermal power station", "wetland"],
        "templates": [f"{kind} {what} of {article}{{}}." for article in ("", "a ", "the ")
                      for what in ("imagery", "photo", "view") for kind in ("satellite", "aerial")]},
    "eurosat": {"classnames": [
        "annual crop land", "forest", "brushland or shrubland", "highway or road",
        "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
        "residential buildings or homes or apartments", "river", "lake or sea"],
        "templates": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                      "a centered satellite photo of the {}."]},
    "svhn": {"classnames": _DIGITS, "templates": _NUMBER},
    "mnist": {"classnames": _DIGITS, "templates": _NUMBER},
    "gtsrb": {"classnames": [
        "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
        "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
        "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
        "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
        "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
        "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
        "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way",
        "stop", "empty red and white circle", "red and white circle no truck entry",
        "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
        "red and white triangle with black left curve approaching warning",
        "red and white triangle with black right curve approaching warning",
        "red and white triangle with black double curve approaching warning",
        "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
        "red and white triangle with merging / narrow lanes warning",
        "red and white triangle with person digging / construction / road work warning",
        "red and white triangle with traffic light approaching warning",
        "red and white triangle with person walking warning", "red and white triangle with child and person walking warning",
        "red and white triangle with bicyle warning", "red and white triangle with snowflake / ice warning",
        "red and white triangle with deer warning", "white circle with gray strike bar no speed limit",
        "blue circle with white right turn arrow mandatory", "blue circle with white left turn arrow mandatory",
        "blue circle with white forward arrow mandatory", "blue circle with white forward or right turn arrow mandatory",
        "blue circle with white forward or left turn arrow mandatory", "blue circle with white keep right arrow mandatory",
        "blue circle with white keep left arrow mandatory", "blue circle with white arrows indicating a traffic circle",
        "white circle with gray strike bar indicating no passing for cars has ended",
        "white circle with gray strike bar indicating no passing for trucks has ended"],
        "templates": ['a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
                      'a close up photo of a "{}" traffic sign.']},
    "dtd": {"classnames": [
        "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
        "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved",
        "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
        "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled",
        "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
        "wrinkled", "zigzagged"],
        "templates": [f"a photo of {article} {{}} {thing}." for article in ("a", "the")
                      for thing in ("texture", "pattern", "thing", "object")]},
}
_ALIASES = {"cars": "stanford_cars", "stanford-cars": "stanford_cars"}
GENERIC_TEMPLATES = ["a photo of a {}."]


def builtin_task(name: str) -> dict[str, list[str] | None] | None:
    """The built-in prompts of a standard task ('sun397', 'cars', 'stanford-cars', 'EuroSAT'...)."""
    key = name.lower().replace("-", "_")
    return BUILTIN.get(_ALIASES.get(name.lower(), key))


def names_from_labels(labels: Sequence[str]) -> list[str]:
    """Prompt-ready class names from a dataset's label names: SUN397-style paths such as
    '/a/airport/terminal' become 'airport terminal', underscores become spaces."""
    out = []
    for label in labels:
        parts = [p for p in str(label).split("/") if p]
        if len(parts) > 1 and len(parts[0]) == 1:
            parts = parts[1:]  # SUN397's one-letter index directory
        out.append(" ".join(parts).replace("_", " ").strip())
    return out


def zeroshot_head(encode: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                  templates: Sequence[str]) -> torch.Tensor:
    """(classes, dim) unit-norm class embeddings: per class, the renormalised mean over templates
    of the normalised text embeddings. `encode(texts)` returns (len(texts), dim) projected text
    features; templates hold '{}' where the class name goes."""
    if not classnames:
        raise RecipeError("A zero-shot head needs at least one class name.")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise RecipeError(f"Zero-shot templates must each contain '{{}}' (the class name's place); "
                          f"got {bad[0]!r}." if bad else "A zero-shot head needs at least one template.")
    rows = []
    for name in classnames:
        embeddings = encode([t.replace("{}", name) for t in templates]).float()
        rows.append(F.normalize(F.normalize(embeddings, dim=-1).mean(0), dim=0))
    return torch.stack(rows)


@dataclass
class ClipHeadConfig:
    """What the steps read from a classifier's `config`, as for a transformers classifier."""

    num_labels: int
    problem_type: str = "single_label_classification"
    id2label: dict[int, str] | None = None  # the head's class names, which string labels map through


@dataclass
class ClipOutput:
    logits: torch.Tensor


class ClipClassifier(nn.Module):
    """A CLIP vision tower with a fixed zero-shot head. Its parameters are exactly the vision
    tower's (named `vision_model.*`, as in CLIP checkpoints); the visual projection, the class
    embeddings and the logit scale are buffers, taken from the base model and never merged."""

    fisher_kind = "classification"

    def __init__(self, vision_model: nn.Module, visual_projection: torch.Tensor, head_weights: torch.Tensor,
                 logit_scale: torch.Tensor, labels: Sequence[str] | None = None):
        super().__init__()
        self.vision_model = vision_model
        self.register_buffer("visual_projection", visual_projection.detach().float().clone())
        self.register_buffer("head_weights", head_weights.detach().float().clone())
        self.register_buffer("logit_scale", logit_scale.detach().float().reshape(()).clone())
        self.config = ClipHeadConfig(num_labels=head_weights.shape[0], id2label=dict(enumerate(labels or [])) or None)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return F.linear(pooled, self.visual_projection.to(pooled.dtype))

    def forward(self, pixel_values: torch.Tensor) -> ClipOutput:
        features = F.normalize(self.image_features(pixel_values).float(), dim=-1)
        return ClipOutput(logits=self.logit_scale.exp() * features @ self.head_weights.T)


def vision_tower_module(vision_config) -> nn.Module:
    """A randomly initialised vision tower whose parameter names are those after `vision_model.`
    (transformers 4 wraps the transformer in CLIPVisionModel.vision_model, 5 does not)."""
    from transformers import CLIPVisionModel

    net = CLIPVisionModel(vision_config)
    return getattr(net, "vision_model", net)


def vision_name(name: str, bare: bool) -> str | None:
    """A checkpoint tensor's name in `vision_model.*` naming, or None outside the vision tower."""
    if name.startswith(VISION_PREFIX):
        return name
    return VISION_PREFIX + name if bare and name.startswith(_BARE_VISION_ROOTS) else None


class VisionTower:
    """The vision tower of a CLIP checkpoint as a TensorSource, named `vision_model.*`."""

    def __init__(self, source, label: str = "model"):
        self.inner = source
        names = source.names()
        bare = not any(n.startswith(VISION_PREFIX) for n in names)
        self._names = {v: n for n in names if (v := vision_name(n, bare)) is not None}
        if not self._names:
            raise ModelError(
                f"Model '{label}' has no CLIP vision tower tensors (names 'vision_model.*' or a bare "
                f"CLIPVisionModel's 'embeddings.*', 'encoder.*'); its names start with "
                f"{', '.join(sorted({n.split('.')[0] for n in names})[:5])}.")

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._names[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._names[name])

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self._names[name])


def text_side_hash(source) -> str:
    """Hash of the tensors a zero-shot head depends on: the base's tensors outside the vision tower
    (text tower, both projections, logit scale). Its config and tokenizer files enter the head's
    key by their own content hashes."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(n for n in source.names() if not n.startswith(VISION_PREFIX)):
        t = source.get(name).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def image_batches(processor, ds, image_column: str, labels, batch_size: int, example_ids=None
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """`pixel_values` (through the CLIP image processor, images converted to RGB), `labels` (when
    given, int64 class indices aligned with `ds`) and `example_ids`, in dataset order."""
    if batch_size < 1:
        raise RecipeError(f"Batch size must be at least 1; got {batch_size}.")
    ids = example_ids if example_ids is not None else range(len(ds))
    for start in range(0, len(ds), batch_size):
        images = ds[start : start + batch_size][image_column]
        for i, im in enumerate(images):
            if not hasattr(im, "convert"):
                raise DataError(f"Row {start + i} of image column '{image_column}' holds {type(im).__name__}, "
                                  f"not an image; the column must be a datasets Image feature.")
        batch = {"pixel_values": processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]}
        if labels is not None:
            batch["labels"] = torch.as_tensor(labels[start : start + batch_size], dtype=torch.int64)
        batch["example_ids"] = torch.as_tensor(list(ids[start : start + batch_size]), dtype=torch.int64)
        yield batch
