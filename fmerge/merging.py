"""Which tensors a merge touches, and the streaming loop that feeds them to a method.

Fine-tuned checkpoints often name tensors with a prefix the base lacks (`bert.encoder...` for a
classifier fine-tuned from a `BertModel`), so each model gets a name map aligned to the reference
(base) naming. The mergeable set is the floating-point tensors that every model has with the
reference's shape, minus `exclude` regexes and head regexes; excluded, head and non-float
reference tensors are copied from the base; tensors only some models have (task heads) stay per
model and are never averaged. A mergeable tensor that some model lacks is an error: nothing is
taken from the base in a model's place unless the recipe says `missing_tensors: base`.
"""

from __future__ import annotations

import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .errors import FmergeError, ModelError, RecipeError
from .io import TensorSource, few
from .methods import MergeContext, MergeMethod, MethodParams, TensorGroup


@dataclass
class TensorPlan:
    reference: list[str]                       # output tensor names, in reference order
    merge: list[str]                           # merged by the method
    copy: list[str]                            # taken from the base unchanged
    name_maps: dict[str, dict[str, str]]       # model -> {reference name: model's name}
    per_model: dict[str, list[str]]            # model -> its own tensors (heads), model naming
    notes: list[str] = field(default_factory=list)
    # reference name -> models lacking it, for tensors taken from the base under `missing_tensors: base`
    from_base: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"merged": len(self.merge), "copied": len(self.copy),
                "per_model": {m: len(v) for m, v in self.per_model.items()}, "notes": self.notes,
                "from_base": self.from_base}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. A sum is one fast reduction (about 30x cheaper than isfinite().all()
    on CPU) and is non-finite whenever an entry is; only then, or on overflow, look entry by entry."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


MISSING_POLICIES = ("error", "base")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def plan_tensors(
    base: TensorSource | None,
    models: dict[str, TensorSource],
    exclude: list[str],
    heads: list[str],
    missing_tensors: str = "error",
) -> TensorPlan:
    """Split the reference's tensors into merged and copied ones; see the module docstring.

    A floating-point reference tensor (not excluded, not a head) that some model lacks is an
    FmergeError unless `missing_tensors` is "base" (the recipe's `missing_tensors`): then the
    output takes the base's value for it, unmerged, and `TensorPlan.from_base` lists it.
    """
    if missing_tensors not in MISSING_POLICIES:
        raise RecipeError(f"missing_tensors: unknown policy '{missing_tensors}'; use one of {', '.join(MISSING_POLICIES)}.")
    ref_src = base if base is not None else next(iter(models.values()))
    reference = ref_src.names()
    name_maps = {m: align_names(reference, src.names()) for m, src in models.items()}
    excl = [re.compile(p) for p in exclude]
    head = [re.compile(p) for p in heads]
    merge, copy, notes, mismatched, not_float = [], [], [], [], []
    lacking: dict[str, list[str]] = {}  # reference name -> models without it
    for r in reference:
        if not ref_src.dtype(r).is_floating_point:
            copy.append(r)
            continue
        if any(p.search(r) for p in excl + head):
            copy.append(r)
            continue
        missing = [m for m, nm in name_maps.items() if r not in nm]
        if missing:
            lacking[r] = missing
            copy.append(r)
            continue
        shapes = {m: tuple(models[m].shape(nm[r])) for m, nm in name_maps.items()}
        if any(s != tuple(ref_src.shape(r)) for s in shapes.values()):
            mismatched.append((r, tuple(ref_src.shape(r)), shapes))
            continue
        dtypes = {m: models[m].dtype(nm[r]) for m, nm in name_maps.items()}
        if not all(d.is_floating_point for d in dtypes.values()):
            not_float.append((r, ref_src.dtype(r), dtypes))
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
        raise ModelError(
            f"Tensor shapes differ between the models: {shown}{more}.{hint} Exclude such tensors with "
            f"'exclude' (they are then taken from the base) or list them in 'heads' to keep them per model."
        )
    if not_float:
        r, ref, dtypes = not_float[0]
        shown = ", ".join(f"{_dtype_name(d)} in model '{m}'" for m, d in dtypes.items() if not d.is_floating_point)
        more = f" ({len(not_float) - 1} more tensor(s) like it)" if len(not_float) > 1 else ""
        raise ModelError(
            f"Tensor '{r}' is {_dtype_name(ref)} in the {'base' if base is not None else 'first model'} but "
            f"{shown}{more}: fmerge merges floating-point tensors only and never converts integer or boolean "
            f"values into weights. Check that the models are plain (not quantized) checkpoints of the same "
            f"architecture, or list such tensors in 'exclude' (taken from the base) or 'heads' (kept per model)."
        )
    if not merge:
        examples = "; ".join(
            f"'{m}' has {', '.join(repr(n) for n in models[m].names()[:3])}"
            for m, nm in name_maps.items() if len(nm) < len(reference)
        )[:600]
        raise ModelError("The models share no floating-point tensor to merge: check that they are "
                          "fine-tuned from the same base and that 'exclude' is not too broad. The base has "
                          f"{', '.join(repr(r) for r in reference[:3])}" + (f"; {examples}" if examples else "") + ".")
    per_model, unmapped = {}, {}
    for m, src in models.items():
        mapped = set(name_maps[m].values())
        own = unmapped[m] = [n for n in src.names() if n not in mapped]
        headish = [n for n in src.names() if any(p.search(n) for p in head) and n not in own]
        per_model[m] = own + headish
    if lacking:
        _check_lacking(ref_src, models, lacking, unmapped, missing_tensors, base is not None)
    return TensorPlan(reference, merge, copy, name_maps, per_model, notes, from_base=lacking)


def _check_lacking(ref_src: TensorSource, models: dict[str, TensorSource], lacking: dict[str, list[str]],
                   unmapped: dict[str, list[str]], policy: str, has_base: bool) -> None:
    """Refuse reference tensors some model lacks, unless the policy takes them from the base.

    A model tensor that looks like a lacking one under another prefix (it would otherwise end up
    among the model's own tensors, and its value never merged) is refused under every policy.
    """
    renamed = []
    for r, ms in lacking.items():
        for m in ms:
            for n in unmapped[m]:
                if ((n.endswith("." + r) or r.endswith("." + n))
                        and tuple(models[m].shape(n)) == tuple(ref_src.shape(r))):
                    renamed.append(f"model '{m}' has '{n}' where the base has '{r}'")
                    break
    if renamed:
        raise ModelError(
            f"Some models name tensors of the base under a different prefix than their other tensors, "
            f"so fmerge would not merge them: {'; '.join(renamed[:3])}"
            f"{f' (and {len(renamed) - 3} more)' if len(renamed) > 3 else ''}. Save the model with one "
            f"consistent naming (every tensor with the same prefix), or list those tensors in 'exclude' "
            f"(then the base's value is used) or in 'heads' (then they stay per model)."
        )
    if policy == "base":
        return
    by_model: dict[str, list[str]] = {}
    for r, ms in lacking.items():
        for m in ms:
            by_model.setdefault(m, []).append(r)
    shown = "; ".join(f"model '{m}' lacks {len(rs)}: {few(rs)}" for m, rs in list(by_model.items())[:4])
    if len(by_model) > 4:
        shown += f"; and {len(by_model) - 4} more models"
    what = "the base" if has_base else "the first model"
    raise ModelError(
        f"{len(lacking)} floating-point tensor(s) of {what} are missing from some models ({shown}), and "
        f"fmerge does not fill them in silently. If a checkpoint is incomplete, fetch or save it again. "
        f"Otherwise add regexes matching them to the recipe's 'exclude' (they are then copied from the "
        f"base), or set 'missing_tensors: base' in the recipe to take the base's value, unmerged, for every "
        f"tensor a model lacks (they are listed in the artifact and the exported model card)."
    )


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
    tensor_params: Callable[[str], MethodParams] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (reference name, output tensor) in reference order, two tensors in memory per model:
    the one merging and the next, read meanwhile in a second thread (`readahead`).

    `tensor_params(name)`, where given, supplies the parameters of each merged tensor (values
    that depend on the tensor, resolved by `TensorParams`); `params` then serves only `prepare`.

    `reference` (the base) gives output names and the tensors copied unchanged; it is read for
    merged tensors only `with_base` (methods that need θ_0), so an average reads N models, not N+1.
    `stats[kind][model]` serves per-model statistics in the model's naming (e.g. Fisher sums);
    a stats entry under the model name "__base__" is passed as `<kind>_base`. A statistic that
    no model has for a tensor is left out of its group.
    """
    stats = stats or {}
    names = list(models)
    covered = {kind: {m: set(src.names()) for m, src in by_model.items()} for kind, by_model in stats.items()}
    buffers = RecycledBuffers()

    def load(src: TensorSource, name: str, what: str, keep_float64: bool = False) -> tuple[torch.Tensor, bool]:
        """A tensor in fp32 on `device`, refused if non-finite: mixed input dtypes merge in fp32.
        Also whether it is a copy that nobody else holds. Statistics stored in float64 (K-FAC
        factors, kept positive semi-definite) stay float64 with `keep_float64`."""
        dtype = torch.float64 if keep_float64 and src.dtype(name) == torch.float64 else torch.float32
        if getattr(src, "fresh_tensors", False) and torch.device(device).type == "cpu":
            t = raw = src.get_as(name, dtype, buffers.take)  # converted piece by piece, fresh
        else:
            raw = src.get(name)
            t = raw.to(device, dtype)
        if not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelError(f"Tensor '{name}' of {what} holds {bad} NaN or Inf value(s); fmerge will not "
                             f"merge it. Check that file (a diverged fine-tune?) or exclude the tensor.")
        return t, t is not raw or getattr(src, "fresh_tensors", False)

    # The inputs of one tensor are read, widened and checked in parallel (file reads and torch
    # ops release the GIL): at 1B parameters one thread doing it for every model was the
    # bottleneck of a linear merge (BENCHMARKS.md).
    loaders = ThreadPoolExecutor(max_workers=max(1, min(4, len(names))), thread_name_prefix="fmerge-load")

    def load_all(jobs: list[tuple]) -> list[tuple[torch.Tensor, bool]]:  # load's arguments
        futures = [loaders.submit(load, *job) for job in jobs]
        try:
            return [f.result() for f in futures]  # the first failure in order is raised
        finally:
            for f in futures:
                f.cancel()

    def group(r: str) -> TensorGroup:
        loaded = load_all([(models[m], plan.name_maps[m][r], f"model '{m}'") for m in names])
        g = TensorGroup(
            name=r,
            base=load_all([(reference, r, "the base model")])[0][0] if with_base else None,
            models=[t for t, _ in loaded],
        )
        g.models_owned = all(owned for _, owned in loaded)
        for kind, by_model in stats.items():
            have = [plan.name_maps[m][r] in covered[kind][m] for m in names]
            if not any(have):
                continue  # a statistic of some tensors only (Grams exist for linear weights only)
            if not all(have):
                lacking = ", ".join(m for m, h in zip(names, have) if not h)
                raise ModelError(f"Tensor '{r}' has {kind} statistics for some models but not for "
                                  f"{lacking}; recompute them from the same architecture.")
            g.stats[kind] = [t for t, _ in load_all([(by_model[m], plan.name_maps[m][r],
                                                     f"the {kind} statistics of model '{m}'", True) for m in names])]
            if "__base__" in by_model and r in covered[kind]["__base__"]:
                g.stats[f"{kind}_base"] = [load_all([(by_model["__base__"], r, f"the {kind} statistics of the base")])[0][0]]
        return g

    try:
        state = None
        if method.needs_prepare(params):
            state = method.prepare(params, readahead(group(r) for r in plan.merge), ctx)
        to_merge = set(plan.merge)

        def inputs() -> Iterator[tuple[str, TensorGroup | torch.Tensor]]:
            for r in plan.reference:
                yield r, group(r) if r in to_merge else reference.get(r)

        # the next tensor's inputs are read (and widened to fp32) in a second thread while this one merges
        for r, loaded in readahead(inputs()):
            if r in to_merge:
                try:
                    out = method.merge(loaded, tensor_params(r) if tensor_params else params, ctx, state)
                except RuntimeError as exc:  # torch: a scale like λ·w beyond float32 ("cannot be converted ... overflow")
                    if "overflow" not in str(exc):
                        raise
                    raise RecipeError(f"Merging tensor '{r}' overflowed float32 ({exc}): the method's parameters "
                                      f"(e.g. lambda times weight) scale it beyond ±{FLOAT32_MAX:.3g}. Use smaller "
                                      f"parameters.") from None
                if not all_finite(out):
                    raise RecipeError(f"Merging tensor '{r}' produced NaN or Inf: check the inputs "
                                      f"(`fmerge verify`) and the method's parameters.")
                wide = out
                out = out.to("cpu", out_dtype or reference.dtype(r))
                if out.dtype != wide.dtype and out.is_floating_point() and not all_finite(out):
                    largest = float(wide.abs().max())
                    dtype = _dtype_name(out.dtype)
                    raise RecipeError(
                        f"Merging tensor '{r}' gives values up to {largest:.4g}, beyond the range of {dtype} "
                        f"(±{torch.finfo(out.dtype).max:.6g}), so the {dtype} output would hold Inf. Write the output "
                        f"in float32 or bfloat16 (--out-dtype float32, or out_dtype: float32 in the recipe's merge "
                        f"step), or use smaller parameters.")
            else:
                out = loaded
                if out.is_floating_point() and not all_finite(out):
                    bad = int((~torch.isfinite(out)).sum())
                    raise ModelError(f"Tensor '{r}' of the base model, copied unchanged into the output, holds {bad} "
                                     f"NaN or Inf value(s); fmerge will not write it. Check that file (a damaged "
                                     f"checkpoint?) and fetch or save the base model again.")
                if out_dtype is not None and out.is_floating_point() and out.dtype != out_dtype:
                    # one dtype for every floating tensor of the output (integer buffers stay as they are)
                    wide, out = out, out.to(out_dtype)
                    if not all_finite(out):
                        raise RecipeError(
                            f"Tensor '{r}', copied from the base, holds values up to {float(wide.abs().max()):.4g}, "
                            f"beyond the range of {_dtype_name(out_dtype)}; write the output in float32 or bfloat16.")
            if on_tensor:
                on_tensor(r)
            yield r, out
    finally:
        loaders.shutdown(wait=True, cancel_futures=True)


class RecycledBuffers:
    """Uninitialised uint8 buffers for the tensors a merge reads, each handed out again once
    nothing uses its memory any more: no tensor, view or array anywhere (a method's output that is
    an input, a tensor the writer still holds) keeps a reference to its storage.

    A new buffer costs the kernel zeroing its pages; after the first tensors a merge reads into
    buffers it already has (~10% less CPU for the λ rerun, BENCHMARKS.md). A request takes the
    smallest free buffer that is large enough, so the buffers held are at most those of the
    tensors in flight at the largest moment; they are freed with the pool. Small requests are left
    to the allocator, which recycles them itself, and so is every request where torch cannot say
    how many tensors use a storage.
    """

    SMALLEST = 1 << 20

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.lock = threading.Lock()
        self.counts = getattr(torch._C, "_storage_Use_Count", None)

    def _in_use(self, buffer: torch.Tensor) -> bool:
        # the buffer itself and the storage object asked here are two uses; any tensor made from
        # it (the view handed out, a reshape, a dtype view, a tensor over its numpy array) is more
        return self.counts(buffer.untyped_storage()._cdata) > 2

    def take(self, size: int) -> torch.Tensor:
        if size < self.SMALLEST or self.counts is None:
            return torch.empty(size, dtype=torch.uint8)
        with self.lock:  # the view is made before another thread can see the buffer free
            free = [b for b in self.buffers if b.numel() >= size and not self._in_use(b)]
            if free:
                return min(free, key=torch.Tensor.numel)[:size]
            buffer = torch.empty(size, dtype=torch.uint8)
            self.buffers.append(buffer)
            return buffer[:size]


T = TypeVar("T")


def readahead(items: Iterator[T]) -> Iterator[T]:
    """What `items` yields, in order, the next item produced in a second thread while the caller
    works on this one, so that reading overlaps arithmetic (file reads and torch ops release the
    GIL). At most two items exist at once: the next one is started only when this one is taken. An
    exception raised by `items` is raised here at its place in the sequence."""
    ready: queue.Queue = queue.Queue()
    may_produce = threading.Semaphore(1)  # released each time the caller takes an item
    stop = threading.Event()

    def produce() -> None:
        try:
            while True:
                while not may_produce.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    item = next(items)
                except StopIteration:
                    ready.put((False, None))
                    return
                ready.put((True, item))
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((False, exc))

    thread = threading.Thread(target=produce, name="fmerge-readahead", daemon=True)
    thread.start()
    try:
        while True:
            more, item = ready.get()
            if not more:
                if item is None:
                    return
                raise item
            may_produce.release()
            yield item
            del item  # not held while the next one is awaited
    finally:  # also when the consumer stops early: the producer ends after its current item
        stop.set()
        thread.join()


def write_behind(items: Iterable[tuple[str, torch.Tensor]], write: Callable[[str, torch.Tensor], None],
                 depth: int = 1) -> None:
    """Hand every (name, tensor) of `items` to `write` in a second thread, at most `depth` waiting,
    so that writing overlaps producing the next one; the first failure of either side is raised."""
    pending: queue.Queue = queue.Queue(maxsize=depth)
    failed: list[BaseException] = []

    def drain() -> None:
        while (entry := pending.get()) is not None:
            if not failed:  # after a failure, only empty the queue so the producer never blocks
                try:
                    write(*entry)
                except BaseException as exc:
                    failed.append(exc)

    thread = threading.Thread(target=drain, name="fmerge-write-behind", daemon=True)
    thread.start()
    try:
        for entry in items:
            if failed:
                getattr(items, "close", lambda: None)()  # a generator's own threads end now
                break
            pending.put(entry)
    finally:
        pending.put(None)
        thread.join()
    if failed:
        raise failed[0]


# ---------------------------------------------------------------------------------------------
# Parameter values that depend on the tensor (mergekit's grammar), resolved here so that methods
# only ever see plain numbers. Beside a number, a parameter (or a per-model entry of one) may be
#   {gradient: [v0, ..., vn]}            interpolated linearly over layer depth, and
#   [{filter: s, value: v}, ..., {value: v}]  the first entry whose `filter` is a substring of the
#                                        tensor name (no filter, or "*", matches every tensor).
# A filter entry's value may itself be a gradient (a plain list of numbers there) or a filter list.

_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_positions(names: list[str]) -> dict[str, float]:
    """Each tensor's depth t in [0, 1] for gradients: layer index / (number of layers − 1).

    The layer index is the first numeric component of the name (`model.layers.7.mlp...`); tensors
    outside the numbered layers (embeddings, final norm, head) get t = 0, and a one-layer model
    t = 1, as in mergekit 0.1.5.
    """
    index = {n: int(m.group(1)) for n in names if (m := _LAYER_RE.search(n))}
    depth = max(index.values(), default=0) + 1
    return {n: (index[n] / (depth - 1) if depth > 1 else 1.0) if n in index else 0.0 for n in names}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_gradient(v) -> bool:
    return isinstance(v, dict) and set(v) == {"gradient"}


def _is_filter_list(v) -> bool:
    return (isinstance(v, list) and bool(v)
            and all(isinstance(e, dict) and "value" in e and set(e) <= {"filter", "value"} for e in v))


def _tensor_dependent(v) -> bool:
    if _is_gradient(v) or _is_filter_list(v):
        return True
    if isinstance(v, dict):
        return any(_tensor_dependent(x) for x in v.values())
    if isinstance(v, list):
        return any(_tensor_dependent(x) for x in v)
    return False


def _gradient_points(v, where: str) -> list[float]:
    points = v["gradient"] if _is_gradient(v) else v
    if not isinstance(points, list) or not points or not all(_is_number(x) for x in points):
        raise RecipeError(f"{where}: a gradient is a non-empty list of numbers, got {points!r}.")
    return points


def interpolate(points: list[float], t: float) -> float:
    """mergekit's gradient: linear interpolation between neighbouring points at t·(n − 1)."""
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * points[i0] + frac * points[i1]


def _filter_value(entry: dict, where: str):
    value = entry["value"]
    return {"gradient": _gradient_points(value, where)} if isinstance(value, list) and not _is_filter_list(value) else value


def resolve_value(v, name: str, t: float, where: str):
    """The plain value `v` takes for tensor `name` at depth `t`."""
    if _is_gradient(v):
        return interpolate(_gradient_points(v, where), t)
    if _is_filter_list(v):
        for i, entry in enumerate(v):
            f = entry.get("filter")
            if f is None or f == "*" or str(f) in name:
                return resolve_value(_filter_value(entry, f"{where}[{i}]"), name, t, f"{where}[{i}].value")
        raise RecipeError(f"{where}: no entry's filter matches tensor '{name}'; end the list with an entry "
                          f"without 'filter' to give the value of all other tensors.")
    if isinstance(v, dict):
        return {k: resolve_value(x, name, t, f"{where}.{k}") for k, x in v.items()}
    if isinstance(v, list):
        return [resolve_value(x, name, t, f"{where}[{i}]") for i, x in enumerate(v)]
    return v


def _options(v, where: str) -> list:
    """Every plain value a tensor-dependent value can take at a gradient point or filter entry."""
    if _is_gradient(v):
        return list(_gradient_points(v, where))
    if _is_filter_list(v):
        return [o for i, e in enumerate(v) for o in _options(_filter_value(e, f"{where}[{i}]"), f"{where}[{i}].value")]
    return [v]


def _variant(v, j: int, where: str):
    """`v` with every tensor-dependent value replaced by its j-th possible value (or its last)."""
    if _is_gradient(v) or _is_filter_list(v):
        options = _options(v, where)
        return options[min(j, len(options) - 1)]
    if isinstance(v, dict):
        return {k: _variant(x, j, f"{where}.{k}") for k, x in v.items()}
    if isinstance(v, list):
        return [_variant(x, j, f"{where}[{i}]") for i, x in enumerate(v)]
    return v


def _choices(v, where: str) -> int:
    if _is_gradient(v) or _is_filter_list(v):
        return len(_options(v, where))
    if isinstance(v, dict):
        return max([_choices(x, f"{where}.{k}") for k, x in v.items()], default=1)
    if isinstance(v, list):
        return max([_choices(x, f"{where}[{i}]") for i, x in enumerate(v)], default=1)
    return 1


class TensorParams:
    """A method's raw parameters whose values may depend on the tensor, resolved per tensor.

    Construction validates the parameters with every value each tensor-dependent entry can take
    (interpolated values lie between those, so ranges hold for them too) and raises pydantic's
    ValidationError for the caller to place in the recipe. `params` is the first of those
    variants: the parameters themselves when nothing depends on the tensor.
    """

    def __init__(self, method: MergeMethod, raw: dict, where: str = "params"):
        self.method, self.raw, self.where = method, raw, where
        self.varies = _tensor_dependent(raw)
        self.variants = [method.Params.model_validate(_variant(raw, j, where)) for j in range(_choices(raw, where))]
        self.params = self.variants[0]
        self._cache: dict[str, MethodParams] = {}
        self._positions: dict[str, float] = {}

    def validate(self, ctx: MergeContext) -> None:
        for params in self.variants:
            self.method.validate(params, ctx)

    def key(self) -> dict:
        """Canonical parameters for a cache key: defaults filled in, tensor-dependent values as written."""
        dumped = self.params.model_dump(by_alias=True, mode="json")
        if self.varies:
            dumped.update({k: v for k, v in self.raw.items() if _tensor_dependent(v)})
        return dumped

    def resolver(self, names: list[str], ctx: MergeContext) -> Callable[[str], MethodParams] | None:
        """name -> that tensor's parameters (validated once per distinct value), or None if none vary."""
        if not self.varies:
            return None
        positions = layer_positions(names)

        def for_tensor(name: str) -> MethodParams:
            resolved = resolve_value(self.raw, name, positions.get(name, 0.0), self.where)
            cache_key = repr(sorted(resolved.items()))
            if cache_key not in self._cache:
                try:
                    params = self.method.Params.model_validate(resolved)
                    self.method.validate(params, ctx)
                except (ValueError, FmergeError) as exc:  # pydantic's ValidationError is a ValueError
                    raise RecipeError(f"{self.where} resolved for tensor '{name}' to {resolved}: {exc}")
                self._cache[cache_key] = params
            return self._cache[cache_key]

        return for_tensor
