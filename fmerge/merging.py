"""Which tensors a merge touches, and the streaming loop that feeds them to a method.

Fine-tuned checkpoints often name tensors with a prefix the base lacks (`bert.encoder...` for a
classifier fine-tuned from a `BertModel`), so each model gets a name map aligned to the reference
(base) naming. The mergeable set is the floating-point tensors that every model has with the
reference's shape, minus `exclude` regexes and head regexes; other reference tensors are copied
from the base; tensors only some models have (task heads) stay per model and are never averaged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .errors import FmergeError
from .io import TensorSource
from .methods import MergeContext, MergeMethod, MethodParams, TensorGroup


@dataclass
class TensorPlan:
    reference: list[str]                       # output tensor names, in reference order
    merge: list[str]                           # merged by the method
    copy: list[str]                            # taken from the base unchanged
    name_maps: dict[str, dict[str, str]]       # model -> {reference name: model's name}
    per_model: dict[str, list[str]]            # model -> its own tensors (heads), model naming
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"merged": len(self.merge), "copied": len(self.copy),
                "per_model": {m: len(v) for m, v in self.per_model.items()}, "notes": self.notes}


def align_names(reference: list[str], model_names: list[str]) -> dict[str, str]:
    """Map reference names to a model's names: identical, or differing by one leading prefix."""
    have = set(model_names)
    best = {r: r for r in reference if r in have}
    if len(best) == len(reference):
        return best
    prefixes = set()
    for r in reference[:50]:
        for m in model_names:
            if m.endswith("." + r):
                prefixes.add(("add", m[: -len(r)]))
            if r.endswith("." + m):
                prefixes.add(("strip", r[: -len(m)]))
    for how, p in prefixes:
        if how == "add":
            cand = {r: p + r for r in reference if p + r in have}
        else:
            cand = {r: r[len(p):] for r in reference if r.startswith(p) and r[len(p):] in have}
        if len(cand) > len(best):
            best = cand
    return best


def plan_tensors(
    base: TensorSource | None,
    models: dict[str, TensorSource],
    exclude: list[str],
    heads: list[str],
) -> TensorPlan:
    ref_src = base if base is not None else next(iter(models.values()))
    reference = ref_src.names()
    name_maps = {m: align_names(reference, src.names()) for m, src in models.items()}
    excl = [re.compile(p) for p in exclude]
    head = [re.compile(p) for p in heads]
    merge, copy, notes, mismatched = [], [], [], []
    for r in reference:
        if not ref_src.dtype(r).is_floating_point:
            copy.append(r)
            continue
        if any(p.search(r) for p in excl + head):
            copy.append(r)
            continue
        missing = [m for m, nm in name_maps.items() if r not in nm]
        if missing:
            notes.append(f"'{r}' missing in {', '.join(missing)}: copied from base")
            copy.append(r)
            continue
        shapes = {m: tuple(models[m].shape(nm[r])) for m, nm in name_maps.items()}
        if any(s != tuple(ref_src.shape(r)) for s in shapes.values()):
            mismatched.append((r, tuple(ref_src.shape(r)), shapes))
            continue
        merge.append(r)
    if mismatched:
        shown = "; ".join(
            f"'{r}' is {list(ref)} in the base but " + ", ".join(f"{list(s)} in {m}" for m, s in shapes.items() if s != ref)
            for r, ref, shapes in mismatched[:3]
        )
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        vocab = any("embed" in r or "lm_head" in r for r, _, _ in mismatched)
        hint = (" This looks like a vocabulary-size mismatch: the models were trained with different "
                "tokenizers or added tokens." if vocab else "")
        raise FmergeError(
            f"Tensor shapes differ between the models: {shown}{more}.{hint} Exclude such tensors with "
            f"'exclude' (they are then taken from the base) or list them in 'heads' to keep them per model."
        )
    if not merge:
        raise FmergeError("The models share no floating-point tensor to merge: check that they are "
                          "fine-tuned from the same base and that 'exclude' is not too broad.")
    per_model = {}
    for m, src in models.items():
        mapped = set(name_maps[m].values())
        own = [n for n in src.names() if n not in mapped]
        headish = [n for n in src.names() if any(p.search(n) for p in head) and n not in own]
        per_model[m] = own + headish
    return TensorPlan(reference, merge, copy, name_maps, per_model, notes)


def merge_stream(
    method: MergeMethod,
    params: MethodParams,
    ctx: MergeContext,
    plan: TensorPlan,
    reference: TensorSource,
    models: dict[str, TensorSource],
    *,
    with_base: bool,
    stats: dict[str, dict[str, TensorSource]] | None = None,
    device: str = "cpu",
    out_dtype: torch.dtype | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (reference name, output tensor) in reference order, one tensor in memory per model.

    `reference` (the base) gives output names and the tensors copied unchanged; it is read for
    merged tensors only `with_base` (methods that need θ_0), so an average reads N models, not N+1.
    `stats[kind][model]` serves per-model statistics in the model's naming (e.g. Fisher sums);
    a stats entry under the model name "__base__" is passed as `<kind>_base`.
    """
    stats = stats or {}
    names = list(models)

    def group(r: str) -> TensorGroup:
        g = TensorGroup(
            name=r,
            base=reference.get(r).to(device, torch.float32) if with_base else None,
            models=[models[m].get(plan.name_maps[m][r]).to(device, torch.float32) for m in names],
        )
        for kind, by_model in stats.items():
            g.stats[kind] = [by_model[m].get(plan.name_maps[m][r]).to(device, torch.float32) for m in names]
            if "__base__" in by_model:
                g.stats[f"{kind}_base"] = [by_model["__base__"].get(r).to(device, torch.float32)]
        return g

    state = None
    if method.needs_prepare(params):
        state = method.prepare(params, (group(r) for r in plan.merge), ctx)
    to_merge = set(plan.merge)
    for r in plan.reference:
        if r in to_merge:
            out = method.merge(group(r), params, ctx, state)
            if not torch.isfinite(out).all():
                raise FmergeError(f"Merging tensor '{r}' produced NaN or Inf: check the inputs "
                                  f"(`fmerge verify`) and the method's parameters.")
            out = out.to("cpu", out_dtype or reference.dtype(r))
        else:
            out = reference.get(r)
        if on_tensor:
            on_tensor(r)
        yield r, out
