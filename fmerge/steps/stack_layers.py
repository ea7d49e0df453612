"""The `stack_layers` step: a model made of layer ranges of other models (mergekit's passthrough
slices, "frankenmerges"); see fmerge/slices.py for which tensor comes from where."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from ..compat import LAYER_COUNT_FIELDS, describe_differences
from ..errors import ModelError, RecipeError
from ..export import export_model_dir
from ..io import parse_dtype
from ..merging import all_finite
from ..model_card import crimes_section
from ..progress import tensor_progress
from ..recipe import Strict
from ..slices import Slice, StackedLayers, layer_count, stacked_config
from ..store import make_key
from .base import Planned, StepKind, register
from .merge import architecture_differences, check_architectures, check_local_architectures, stated_configs

VERSION = 1


class SliceConfig(Strict):
    model: str = Field(description="model whose layers this slice takes")
    layers: tuple[int, int] = Field(description="[start, end): the layer range, end excluded (mergekit's layer_range)")
    scale: Any = Field(None, description="multiply the slice's tensors by this (a number or a per-tensor value)")


class StackLayersConfig(Strict):
    slices: list[SliceConfig] = Field(min_length=1, description="layer ranges, stacked in this order")
    out_dtype: str | None = Field(None, description="dtype of the floating tensors (default: as stored)")
    export: str | None = Field(None, description="write the stacked model here as a Hugging Face directory")


@register
class StackLayersStep(StepKind):
    kind = "stack_layers"
    Config = StackLayersConfig
    description = "Stack layer ranges of models into one deeper model (mergekit's passthrough slices)."
    uses_base = False
    produces_model = True

    def model_refs(self, cfg: StackLayersConfig) -> list[tuple[str, str]]:
        return [("slices", s.model) for s in cfg.slices]

    def models_used(self, cfg: StackLayersConfig, recipe) -> list[str]:
        return list(dict.fromkeys(s.model for s in cfg.slices))

    def check(self, recipe, name: str, cfg: StackLayersConfig) -> None:
        for i, s in enumerate(cfg.slices):
            if not 0 <= s.layers[0] < s.layers[1]:
                raise RecipeError(f"{recipe.where('steps', name, 'slices', i, 'layers')}: layer range {list(s.layers)} "
                                  f"must be [start, end) with 0 ≤ start < end.")
        if cfg.out_dtype:
            parse_dtype(cfg.out_dtype, recipe.where("steps", name, "out_dtype"))
        check_local_architectures(recipe, name, self.models_used(cfg, recipe), LAYER_COUNT_FIELDS, " for stacking")

    def _stacked(self, rt, name: str, cfg: StackLayersConfig) -> StackedLayers:
        where = rt.recipe.where("steps", name, "slices")
        for i, s in enumerate(cfg.slices):
            model_dir = rt.model_dir(s.model)
            if model_dir is not None and (model_dir / "config.json").is_file():
                count = layer_count(model_dir / "config.json", f"Model '{s.model}'")
                if s.layers[1] > count:
                    raise ModelError(f"{where}[{i}]: layer range {list(s.layers)} goes past model '{s.model}', which "
                                     f"has {count} layers (0..{count - 1}).")
        slices = [Slice(s.model, s.layers[0], s.layers[1], s.scale) for s in cfg.slices]
        return StackedLayers({m: rt.source(m) for m in self.models_used(cfg, rt.recipe)}, slices, where)

    def plan(self, rt, name: str, cfg: StackLayersConfig, upstream) -> list[Planned]:
        models = self.models_used(cfg, rt.recipe)
        check_architectures(rt, name, models, ignore=LAYER_COUNT_FIELDS, why=" for stacking")
        hashes = rt.model_hashes(models)
        # By position: a slice names its model by its index in `models`, never by name. Each
        # model's config.json is read too (its layer count bounds the slices).
        inputs = {"models": [hashes[m] for m in models],
                  "configs": [rt.data_hashes.named_files(rt.model_dir(m), ("config.json",))
                              if rt.model_dir(m) is not None else None for m in models]}
        params = {"slices": [{**s.model_dump(mode="json"), "model": models.index(s.model)} for s in cfg.slices],
                  "out_dtype": cfg.out_dtype}
        key = make_key("stack_layers", params, inputs, VERSION)
        return [Planned(name, "", "merge", key, inputs, params, VERSION)]

    def compute(self, rt, name: str, cfg: StackLayersConfig, todo: list[Planned]) -> None:
        (p,) = todo
        stacked = self._stacked(rt, name, cfg)
        out_dtype = parse_dtype(cfg.out_dtype, "out_dtype") if cfg.out_dtype else None
        with rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version) as writer:
            with tensor_progress(rt.console, f"{name}: stack_layers", len(stacked.names())) as advance:
                for n in stacked.names():
                    tensor = stacked.get(n)
                    if tensor.is_floating_point():
                        if out_dtype is not None:
                            tensor = tensor.to(out_dtype)
                        if not all_finite(tensor):
                            raise ModelError(f"Tensor '{n}' of the stacked model holds NaN or Inf (from a source "
                                             f"model, a scale, or the cast to {cfg.out_dtype}); fmerge will not write it.")
                    writer.write("weights/" + n, tensor)
                    advance()
            writer.commit({"step": name, "layers": stacked.layers, "slices": [s.model_dump(mode="json") for s in cfg.slices]})

    def export(self, rt, name: str, cfg: StackLayersConfig, planned: list[Planned]) -> str | None:
        if not cfg.export:
            return None
        (p,) = planned
        artifact = rt.store.open(p.key)
        first = cfg.slices[0].model
        source_dir = rt.model_dir(first)

        def write_config(directory) -> None:
            config_file = directory / "config.json"
            if not config_file.is_file():
                return
            source_layers = layer_count(config_file, f"Model '{first}'")
            config = stacked_config(json.loads(config_file.read_text()), artifact.meta["layers"], source_layers,
                                    f"Model '{first}'")
            if cfg.out_dtype:
                dtype = str(parse_dtype(cfg.out_dtype, "out_dtype")).removeprefix("torch.")
                config.update({k: dtype for k in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]})
            config_file.unlink()  # a copy fmerge just made in its own build directory
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

        readme = (f"---\ntags: [fmerge, stack_layers]\n---\n# Layers stacked with fmerge\n\nStep `{name}`: "
                  + ", ".join(f"{s.model} layers {s.layers[0]}..{s.layers[1] - 1}" for s in cfg.slices)
                  + f" ({artifact.meta['layers']} layers). Artifact key `{p.key}`.\n")
        if rt.recipe.spec.allow_crimes:
            readme += "\n" + crimes_section(describe_differences(architecture_differences(
                rt.recipe, stated_configs(rt, self.models_used(cfg, rt.recipe)), LAYER_COUNT_FIELDS)),
                f"that of model '{first}' (the first slice's)") + "\n"
        return export_model_dir(rt.store, rt.recipe.resolve(cfg.export), p.key, artifact.view("weights/"), step=name,
                                where=rt.recipe.where("steps", name, "export"), readme=readme,
                                side_files_from=source_dir, finish=write_config)
