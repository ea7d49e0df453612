"""The `eval` step: per task, for the base, each fine-tuned model and merges, accuracy and
macro-F1 (classification), per-token loss and perplexity (language modelling), or acc and
acc_norm by log-likelihood (multiple choice, lm-evaluation-harness's convention); see
fmerge/lm_scoring.py.

Each (weights, task, settings) result is its own artifact, so re-evaluating an unchanged model is
free. A merged body is evaluated on each task through that task's own head. A swept merge (see
fmerge/sweep.py) is chosen on the selection split, by mean accuracy or, on causal-LM data, by mean
per-token loss (CHOICE_METRIC), and only the chosen variant is scored on the test split, so the
test split never influences the choice.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import torch
from pydantic import Field

from .. import distributed
from ..compat import DEFAULT_MAX_LENGTH, MAX_LENGTH_HELP
from ..data import EXAMPLE_ID_COLUMN, answer_index, shard_by_rank
from ..errors import DataError, RecipeError
from ..lm_scoring import choice_accuracy, nll_sum, perplexity, sequence_logliks
from ..merging import align_names
from ..progress import tensor_progress
from ..recipe import BASE, Strict
from ..store import make_key
from ..sweep import swept_values
from ..tasks import (build_task_model, data_inputs, data_spec, load_subset, side_inputs, task_batches, task_data,
                     task_kind)
from .base import Planned, StepKind, register
from .zeroshot_head import head_dependency

VERSION = 1


class EvalConfig(Strict):
    merges: list[str] = Field([], description="merge steps to evaluate")
    artifacts: list[str] = Field([], description="merged weights in the store (full artifact keys) to evaluate, "
                                 "each through the task model's config, tokenizer and head (fmerge eval KEY)")
    head_file: str | None = Field(None, description="a .safetensors file whose tensors replace the task model's "
                                  "classification head (fmerge eval --head)")
    individual: bool = Field(True, description="also evaluate each fine-tuned model on its own task")
    base: bool = Field(True, description="also evaluate the base body with each task's head")
    split: str | None = Field(None, description="data split reported (default: each task's test split)")
    limit: int | None = Field(None, ge=1, description="seeded subset of at most this many rows")
    select_split: str | None = Field(None, description="split on which swept merges are chosen (default: each "
                                     "task's validation split); the test split is never used to choose")
    select_limit: int | None = Field(None, ge=1, description="rows per task for choosing (default: limit)")
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=2, description=MAX_LENGTH_HELP)
    seed: int | None = None
    models: list[str] | None = Field(None, description="tasks (models) to evaluate on (default: all)")
    output: str | None = Field(None, description="write results.json and results.csv in this directory")
    allow_split_overlap: bool = Field(False, description="report even where a split reported shares rows with one "
                                      "that something evaluated was fit to (adapted, estimated or trained on) or "
                                      "that swept variants are chosen on; by default that is an error")


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


# The figure a results table shows per task kind (multiple choice and classification: `accuracy`).
METRIC = {"classification": "accuracy", "image": "accuracy", "multiple_choice": "accuracy",
          "causal_lm": "perplexity"}
# What a sweep's variants are ranked by on the selection split, per task kind, and the rule: the
# mean over tasks of accuracy (highest wins) or of per-token loss, the log of perplexity (lowest
# wins); the first variant on ties. A sweep over tasks of both kinds has no common figure.
CHOICE_METRIC = {"classification": "accuracy", "image": "accuracy", "multiple_choice": "accuracy",
                 "causal_lm": "loss"}
CHOICE_RULE = {"accuracy": "highest mean selection accuracy over tasks; the first variant on ties",
               "loss": "lowest mean selection per-token loss (log perplexity) over tasks; the first variant on ties"}


def read_head_file(path: Path, model_names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of a head file, each of which must name a tensor of the task model (a file
    meant for another architecture would otherwise be ignored, silently)."""
    from safetensors.torch import load_file

    from ..io import read_safetensors_header

    if not path.is_file() or path.suffix != ".safetensors":
        raise RecipeError(f"Head file {path} is not a .safetensors file; give the head's tensors (e.g. "
                          f"classifier.weight, classifier.bias) saved with safetensors.")
    names = [t[0] for t in read_safetensors_header(path, "Head file").tensors]  # checked before it is read
    unknown = [n for n in names if n not in model_names]
    if unknown:
        heads = ", ".join(n for n in model_names if "classifier" in n or "score" in n)
        raise RecipeError(f"Head file {path}: tensor(s) {', '.join(unknown[:3])} are not tensors of the task model "
                          f"(its head is e.g. {heads}); "
                          f"name the head's tensors as the model names them.")
    tensors = load_file(path)
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise RecipeError(f"Head file {path}: tensor {bad[0]} holds NaN or infinite values; fix the head.")
    return tensors


def _inputs(rt, batch: dict) -> dict:
    return {k: v.to(rt.device) for k, v in batch.items() if k not in ("labels", "example_ids", "choice_ids")}


def classification_scores(rt, model, batches) -> dict:
    preds, golds = [], []
    for batch in batches:
        preds += model(**_inputs(rt, batch)).logits.argmax(-1).tolist()
        golds += batch["labels"].tolist()
    pred = torch.tensor(distributed.gather(preds), dtype=torch.int64)
    gold = torch.tensor(distributed.gather(golds), dtype=torch.int64)
    return {"accuracy": float((pred == gold).float().mean()), "macro_f1": macro_f1(pred, gold, model.config.num_labels),
            "n": int(gold.numel())}


def language_model_scores(rt, model, batches, spec) -> dict:
    """Per-token loss and perplexity over every scored token of the rows (not a mean over rows)."""
    sums, rows = [], set()
    for batch in batches:
        sums.append(nll_sum(model(**_inputs(rt, batch)).logits.cpu(), batch["labels"]))
        rows.update(batch["example_ids"].tolist())
    sums, rows = distributed.gather(sums), set(distributed.gather(sorted(rows)))
    total, tokens = sum(nll for nll, _ in sums), sum(count for _, count in sums)
    if tokens == 0:
        raise DataError(f"Dataset '{spec.path}': its texts (column '{spec.text_column}') hold no token to score; "
                        f"a perplexity needs text after the prompt.")
    return {"loss": total / tokens, "perplexity": perplexity(total, tokens), "tokens": tokens, "n": len(rows)}


def multiple_choice_scores(rt, model, batches, rows, spec) -> dict:
    """acc and acc_norm (lm_scoring.choice_accuracy) over the rows; `accuracy` is acc."""
    choices = rows[spec.choices_column]
    logliks = [[0.0] * len(c) for c in choices]
    position = {int(e): i for i, e in enumerate(rows[EXAMPLE_ID_COLUMN])} if EXAMPLE_ID_COLUMN in rows.column_names \
        else None
    for batch in batches:
        scores = sequence_logliks(model(**_inputs(rt, batch)).logits.cpu(), batch["labels"])
        for e, c, x in zip(batch["example_ids"].tolist(), batch["choice_ids"].tolist(), scores.tolist()):
            logliks[position[e] if position else e][c] = x
    ids = rows[EXAMPLE_ID_COLUMN] if position else range(len(choices))
    # Under torchrun each rank scored its shard: all rows, back in their order, on every rank.
    gathered = sorted(distributed.gather(list(zip(ids, logliks, choices, rows[spec.label_column]))))
    _, logliks, choices, golds = (list(column) for column in zip(*gathered)) if gathered else ([], [], [], [])
    result = choice_accuracy(logliks, choices, [answer_index(g) for g in golds])
    return {**result, "accuracy": result["acc"], "n": len(choices)}


@register
class EvalStep(StepKind):
    kind = "eval"
    Config = EvalConfig
    distributed = True

    def step_refs(self, cfg):
        return [("merges", m) for m in cfg.merges]

    def model_refs(self, cfg):
        return [("models", m) for m in cfg.models or []]

    def models_used(self, cfg, recipe):
        return cfg.models or list(recipe.models)

    def check(self, recipe, name, cfg):
        check_split_leaks(recipe, name, cfg)

    def plan(self, rt, name, cfg, upstream):
        """Test-split items for the base, individual models and plain merges; for a swept merge,
        every variant on the selection split, the choice among them (an artifact of its own), and
        the test-split items of whichever variant that choice names."""
        seed = cfg.seed if cfg.seed is not None else rt.recipe.spec.seed
        sweeps = rt.recipe.sweeps
        tasks = self.models_used(cfg, rt.recipe)
        plain = [("base", "base:" + rt.model_hash(BASE))] if cfg.base else []
        plain += [(m, upstream[m][0].key) for m in cfg.merges if m not in sweeps]
        for key in cfg.artifacts:
            if not rt.store.has(key) or rt.store.open(key).kind != "merge":
                raise RecipeError(f"{rt.recipe.where('steps', name, 'artifacts')}: store {rt.store.root} holds no "
                                  f"merge artifact '{key}'; `fmerge ls` lists the merges it holds.")
            plain.append((f"merge {key[:12]}", key))
        planned = []
        for task in tasks:
            rows = [*plain, *([("individual", "model:" + rt.model_hash(task))] if cfg.individual else [])]
            for variant, weights in rows:
                planned.append(self._item(rt, name, cfg, seed, task, "test", {"weights": weights}, variant=variant))
        swept = [m for m in cfg.merges if m in sweeps]
        metric = self._choice_metric(rt, name, tasks) if swept else None
        for group in swept:
            variants = {v.name: upstream[v.name][0].key for v in sweeps[group]}
            select = [self._item(rt, name, cfg, seed, task, "select", {"weights": key}, variant=v, group=group)
                      for v, key in variants.items() for task in tasks]
            params = {"rule": CHOICE_RULE[metric]}
            inputs = {"results": [p.key for p in select]}
            choice = Planned(name, f"{group}|choice", "sweep_choice", make_key("sweep_choice", params, inputs, VERSION),
                             inputs, params, VERSION,
                             {"role": "choice", "group": group, "variants": list(variants), "metric": metric},
                             deps=select)
            planned += [*select, choice]
            planned += [self._item(rt, name, cfg, seed, task, "test", {"choice": choice.key}, group=group,
                                   deps=[choice], variants=variants) for task in tasks]
        return planned

    @staticmethod
    def _choice_metric(rt, name, tasks: list[str]) -> str:
        """The one metric a sweep is chosen by on these tasks (CHOICE_METRIC), or a RecipeError."""
        by_metric: dict[str, list[str]] = {}
        for task in tasks:
            by_metric.setdefault(CHOICE_METRIC[task_kind(rt, task)], []).append(task)
        if len(by_metric) > 1:
            kinds = "; ".join(f"{metric}: {', '.join(ts)}" for metric, ts in by_metric.items())
            raise RecipeError(f"{rt.recipe.where('steps', name)}: its swept merges would be chosen on tasks scored "
                              f"by different metrics ({kinds}), which no mean can combine; evaluate the language "
                              f"models and the classifiers in separate eval steps (`models:`).")
        return next(iter(by_metric))

    def _item(self, rt, name, cfg, seed, task, role, weights: dict, variant=None, group=None, deps=(),
              variants=None) -> Planned:
        data = task_data(rt, task, ("steps", name))
        entry = rt.recipe.spec.data[data]
        split = (cfg.split or entry.test_split) if role == "test" else (cfg.select_split or entry.validation_split)
        limit = cfg.limit if role == "test" else (cfg.select_limit or cfg.limit)
        params = {"split": split, "limit": limit, "max_length": cfg.max_length, "seed": seed}
        head, head_deps = head_dependency(rt, task)
        inputs = {**weights, "task_model": rt.model_hash(task), "side": side_inputs(rt, task),
                  "data": data_inputs(rt, data, split), **head}
        if cfg.head_file:
            head_file = rt.recipe.resolve(cfg.head_file)
            if not head_file.is_file():
                raise RecipeError(f"{rt.recipe.where('steps', name, 'head_file')}: head file {head_file} does not "
                                  f"exist or is not a file; give a .safetensors file of the head's tensors.")
            inputs["head_file"] = rt.data_hashes.tree(head_file)
        extra = {"data": data, "variant": variant, "task": task, "role": role, "group": group, "variants": variants}
        return Planned(name, f"{variant or group}|{task}|{split}", "eval", make_key("eval", params, inputs, VERSION),
                       inputs, params, VERSION, extra, [*head_deps, *deps])

    def compute(self, rt, name, cfg, todo):
        with tensor_progress(rt.console, f"{name}: evaluate", len(todo)) as advance:
            for p in todo:
                if p.kind == "sweep_choice":
                    if distributed.is_main():  # under torchrun the other ranks wait, then read the choice
                        self._choose(rt, name, p)
                    distributed.barrier()
                else:
                    self._evaluate(rt, name, cfg, p)
                advance()

    def _choose(self, rt, name, p) -> None:
        """Write which variant has the best mean of the choice metric on the selection split (first
        on ties); only selection-split results are read, so the test split never influences the choice."""
        metric = p.extra["metric"]
        scores: dict[str, list[float]] = {v: [] for v in p.extra["variants"]}
        for dep in p.deps:
            scores[dep.extra["variant"]].append(rt.store.open(dep.key).meta[metric])
        means = [sum(s) / len(s) for s in scores.values()]
        better = 1 if metric == "accuracy" else -1  # loss: lowest wins
        index = max(range(len(means)), key=lambda i: (better * means[i], -i))
        rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version).commit(
            {"step": name, "group": p.extra["group"], "winner_index": index, "winner": p.extra["variants"][index],
             "metric": metric, f"mean_{metric}": means})

    def _evaluate(self, rt, name, cfg, p) -> None:
        task = p.extra["task"]
        variant, weights = winner(rt, p) if "choice" in p.inputs else (p.extra["variant"], p.inputs["weights"])
        body = self._body(rt, variant, weights, task)
        if cfg.head_file:
            body = {**(body or {}), **read_head_file(rt.recipe.resolve(cfg.head_file), rt.source(task).names())}
        model = build_task_model(rt, task, body, head=p.inputs.get("head"))
        spec = data_spec(rt, p.extra["data"], p.params["split"])
        sub = load_subset(rt, p.extra["data"], p.params["split"], p.params["limit"], p.params["seed"], model.config)
        kind = task_kind(rt, task)
        # Under torchrun each rank scores its rows (rank::world_size) and the scorers gather them.
        # task_batches caps max_length at the model's position table (an LM scores longer texts in windows).
        rows = shard_by_rank(sub.rows)
        batches = task_batches(rt, task, rows, spec, cfg.batch_size, cfg.max_length)
        with torch.no_grad():
            if kind == "causal_lm":
                scores = language_model_scores(rt, model, batches, spec)
            elif kind == "multiple_choice":
                scores = multiple_choice_scores(rt, model, batches, rows, spec)
            else:
                scores = classification_scores(rt, model, batches)
        if not distributed.is_main():
            return
        result = {**scores, "metric": METRIC[kind], "task_kind": kind, "variant": variant, "task": task,
                  "split": p.params["split"]}
        writer = rt.store.writer(p.key, p.kind, p.inputs, p.params, p.version)
        writer.commit({"step": name, **result})

    def _body(self, rt, variant: str, weights: str, task: str) -> dict[str, torch.Tensor] | None:
        """Weights replacing the task model's own body: the base's, or a merge's (model naming)."""
        if variant == "individual":
            return None
        src = rt.source(BASE) if variant == "base" else rt.store.open(weights).view("weights/")
        names = align_names(src.names(), rt.source(task).names())
        return {names[r]: src.get(r) for r in src.names() if r in names and not _is_head(rt, names[r])}

    def export(self, rt, name, cfg, planned):
        """Gather the results the plan named (all computed by now) into tables and files."""
        results, sweeps = gather_results(rt, name, planned)
        rt.results[name], rt.sweep_results[name] = results, sweeps
        notes = export_chosen(rt, name, planned)
        if not cfg.output:
            return "; ".join(notes) or None
        from ..export import write_outputs

        out = rt.recipe.resolve(cfg.output)
        files, plots = output_files(results, sweeps)
        # Each file is written only when its content changes, so a run that changes nothing leaves
        # their mtimes alone and Make sees no newer file (README: "Make"); a plot is drawn from
        # sweeps.json's content.
        write_outputs(rt.store, out, files, {name: _plotter(s) for name, s in plots.items()},
                      redraw="sweeps.json" in files and not _same_output(out, "sweeps.json", files["sweeps.json"]),
                      where=rt.recipe.where("steps", name, "output"))
        return "; ".join([f"results in {out}", *notes])

    def outputs_state(self, rt, name, cfg, planned):
        """What the next run's `export` would change: a chosen variant's export, or a results file."""
        from ..export import output_state
        from ..graph import kind_of

        for _, variant, vcfg in chosen_exports(rt, name, planned):
            state = rt.recipe.kinds[kind_of(rt.recipe, variant)].outputs_state(rt, variant, vcfg, rt.planned[variant])
            if state:
                return state
        if not cfg.output:
            return None
        results, sweeps = gather_results(rt, name, planned)
        files, plots = output_files(results, sweeps)
        return output_state(rt.recipe.resolve(cfg.output), files, list(plots))


def gather_results(rt, name: str, planned: list[Planned]) -> tuple[list[dict], list[dict]]:
    """(test-split result rows, sweep summaries) of an eval step whose artifacts are all cached;
    reads only their attributes."""
    results, selection = [], []
    for p in planned:
        if p.kind == "sweep_choice":
            continue
        # Names come from this recipe: a cached result may have been computed under other names.
        variant = winner(rt, p)[0] if "choice" in p.inputs else p.extra["variant"]
        row = {**rt.store.open(p.key).meta, "variant": variant, "task": p.extra["task"], "group": p.extra["group"]}
        (results if p.extra["role"] == "test" else selection).append(row)
    for row in results:
        row["selected_on"] = selection_split(planned, row["group"])
    return results, summarize_sweeps(rt, planned, selection)


def output_files(results: list[dict], sweeps: list[dict]) -> tuple[dict[str, bytes], dict[str, dict]]:
    """({file name: bytes} of results.json, results.csv and sweeps.json, {plot name: its sweep})."""
    table = io.StringIO(newline="")
    lm_columns = [c for c in ("acc", "acc_norm", "loss", "perplexity", "tokens") if any(c in r for r in results)]
    w = csv.DictWriter(table, fieldnames=["variant", "task", "split", "accuracy", "macro_f1", "n", *lm_columns,
                                          "selected_on"], extrasaction="ignore")
    w.writeheader()
    w.writerows(results)
    files = {"results.json": json.dumps(results, indent=2).encode(), "results.csv": table.getvalue().encode()}
    if sweeps:
        files["sweeps.json"] = json.dumps(sweeps, indent=2, default=str).encode()
    return files, {f"sweep_{s['group']}.png": s for s in sweeps}


def _plotter(sweep: dict):
    def draw(path: Path) -> None:
        from ..plots import sweep_plot  # matplotlib: only when a plot is drawn

        sweep_plot(sweep, path)
    return draw


def _same_output(out: Path, name: str, data: bytes) -> bool:
    try:
        return (out / name).read_bytes() == data
    except OSError:
        return False


def chosen_exports(rt, name: str, planned: list[Planned]) -> list[tuple[str, str, object]]:
    """(swept step, chosen variant, its config exporting to the step's `export`) of each sweep
    this eval step chooses for and exports (graph: sweep exports); the choices are cached."""
    found = []
    for p in planned:
        group = p.extra["group"]
        if p.kind != "sweep_choice" or rt.recipe.chosen_exports.get(group, (None,))[0] != name:
            continue
        variant = p.extra["variants"][rt.store.open(p.key).meta["winner_index"]]
        found.append((group, variant, rt.recipe.steps[variant].model_copy(
            update={"export": rt.recipe.chosen_exports[group][1]})))
    return found


def export_chosen(rt, name: str, planned: list[Planned]) -> list[str]:
    """Export the variant this eval step chose of each swept step whose `export` names one
    directory (graph: sweep exports), through that step's own export; returns what was done."""
    from ..graph import kind_of

    notes = []
    for _, variant, cfg in chosen_exports(rt, name, planned):
        note = rt.recipe.kinds[kind_of(rt.recipe, variant)].export(rt, variant, cfg, rt.planned[variant])
        notes.append(f"{note} (variant {variant}, chosen on validation)")
    return notes


def winner(rt, p: Planned) -> tuple[str, str]:
    """(variant name in this recipe, its merge's key) of the sweep choice a test item depends on."""
    index = rt.store.open(p.inputs["choice"]).meta["winner_index"]
    variant = list(p.extra["variants"])[index]
    return variant, p.extra["variants"][variant]


def selection_split(planned: list[Planned], group: str | None) -> str | None:
    splits = {p.params["split"] for p in planned if p.extra["group"] == group and p.extra["role"] == "select"}
    return ", ".join(sorted(splits)) if group else None


def summarize_sweeps(rt, planned: list[Planned], selection: list[dict]) -> list[dict]:
    """Per swept merge: each variant's swept values and selection-split scores under the metric
    that chose (`metric`: accuracy or loss, CHOICE_METRIC), and the winner."""
    summaries = []
    for group, variants in rt.recipe.sweeps.items():
        rows = [r for r in selection if r["group"] == group]
        choice = next((p for p in planned if p.extra["group"] == group and p.kind == "sweep_choice"), None)
        if not rows or choice is None:
            continue
        chosen = choice.extra["variants"][rt.store.open(choice.key).meta["winner_index"]]
        metric = choice.extra["metric"]
        score = {(r["variant"], r["task"]): r[metric] for r in rows}
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        summaries.append({
            "group": group, "split": rows[0]["split"], "chosen": chosen, "swept": swept_values(variants),
            "variants": [v.name for v in variants], "tasks": tasks, "metric": metric, "rule": choice.params["rule"],
            metric: {t: [score[(v.name, t)] for v in variants] for t in tasks},
        })
    return summaries


def _is_head(rt, name: str) -> bool:
    return any(re.search(p, name) for p in rt.recipe.spec.heads)


# -- splits that must not leak -------------------------------------------------------------------


def check_split_leaks(recipe, name: str, cfg: EvalConfig) -> None:
    """Refuse (unless `allow_split_overlap`) an eval whose reported rows are rows that what it
    evaluates was fit to: a merge's adaptation split (frank_wolfe, adamerging), a statistics
    step's split (fisher, gram) behind a merge, a finetune step's training split behind a model,
    or the split swept variants are chosen on. Rows are compared by `DataSpec.rows_of`: the same
    split of the same data (or one file read twice) overlaps, differently named blocks of one
    partitioned file or splits of a directory or hub dataset do not. Works on the recipe as
    written and on its sweep-expanded steps (variants `ta[lambda=0.3]`)."""
    from ..recipe import DataSpec

    data = recipe.spec.data
    tasks = [t for t in (cfg.models or list(recipe.models)) if t in recipe.models and recipe.models[t].data in data]
    reported = []  # (rows, data entry, split)
    for t in tasks:
        d = recipe.models[t].data
        split = cfg.split or data[d].test_split
        reported.append((data[d].rows_of(recipe, d, split), d, split))
    if cfg.allow_split_overlap:
        return

    def clash(d: str, split: str):
        rows = data[d].rows_of(recipe, d, split)
        return next((r for r in reported if DataSpec.rows_overlap(rows, r[0])), None)

    def shared(hit, d, split) -> str:
        same = hit[1] == d and hit[2] == split
        return (f"split '{split}' of data '{d}', the split eval step '{name}' reports" if same else
                f"split '{split}' of data '{d}', whose rows overlap split '{hit[2]}' of data '{hit[1]}' that eval "
                f"step '{name}' reports")

    allow = (f"or set allow_split_overlap: true on steps.{name} to report it knowingly. A single data file is cut "
             f"into disjoint train, validation and test splits (see the data entry's partition).")
    if any(_selects(recipe, m) for m in cfg.merges):
        for t in tasks:
            d = recipe.models[t].data
            split = cfg.select_split or data[d].validation_split
            hit = clash(d, split)
            if hit:
                raise RecipeError(
                    f"{recipe.where('steps', name, 'select_split')}: eval step '{name}' chooses among swept variants "
                    f"on {shared(hit, d, split)}, so the winner would be picked on the rows it is scored on. Set "
                    f"select_split (default: each task's validation split) or split to another split, {allow}")
    roots = list(cfg.merges) + [recipe.models[t].from_step for t in tasks] + [recipe.base.from_step]
    for step, field, verb, fix, d, split in _data_uses(recipe, [r for r in roots if r]):
        hit = clash(d, split)
        if hit:
            group = _written_name(recipe, step)
            raise RecipeError(
                f"{recipe.where('steps', group, field)}: step '{step}' {verb} {shared(hit, d, split)}, so its scores "
                f"would be measured on rows it was fit to. {fix.format(step=group, data=d)}, {allow}")


def _data_uses(recipe, roots: list[str]) -> list[tuple[str, str, str, str, str, str]]:
    """(step, config field, what it does, how to change it, data entry, split) for every step fit
    to data behind `roots` (steps it reads, steps producing the models it uses)."""
    models = recipe.models
    uses, seen, todo = [], set(), list(roots)
    while todo:
        for n in recipe.step_names(todo.pop(0)):
            if n in seen or n not in recipe.steps or n not in recipe.spec.steps:
                continue
            seen.add(n)
            kind, cfg = recipe.kinds[recipe.spec.steps[n]["kind"]], recipe.steps[n]
            used = [m for m in kind.models_used(cfg, recipe) if m in models]
            uses += [(n, *use) for use in kind.fitted_on(recipe, cfg)]
            todo += [ref for _, ref in kind.step_refs(cfg)]
            todo += [models[m].from_step for m in used if models[m].from_step]
            if kind.uses_base and recipe.base.from_step:
                todo.append(recipe.base.from_step)
    return uses


def _selects(recipe, merge: str) -> bool:
    """Whether an eval chooses among variants of `merge`: a sweep group (after expansion), or
    (before) a step the sweep grid names or one reading such a step."""
    if merge in recipe.sweeps:
        return True
    swept = {key.split(".")[0] for key in recipe.spec.sweep}
    seen, todo = set(), [merge]
    while todo:
        n = todo.pop()
        if n in seen or n not in recipe.steps or n not in recipe.spec.steps:
            continue
        if n in swept:
            return True
        seen.add(n)
        todo += [ref for _, ref in recipe.kinds[recipe.spec.steps[n]["kind"]].step_refs(recipe.steps[n])]
    return False


def _written_name(recipe, step: str) -> str:
    """The step's name in the recipe file: a sweep variant's group."""
    return next((g for g, vs in recipe.sweeps.items() if any(v.name == step for v in vs)), step)
