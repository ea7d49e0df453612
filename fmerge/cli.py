"""The `fmerge` command line: thin wrappers over recipe, executor and store."""

from __future__ import annotations

import datetime as dt
import gc as cyclic_gc  # `gc` is the store-collecting command below
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .compat import DEFAULT_MAX_LENGTH, MAX_LENGTH_HELP
from .errors import FmergeError, RecipeError

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative, cached merging of fine-tuned models.\n\n"
                       "Global options go before the command: fmerge -q --log run.log run recipe.yaml")
# Tables are meant to be read whole: when output goes to a file or a Makefile log, not a terminal,
# draw them 140 columns wide ($COLUMNS still wins) instead of rich's 80.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 140
out = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)

StoreOpt = typer.Option(None, "--store", help="artifact store (default: the recipe's 'store:', else $FMERGE_STORE, "
                        "else the first artifacts/ holding fmerge-store.json found upward from the recipe's directory "
                        "(without a recipe: the working directory) to the top of its git repository, else artifacts/ "
                        "at that top, or beside the recipe outside git; README: The store)")
SetOpt = typer.Option([], "--set", help="STEP.PARAM=VALUE overrides a parameter; STEP.PARAM=V1,V2,... sweeps it "
                      "(values are YAML); repeatable")
JsonOpt = typer.Option(False, "--json", help="print one JSON document on stdout instead of tables "
                       "(progress and warnings stay on stderr)")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: the recipe's device, else cpu)")


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        out.file.write(f"fmerge {__version__}\n")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="print fmerge's version and exit"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress and no info lines on stderr "
                               "(warnings, errors, tables and JSON still)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print debug lines (store, device, keys)"),
    log: Optional[Path] = typer.Option(None, "--log", metavar="FILE", help="also append the progress and info "
                                       "lines, timestamped, to FILE (even with -q; debug lines with -v)"),
):
    """Global options (before the command): --version, -q, -v, --log FILE."""
    from . import progress

    if quiet and verbose:
        raise RecipeError("-q/--quiet and -v/--verbose contradict each other; give one of them.")
    if log is not None:
        try:
            with open(log, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise RecipeError(f"--log {log}: cannot append to it ({exc.strerror or exc}).")
    progress.configure(progress.QUIET if quiet else progress.VERBOSE if verbose else progress.NORMAL, log)


def _emit_json(doc) -> None:
    """One JSON document on stdout, the same information as the tables; nothing else goes there."""
    f = out.file
    f.write(json.dumps(doc, indent=2, default=str) + "\n")
    f.flush()


def _info(text: str) -> None:
    from .progress import info

    info(err, text)


def _debug(text: str) -> None:
    from .progress import debug

    debug(err, text)


def _report_line(r) -> None:
    _info(f"[bold]{escape(r.step)}[/] ({r.kind}): {r.state} in {r.seconds:.2f}s "
          f"{r.keys[0][:12] if r.keys else ''} {escape(r.note)}".rstrip())
    for k in r.keys:
        _debug(f"  {escape(r.step)}: {k}")


def open_store(store: Optional[Path], recipe=None, create: bool = False, missing_ok: bool = False):
    from .api import open_store as api_open_store

    return api_open_store(store, recipe, create, missing_ok)


def _runtime(recipe_file: Path, store: Optional[Path], device: Optional[str] = None, sets: list[str] | None = None,
             create: bool = True):
    from .api import load_recipe
    from .runtime import Runtime

    recipe = load_recipe(recipe_file, sets)
    store = open_store(store, recipe, create=True) if create else open_store(store, recipe, missing_ok=True)
    return Runtime(recipe, store, err, device)


def _short(keys: list[str]) -> str:
    return ", ".join(k[:12] for k in keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")


def _print_reports(reports, title: str, store: Path | None = None) -> None:
    """The steps' table, then the store they were looked up in (on one line, however long)."""
    colors = {"cached": "green", "computed": "cyan", "forced": "magenta", "stale": "yellow"}
    table = Table(title=title)
    for col in ("step", "kind", "state", "time", "key", "note"):
        table.add_column(col)
    for r in reports:
        table.add_row(escape(r.step), r.kind, f"[{colors.get(r.state, 'white')}]{r.state}[/]",
                      f"{r.seconds:.2f}s", _short(r.keys), r.note)
    out.print(table)
    if store is not None:
        out.print(f"store: {escape(str(store))}", soft_wrap=True, highlight=False)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    only: list[str] = typer.Option([], "--only", help="run only this step (and what it needs); repeatable"),
    force: list[str] = typer.Option([], "--force", help="recompute this step even if cached; repeatable"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would run, compute nothing"),
    device: Optional[str] = DeviceOpt,
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load .bin/.pt checkpoints (weights only), "
                                      "whatever the recipe's allow_pickle says"),
    sets: list[str] = SetOpt,
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Execute a recipe's step graph, reusing every cached artifact."""
    from . import executor

    rt = _runtime(recipe, store, device, sets)
    if allow_pickle:
        rt.recipe.spec.allow_pickle = True
    _debug(f"recipe {escape(str(recipe))}, store {escape(str(rt.store.root))}, device {rt.device}")

    reports = executor.run(rt, only or None, force or None, dry_run, on_report=_report_line)
    if as_json:
        _emit_json({"recipe": str(recipe), "store": str(rt.store.root), "dry_run": dry_run,
                    "steps": [r.as_json() for r in reports], "results": rt.results, "sweeps": rt.sweep_results})
        return
    _print_reports(reports, f"{recipe}" + (" (dry run)" if dry_run else ""), rt.store.root)
    from .report import results_table, sweep_table

    for step, results in rt.results.items():
        for sweep in rt.sweep_results.get(step, []):
            out.print(sweep_table(sweep))
        out.print(results_table(results, step))


@app.command()
def status(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of {step, kind, state, keys, seconds, note, store}"),
    check: bool = typer.Option(False, "--check", help="exit 1 if `fmerge run` would compute, write or restore "
                               "anything (an artifact; an export or results file missing, changed or out of "
                               "date), 0 if it would change nothing, 2 on an error (for Make and scripts; the "
                               "table or JSON is printed either way)"),
    sets: list[str] = SetOpt,
    store: Optional[Path] = StoreOpt,
):
    """Say which steps are cached and which `run` would compute or write out again, computing nothing."""
    from . import executor

    rt = _runtime(recipe, store, sets=sets, create=False)
    reports = executor.status(rt)
    if as_json:
        _emit_json([{**r.as_json(), "store": str(rt.store.root)} for r in reports])
    else:
        _print_reports(reports, f"status of {recipe}", rt.store.root)
    if check and any(r.state != "cached" for r in reports):
        raise typer.Exit(1)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML file"), store: Optional[Path] = StoreOpt):
    """Check a recipe (keys, types, references, method parameters, export paths) without reading weights."""
    from .api import load_recipe, store_root
    from .export import check_exports
    from .graph import step_order

    r = load_recipe(recipe)
    check_exports(r, store_root(store, r))
    out.print(f"[green]ok[/]: {recipe}: {len(r.models)} models, steps in order: {escape(', '.join(step_order(r)))}")


@app.command()
def merge(
    method: str = typer.Option(..., "--method", help="merge method (see `fmerge methods`)"),
    model: list[Path] = typer.Option(..., "--model", help="fine-tuned model directory; repeatable"),
    base: Optional[Path] = typer.Option(None, "--base", help="base (pretrained) model directory"),
    param: list[str] = typer.Option([], "--param", help="method parameter KEY=VALUE (YAML value); repeatable"),
    out_dir: Path = typer.Option(..., "--out", help="write the merged model here"),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype", help="dtype of the written weights: float32, "
                                            "float16 or bfloat16 (default: the base model's)"),
    out_shard_size: Optional[str] = typer.Option(None, "--out-shard-size", help="largest weight file of the "
                                                 "output, e.g. 2GB (GB = 10^9 bytes, GiB = 2^30; default 5GB)"),
    device: Optional[str] = DeviceOpt,
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load .bin/.pt checkpoints (weights only)"),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Merge models directly, without a recipe (same store, same cache)."""
    from . import executor
    from .api import merge_recipe
    from .runtime import Runtime

    if device is not None:  # before anything is read or created
        from .distributed import check_device

        device = check_device(device)
    recipe = merge_recipe(method, model, base, _params(param), out_dir, out_dtype, allow_pickle,
                          base_hint="add --base DIR", out_shard_size=out_shard_size)
    rt = Runtime(recipe, open_store(store, create=True), err, device)
    _debug(f"store {escape(str(rt.store.root))}, device {rt.device}")
    reports = executor.run(rt, on_report=_report_line)
    if as_json:
        _emit_json({"method": method, "out": str(out_dir.resolve()), "store": str(rt.store.root),
                    "steps": [r.as_json() for r in reports]})
        return
    _print_reports(reports, f"fmerge merge --method {method}", rt.store.root)


@app.command()
def fisher(
    model: list[Path] = typer.Option(..., "--model", help="fine-tuned classifier or causal LM directory; "
                                     "repeatable (an LM's Fisher is per token of --text-column)"),
    data: str = typer.Option(..., "--data", help="task data: a csv/json/jsonl/parquet file, a directory, or a hub id"),
    text_column: str = typer.Option("text", "--text-column", help="column holding the input text"),
    text_pair_column: Optional[str] = typer.Option(None, "--text-pair-column",
                                                   help="column holding the second text of a pair task"),
    label_column: Optional[str] = typer.Option("label", "--label-column", help="column holding the label; "
                                               "'' for unlabelled data"),
    label_names: Optional[str] = typer.Option(None, "--label-names", help="string labels in head order, "
                                              "comma-separated (e.g. neg,neu,pos): label NAME is the class index "
                                              "of NAME in this list (default: the labels seen, sorted)"),
    split: str = typer.Option("train", "--split", help="data split the Fisher is estimated on"),
    estimator: str = typer.Option("exact", "--estimator", help="exact, sampled, empirical or fusionbench"),
    examples: int = typer.Option(256, "--examples", help="seeded random subset of this many rows"),
    samples: int = typer.Option(1, "--samples", help="draws per example for 'sampled'"),
    batch_size: int = typer.Option(32, "--batch-size", help="examples per batch"),
    chunk_size: int = typer.Option(32, "--chunk-size", help="examples per forward/backward pass (bounds memory)"),
    max_length: int = typer.Option(DEFAULT_MAX_LENGTH, "--max-length", help=MAX_LENGTH_HELP),
    seed: int = typer.Option(0, "--seed", help="seed of the random subset (and of 'sampled' draws)"),
    export: Optional[Path] = typer.Option(None, "--export", help="write the mean diagonal here (.safetensors)"),
    device: Optional[str] = DeviceOpt,
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load .bin/.pt checkpoints (weights only)"),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Estimate a model's diagonal Fisher on its task data (cached; more --examples extend it).

    Under `torchrun --nproc_per_node K -m fmerge fisher ...` the examples are sharded across ranks."""
    from . import distributed, executor
    from .api import fisher_recipe
    from .runtime import Runtime

    if seed < 0:  # numpy's and torch's generators take no negative seed
        raise RecipeError(f"--seed {seed}: a seed is a whole number from 0 up; use e.g. --seed 0.")
    if device is not None:  # before anything is read or created
        from .distributed import check_device

        device = check_device(device)
    names = None if label_names is None else _label_names(label_names, label_column)
    recipe = fisher_recipe(model, data, estimator, examples, split, text_column, text_pair_column, label_column,
                           names, samples, batch_size, chunk_size, max_length, seed, export, allow_pickle)
    rt = Runtime(recipe, open_store(store, create=True), err, device)
    _debug(f"store {escape(str(rt.store.root))}, device {rt.device}")
    reports = executor.run(rt, on_report=_report_line)
    if distributed.is_main():
        rows = []
        for p in rt.planned["fisher"]:
            meta = rt.store.open(p.key).meta
            rows.append({"model": p.label, "estimator": meta["estimator"], "examples": meta.get("examples"),
                         "extended_from": meta.get("extended_from"), "fisher_mean": meta["fisher_mean"], "key": p.key})
        if as_json:
            _emit_json({"store": str(rt.store.root), "steps": [r.as_json() for r in reports], "fisher": rows})
            return
        _print_reports(reports, f"fmerge fisher --estimator {estimator} --examples {examples}", rt.store.root)
        table = Table(title="Fisher diagonals")
        for col in ("model", "estimator", "examples", "extended from", "mean Fisher", "key"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["model"], r["estimator"], str(r["examples"] if r["examples"] is not None else ""),
                          str(r["extended_from"] or "-"), f"{r['fisher_mean']:.3e}", r["key"][:12])
        out.print(table)


def _label_names(text: str, label_column: Optional[str]) -> list[str]:
    """--label-names a,b,c as a list, refusing what cannot map labels to head indices."""
    from .api import checked_label_names
    from .errors import quoted

    return checked_label_names([n.strip() for n in text.split(",")], label_column, f"--label-names {quoted(text)}",
                               "cli")


def _params(items: list[str]) -> dict:
    """--param KEY=VALUE items as a mapping (values are YAML)."""
    import yaml

    parsed = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--param '{item}' must look like KEY=VALUE (e.g. --param density=0.2).")
        k, v = item.split("=", 1)
        parsed[k.strip()] = yaml.safe_load(v)
    return parsed


def _fields(model) -> list[dict]:
    """A pydantic model's fields: name, type, whether required, default, description."""
    fields = []
    for fname, field in model.model_fields.items():
        required = field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        annotation = getattr(field.annotation, "__name__", None) if isinstance(field.annotation, type) else None
        fields.append({"name": field.alias or fname, "type": annotation or str(field.annotation).replace("typing.", ""),
                       "required": required, "default": default, "description": field.description or ""})
    return fields


def _algorithms() -> dict[str, list[dict]]:
    """Every merge method, and every iterative merging algorithm (a step kind of its own)."""
    from .methods import REGISTRY
    from .steps import step_kinds
    from .steps.iterative import IterativeStep

    merge = [{"name": name, "kind": "merge", "description": m.description,
              "needs": ["base"] * m.needs_base + list(m.needs_stats), "parameters": _fields(m.Params)}
             for name, m in sorted(REGISTRY.items())]
    iterative = [{"name": kind, "kind": kind, "description": getattr(k, "description", "") or "",
                  "needs": ["base"] * k.uses_base + ["task data"], "parameters": _fields(k.Config)}
                 for kind, k in sorted(step_kinds().items()) if isinstance(k, IterativeStep)]
    return {"merge_methods": merge, "iterative": iterative}


@app.command()
def methods(as_json: bool = JsonOpt):
    """List every merge method and iterative algorithm (frank_wolfe, frank_wolfe_soft, adamerging) with its parameters.

    Merge methods are steps of kind `merge` (and `fmerge merge --method`); each iterative algorithm is a
    step kind of its own."""
    algos = _algorithms()
    if as_json:
        _emit_json(algos)
        return

    def rows(table, entries):
        for a in entries:
            params = [f"[bold]{escape(f['name'])}[/] = {'required' if f['required'] else escape(repr(f['default']))}"
                      + (f": {escape(f['description'])}" if f["description"] else "") for f in a["parameters"]]
            needs = f" [dim](needs {', '.join(a['needs'])})[/]" if a["needs"] else ""
            table.add_row(a["name"], escape(a["description"]) + needs, "\n".join(params))

    table = Table(title="merge methods (steps of kind: merge; fmerge merge --method NAME --param KEY=VALUE)",
                  show_lines=True)
    for col in ("method", "description", "parameters (default)"):
        table.add_column(col)
    rows(table, algos["merge_methods"])
    out.print(table)
    table = Table(title="iterative merging algorithms (steps of kind: NAME; recipes only)", show_lines=True)
    for col in ("step kind", "description", "parameters (default)"):
        table.add_column(col)
    rows(table, algos["iterative"])
    out.print(table)


@app.command("ls")
def ls(store: Optional[Path] = StoreOpt,
       kind: Optional[str] = typer.Option(None, "--kind", help="only artifacts of this kind (merge, fisher, eval, ...)"),
       as_json: bool = JsonOpt):
    """List the artifacts in the store."""
    s = open_store(store)
    artifacts = [{"key": info.key, "kind": info.kind, "step": info.attrs.get("meta", {}).get("step", ""),
                  "created": info.created, "size_bytes": info.size_bytes}
                 for info in s.list() if not kind or info.kind == kind]
    if as_json:
        _emit_json({"store": str(s.root), "artifacts": artifacts})
        return
    table = Table(title=f"artifacts in {s.root}")
    for col in ("key", "kind", "step", "created", "size"):
        table.add_column(col)
    for a in artifacts:
        table.add_row(a["key"], a["kind"], str(a["step"]), a["created"], f"{a['size_bytes'] / 2**20:.1f} MiB")
    out.print(table)
    if s.unreadable:  # damaged artifacts or strays: named, so that nothing vanishes from the listing unsaid
        names = ", ".join(p.name for p in s.unreadable[:3]) + (f" (+{len(s.unreadable) - 3})" if len(s.unreadable) > 3 else "")
        err.print(f"[yellow]warning:[/] {len(s.unreadable)} entr{'y' if len(s.unreadable) == 1 else 'ies'} of "
                  f"{escape(str(s.root / 'objects'))} could not be read and {'is' if len(s.unreadable) == 1 else 'are'} "
                  f"not listed: {escape(names)}; `fmerge verify` says what is wrong.", highlight=False, soft_wrap=True)


@app.command()
def show(key: str = typer.Argument(..., help="artifact key (a unique prefix is enough)"), store: Optional[Path] = StoreOpt,
         as_json: bool = JsonOpt):
    """Show an artifact: what made it, its inputs, parameters and tensors."""
    from .api import store_root
    from .store import check_key

    check_key(key, store_root(store))  # a path is refused before anything
    art = open_store(store).open(key)
    a = art.attrs
    if as_json:
        meta = dict(a.get("meta", {}))
        _emit_json({"key": art.key, "kind": art.kind, "created": a.get("created"),
                    "fmerge_version": a.get("fmerge_version"), "algorithm_version": a.get("algorithm_version"),
                    "params": a.get("params"), "inputs": a.get("inputs"), "meta": meta,
                    "tensors": a.get("tensors", [])})
        return
    out.print(f"[bold]{art.key}[/] kind={art.kind} created={a.get('created')} fmerge={a.get('fmerge_version')} "
              f"algorithm v{a.get('algorithm_version')}")
    meta = dict(a.get("meta", {}))
    trace = meta.pop("trace", None)
    out.print_json(json.dumps({"params": a["params"], "inputs": a["inputs"], "meta": meta}, default=str))
    names = a.get("tensors", [])
    out.print(f"{len(names)} tensors" + (": " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") if names else ""))
    if trace:
        out.print(trace_table(trace, f"trace of {art.key[:12]} ({len(trace)} iterations)"))


def trace_table(trace: list[dict], title: str) -> Table:
    """An iterative step's trace (one row per iteration) as a table; floats to 6 significant digits.
    A per-task mapping (`task_accuracy`) becomes one column per task (`accuracy[tweets]`)."""
    table = Table(title=title)
    trace = [{f"{k}[{t}]" if isinstance(v, dict) else k: x for k, v in row.items()
              for t, x in (v.items() if isinstance(v, dict) else [(None, v)])} for row in trace]
    columns = list(dict.fromkeys(k for row in trace for k in row))
    for c in columns:
        table.add_column(c, justify="left" if c == "chosen" else "right")
    for row in trace:
        table.add_row(*[f"{v:.6g}" if isinstance(v, float) else str(v if v is not None else "-")
                        for v in (row.get(c) for c in columns)])
    return table


@app.command()
def verify(
    repair: bool = typer.Option(False, "--repair", help="remove bad artifacts (and leftovers of interrupted writes)"),
    store: Optional[Path] = StoreOpt,
):
    """Check every artifact against the checksums recorded when it was written; exit 1 if any is bad."""
    s = open_store(store)
    bad = s.verify()
    quarantined = s.quarantined()
    if bad:
        table = Table(title=f"bad artifacts in {s.root}")
        for col in ("key", "kind", "step", "problem", "action"):
            table.add_column(col)
        for b in bad:
            action = ""
            if repair:
                try:
                    s.remove_path(b.path)
                    action = "removed"
                except FmergeError:  # not named as fmerge names artifacts: not fmerge's to delete
                    action = "left alone (not an artifact name)"
            table.add_row(b.key, b.kind, b.step, b.problem, action)
        out.print(table)
    if quarantined:
        verb = "removed" if repair else "kept"
        for q in quarantined:
            if repair:
                s.remove_quarantined(q)
        out.print(f"{verb} {len(quarantined)} corrupt artifact(s) that `fmerge run` had moved aside to "
                  f"{s.root / 'quarantine'}" + ("" if repair else " (`fmerge verify --repair` removes them)"))
    if repair:
        removed_tmp = s.clean_tmp()
        if removed_tmp:
            out.print(f"removed {removed_tmp} leftovers of interrupted writes")
    bad_keys = {b.key for b in bad}
    ok = sum(1 for info in s.list() if info.key not in bad_keys)
    out.print(f"{ok} artifact(s) ok" + (f", {len(bad)} bad" + (" (removed)" if repair else "") if bad else ""))
    if bad and not repair:
        out.print("run `fmerge verify --repair` to remove them; the next `fmerge run` recomputes them")
        raise typer.Exit(1)


@app.command()
def gc(
    keep: list[Path] = typer.Argument(None, help="recipes whose artifacts are kept"),
    older_than: Optional[str] = typer.Option(None, "--older-than", help="remove artifacts created before this date (YYYY-MM-DD)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would be removed, remove nothing"),
    store: Optional[Path] = StoreOpt,
):
    """Remove artifacts no listed recipe references (or older than a date), and leftovers of interrupted writes."""
    from . import executor
    from .api import load_recipe
    from .runtime import Runtime

    if not keep and not older_than:
        raise RecipeError("gc needs recipes to keep (fmerge gc recipes/*.yaml) or --older-than DATE; "
                          "it will not empty the store by default.")
    recipes = [(r, load_recipe(r)) for r in keep or []]
    if store is None and recipes:
        store = _gc_store(recipes)
    s = open_store(store)
    referenced: set[str] = set()
    for _, recipe in recipes:
        rt = Runtime(recipe, s, err)
        for step in executor.selected_steps(recipe, None):  # the keys it plans, nothing checked
            referenced.update(p.key for p in executor.plan_step(rt, step))
    cutoff = None
    if older_than:
        try:
            cutoff = dt.datetime.fromisoformat(older_than).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            raise RecipeError(f"--older-than '{older_than}' is not a date (YYYY-MM-DD).")
    removed = 0
    for info in list(s.list()):
        if info.key in referenced:
            continue
        created = dt.datetime.fromisoformat(info.created) if info.created else None
        if keep and cutoff is None or (cutoff is not None and created is not None and created < cutoff):
            out.print(f"{'would remove' if dry_run else 'removed'} {info.key} ({info.kind})")
            if not dry_run:
                s.remove(info.key)
            removed += 1
    if not dry_run:
        removed_tmp = s.clean_tmp()
        if removed_tmp:
            out.print(f"removed {removed_tmp} leftovers of interrupted writes")
    out.print(f"{removed} artifact(s) {'would be ' if dry_run else ''}removed")


def _gc_store(recipes: list) -> Path:
    """The store the recipes given to gc use (api.store_root: their `store:`, $FMERGE_STORE, or found from each);
    recipes using different stores are refused: gc would keep one's artifacts and judge another's."""
    from .api import store_root
    from .errors import StoreError

    roots: dict[str, tuple] = {}
    for file, recipe in recipes:
        root = store_root(None, recipe)
        roots.setdefault(os.path.realpath(root), (file, root))
    if len(roots) > 1:
        named = "; ".join(f"{file} uses {root}" for file, root in list(roots.values())[:4])
        raise StoreError(f"gc was given recipes that use different artifact stores ({named}); gc cleans one store "
                         f"at a time. Run it once per store with that store's recipes, or name the store with "
                         f"--store, then run again.")
    return next(iter(roots.values()))[1]


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="model directory, a merge's key in the store (a unique prefix), or hub id"),
    data: Optional[str] = typer.Option(None, "--data", help="task data: a csv/json/jsonl/parquet file (read whole "
                                       "as --split), a directory of split files, or a hub dataset id"),
    task: Optional[str] = typer.Option(None, "--task", help="classification, causal_lm or multiple_choice "
                                       "(default: multiple_choice with --choices-column, else from the model's config)"),
    split: str = typer.Option("test", "--split", help="data split evaluated"),
    limit: Optional[int] = typer.Option(None, "--limit", help="seeded random subset of at most N rows"),
    text_column: str = typer.Option("text", "--text-column", help="input text (multiple choice: the context)"),
    text_pair_column: Optional[str] = typer.Option(None, "--text-pair-column", help="second text of a pair task"),
    label_column: Optional[str] = typer.Option("label", "--label-column", help="label (multiple choice: the "
                                               "right choice's index)"),
    label_names: Optional[str] = typer.Option(None, "--label-names", help="string labels in head order, "
                                              "comma-separated"),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="causal_lm: a prompt each text "
                                                "follows directly, whose tokens are not scored"),
    choices_column: Optional[str] = typer.Option(None, "--choices-column", help="multiple choice: each row's list "
                                                 "of choices (default 'choices' with --task multiple_choice)"),
    head: Optional[Path] = typer.Option(None, "--head", help="classification: a .safetensors file of head tensors "
                                        "to use instead of the model's own"),
    like: Optional[Path] = typer.Option(None, "--like", help="for a merge key: the model directory lending config, "
                                        "tokenizer and head (default: the merge's recorded base)"),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="also run these lm-evaluation-harness tasks, "
                                          "comma-separated (needs `pip install lm-eval`)"),
    batch_size: int = typer.Option(16, "--batch-size", help="sequences per forward pass"),
    max_length: int = typer.Option(DEFAULT_MAX_LENGTH, "--max-length", help=MAX_LENGTH_HELP),
    seed: int = typer.Option(0, "--seed", help="seed of the --limit subset"),
    output: Optional[Path] = typer.Option(None, "--output", help="add this evaluation's rows (model, data, split, "
                                          "metric and their hashes) to results.json and results.csv here; a file "
                                          "fmerge did not write is never overwritten"),
    device: Optional[str] = DeviceOpt,
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load .bin/.pt checkpoints (weights only)"),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
):
    """Evaluate a model, a merge or a hub model on task data (cached): accuracy, perplexity or
    multiple-choice accuracy by log-likelihood (acc, and acc_norm per character as lm-eval).

    Under `torchrun --nproc_per_node K -m fmerge eval ...` the rows are sharded across ranks."""
    from . import distributed
    from .api import evaluate
    from .report import results_table

    result = evaluate(model, data, task, split, limit, text_column, text_pair_column, label_column, prompt_column,
                      choices_column, _label_names(label_names, label_column) if label_names else None, head, like,
                      batch_size, max_length, seed, [t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval
                      else None, output, store, device, allow_pickle, err, _report_line)
    if not distributed.is_main():  # under torchrun rank 0 alone reports
        return
    if as_json:
        _emit_json(result.as_json())
        return
    if result.report is not None:
        _print_reports([result.report], f"fmerge eval {model}")
    ours = [s for s in result.scores if s.key is not None]
    if ours:
        out.print(results_table([{"variant": result.model, "task": s.task, "split": s.split,
                                  "metric": "perplexity" if s.kind == "causal_lm" else "accuracy", **s.metrics}
                                 for s in ours], "fmerge eval"))
    table = Table(title=f"every figure of {escape(result.model)}")
    for col in ("task", "kind", "split", "n", "metric", "value"):
        table.add_column(col)
    for s in result.scores:
        for metric, value in s.metrics.items():
            shown = str(value) if metric == "tokens" else f"{value:.4f}"
            table.add_row(escape(s.task), s.kind, s.split or "-", str(s.n if s.n is not None else "-"), metric, shown)
    out.print(table)
    if result.output:
        _info(f"results in {escape(str(result.output))}")


def main() -> None:
    # Start-up (torch's import, planning) makes ~10^6 long-lived objects that the cyclic GC would
    # traverse again and again: ~0.25 s of a 2 s cached run. It stays off until the executor first
    # computes something (executor.resume_gc), then those objects are frozen out of its way.
    cyclic_gc.disable()
    # Large CPU tensors in transparent huge pages (torch reads this once, before its first
    # allocation): a fresh 1B-parameter merge faults in tens of GB of buffers, and 2 MiB pages
    # halve what that costs (BENCHMARKS.md). Users can still set it to 0.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # Our own progress bars and tables report the work; the libraries' bars are noise here.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    debug = "--debug" in sys.argv or os.environ.get("FMERGE_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        app()
    except FmergeError as exc:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # '[begin, end]' is no markup
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished artifacts are kept; unfinished ones were never committed.")
        sys.exit(130)


if __name__ == "__main__":
    main()
