"""The `finetune` step: a short, seeded fine-tune of the base on one task, cached as an artifact.

It exists so a demo or an experiment can build its own model zoo reproducibly; the resulting
model is used in `models:` with `from_step`. It trains without dropout and draws nothing from
torch's global generator (fmerge/finetune.py), so one key names one set of weights even when
fine-tunes run in several threads of one process.
"""

from __future__ import annotations

from types import SimpleNamespace

from pydantic import Field

from ..compat import DEFAULT_MAX_LENGTH, MAX_LENGTH_HELP
from ..data import encode_batches, label_names_for, load_dataset_split
from ..errors import RecipeError
from ..finetune import finetune_classifier, fresh_classifier, tensor_batches
from ..progress import tensor_progress
from ..recipe import BASE, Strict
from ..store import make_key
from ..tasks import data_inputs, data_spec, load_subset, load_tokenizer, side_inputs
from .base import Planned, StepKind, register

VERSION = 2  # 2: head drawn from a generator of its own, no dropout (fmerge/finetune.py); id2label names the classes


class FinetuneConfig(Strict):
    data: str = Field(description="name of the task's entry in `data`")
    examples: int | None = Field(2000, description="training rows used (seeded subset)")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = 0.01
    warmup: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=2, description=MAX_LENGTH_HELP)
    seed: int | None = None
    config_overrides: dict = Field({}, description="transformers config changes, e.g. num_hidden_layers")


@register
class FinetuneStep(StepKind):
    kind = "finetune"
    Config = FinetuneConfig
    produces_model = True

    def models_used(self, cfg, recipe) -> list[str]:
        return []

    def fitted_on(self, recipe, cfg):
        if cfg.data not in recipe.spec.data:
            return []
        return [("data", "trains on", "Train on another split (data.{data}.train_split)", cfg.data,
                 recipe.spec.data[cfg.data].train_split)]

    def check(self, recipe, name: str, cfg: FinetuneConfig) -> None:
        if cfg.data not in recipe.spec.data:
            raise RecipeError(f"{recipe.where('steps', name, 'data')}: no data entry named '{cfg.data}'; "
                              f"entries: {', '.join(recipe.spec.data) or 'none'}.")

    def plan(self, rt, name: str, cfg: FinetuneConfig, upstream) -> list[Planned]:
        seed = cfg.seed if cfg.seed is not None else rt.recipe.spec.seed
        split = rt.recipe.spec.data[cfg.data].train_split
        params = cfg.model_dump(mode="json", exclude={"data"}) | {"seed": seed, "split": split}
        # the base's config (the fresh classifier's architecture) and tokenizer
        inputs = {"base": rt.model_hash(BASE), "side": side_inputs(rt, BASE), "data": data_inputs(rt, cfg.data, split)}
        key = make_key("finetune", params, inputs, VERSION)
        return [Planned(name, "", "finetune", key, inputs, params, VERSION)]

    def compute(self, rt, name: str, cfg: FinetuneConfig, todo: list[Planned]) -> None:
        (p,) = todo
        dspec = data_spec(rt, cfg.data, p.params["split"])
        # The new head's classes: the data's label_names, else its ClassLabel names or sorted string
        # labels over the whole split; its id2label records them, so evaluations map by them.
        labels = rt.recipe.spec.data[cfg.data].label_names
        if not labels and dspec.label_column is not None:
            labels = label_names_for(load_dataset_split(dspec), dspec)
        if not labels:
            raise RecipeError(f"{rt.recipe.where('steps', name, 'data')}: finetune needs class labels; "
                              f"set 'label_names' in data.{cfg.data}.")
        head = SimpleNamespace(num_labels=len(labels), id2label=dict(enumerate(labels)))
        sub = load_subset(rt, cfg.data, p.params["split"], cfg.examples, p.params["seed"], head)
        tok = load_tokenizer(rt, BASE)
        batches = list(encode_batches(tok, sub.rows, dspec, len(sub.rows), cfg.max_length))
        (features,) = batches
        features.pop("example_ids")
        model = fresh_classifier(rt.model_dir(BASE), len(labels), p.params["seed"], **cfg.config_overrides)
        model.config.id2label, model.config.label2id = head.id2label, {n: i for i, n in head.id2label.items()}
        with tensor_progress(rt.console, f"{name}: fine-tune", cfg.steps) as advance:
            log = finetune_classifier(model, tensor_batches(features, cfg.batch_size, p.params["seed"]),
                                      steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      warmup=cfg.warmup, device=rt.device,
                                      progress=advance)
        with rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version) as writer:
            for n, t in model.state_dict().items():
                writer.write("weights/" + n, t)
            config = model.config.to_dict()
            writer.commit({"step": name, "config": config, "label_names": labels,
                           "train_accuracy": log["train_accuracy"], "seconds": log["seconds"],
                           "final_loss": log["losses"][-1]})
