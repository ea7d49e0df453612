"""The `fmerge` command line: thin wrappers over recipe, executor and store."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import FmergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative, cached merging of fine-tuned models.")
# Tables are meant to be read whole: when output goes to a file or a Makefile log, not a terminal,
# draw them 140 columns wide ($COLUMNS still wins) instead of rich's 80.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 140
out = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)

StoreOpt = typer.Option(None, "--store", help="artifact store (default: recipe's 'store', $FMERGE_STORE, ./artifacts)")
SetOpt = typer.Option([], "--set", help="STEP.PARAM=VALUE overrides a parameter; STEP.PARAM=V1,V2,... sweeps it "
                      "(values are YAML); repeatable")


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


def _print_reports(reports, title: str) -> None:
    colors = {"cached": "green", "computed": "cyan", "forced": "magenta", "stale": "yellow"}
    table = Table(title=title)
    for col in ("step", "kind", "state", "time", "key", "note"):
        table.add_column(col)
    for r in reports:
        table.add_row(escape(r.step), r.kind, f"[{colors.get(r.state, 'white')}]{r.state}[/]",
                      f"{r.seconds:.2f}s", _short(r.keys), r.note)
    out.print(table)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    only: list[str] = typer.Option([], "--only", help="run only this step (and what it needs); repeatable"),
    force: list[str] = typer.Option([], "--force", help="recompute this step even if cached; repeatable"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would run, compute nothing"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: recipe's)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load .bin/.pt checkpoints (weights only), "
                                      "whatever the recipe's allow_pickle says"),
    sets: list[str] = SetOpt,
    store: Optional[Path] = StoreOpt,
):
    """Execute a recipe's step graph, reusing every cached artifact."""
    from . import executor

    rt = _runtime(recipe, store, device, sets)
    if allow_pickle:
        rt.recipe.spec.allow_pickle = True

    def line(r):
        err.print(f"[bold]{escape(r.step)}[/] ({r.kind}): {r.state} in {r.seconds:.2f}s {r.keys[0][:12] if r.keys else ''} {r.note}")

    reports = executor.run(rt, only or None, force or None, dry_run, on_report=line)
    _print_reports(reports, f"{recipe}" + (" (dry run)" if dry_run else ""))
    from .report import results_table, sweep_table

    for step, results in rt.results.items():
        for sweep in rt.sweep_results.get(step, []):
            out.print(sweep_table(sweep))
        out.print(results_table(results, step))


@app.command()
def status(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list of {step, state, ...}"),
    sets: list[str] = SetOpt,
    store: Optional[Path] = StoreOpt,
):
    """Say which steps are cached and which would run, computing nothing."""
    from . import executor

    reports = executor.status(_runtime(recipe, store, sets=sets, create=False))
    if as_json:
        print(json.dumps([r.as_json() for r in reports], indent=2))
    else:
        _print_reports(reports, f"status of {recipe}")


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
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype"),
    device: Optional[str] = typer.Option(None, "--device"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load .bin/.pt checkpoints (weights only)"),
    store: Optional[Path] = StoreOpt,
):
    """Merge models directly, without a recipe (same store, same cache)."""
    from . import executor
    from .api import parse_recipe
    from .runtime import Runtime

    recipe_text = direct_merge_recipe(method, model, base, param, out_dir, out_dtype, allow_pickle)
    recipe = parse_recipe(recipe_text, None)
    rt = Runtime(recipe, open_store(store, create=True), err, device)
    reports = executor.run(rt)
    _print_reports(reports, f"fmerge merge --method {method}")


@app.command()
def fisher(
    model: list[Path] = typer.Option(..., "--model", help="fine-tuned classifier directory; repeatable"),
    data: str = typer.Option(..., "--data", help="task data: a csv/json/jsonl/parquet file, a directory, or a hub id"),
    text_column: str = typer.Option("text", "--text-column"),
    text_pair_column: Optional[str] = typer.Option(None, "--text-pair-column"),
    label_column: Optional[str] = typer.Option("label", "--label-column", help="'' for unlabelled data"),
    split: str = typer.Option("train", "--split"),
    estimator: str = typer.Option("exact", "--estimator", help="exact, sampled, empirical or fusionbench"),
    examples: int = typer.Option(256, "--examples", help="seeded random subset of this many rows"),
    samples: int = typer.Option(1, "--samples", help="draws per example for 'sampled'"),
    batch_size: int = typer.Option(32, "--batch-size"),
    chunk_size: int = typer.Option(32, "--chunk-size"),
    max_length: int = typer.Option(128, "--max-length"),
    seed: int = typer.Option(0, "--seed"),
    export: Optional[Path] = typer.Option(None, "--export", help="write the mean diagonal here (.safetensors)"),
    device: Optional[str] = typer.Option(None, "--device"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load .bin/.pt checkpoints (weights only)"),
    store: Optional[Path] = StoreOpt,
):
    """Estimate a model's diagonal Fisher on its task data (cached; more --examples extend it).

    Under `torchrun --nproc_per_node K -m fmerge fisher ...` the examples are sharded across ranks."""
    from . import distributed, executor
    from .api import parse_recipe
    from .runtime import Runtime

    names = _model_names(model)
    step = {"kind": "fisher", "estimator": estimator, "examples": examples, "samples": samples, "split": split,
            "batch_size": batch_size, "chunk_size": chunk_size, "max_length": max_length, "seed": seed}
    if export is not None:
        step["export"] = str(export.resolve())
    local = Path(data)
    source = str(local.resolve()) if local.exists() else data  # a file is all rows of --split, unpartitioned
    spec = {**({"splits": {split: source}} if local.is_file() else {"path": source}), "text": text_column,
            "text_pair": text_pair_column, "label": label_column or None, "train_split": split}
    recipe = {"base": next(iter(names.values())), "allow_pickle": allow_pickle,
              "models": {n: {"path": p, "data": "task"} for n, p in names.items()},
              "data": {"task": spec}, "steps": {"fisher": step}}
    import yaml

    rt = Runtime(parse_recipe(yaml.safe_dump(recipe), None), open_store(store, create=True), err, device)
    reports = executor.run(rt)
    if distributed.is_main():
        _print_reports(reports, f"fmerge fisher --estimator {estimator} --examples {examples}")
        table = Table(title="Fisher diagonals")
        for col in ("model", "estimator", "examples", "extended from", "mean Fisher", "key"):
            table.add_column(col)
        for p in rt.planned["fisher"]:
            meta = rt.store.open(p.key).meta
            table.add_row(p.label, meta["estimator"], str(meta.get("examples", "")),
                          str(meta.get("extended_from") or "-"), f"{meta['fisher_mean']:.3e}", p.key[:12])
        out.print(table)


def _model_names(models: list[Path]) -> dict[str, str]:
    """Unique short names (directory names) for models given on the command line."""
    names: dict[str, str] = {}
    for m in models:
        name = m.resolve().name or "model"
        while name in names:
            name += "_"
        names[name] = str(m.resolve())
    return names


def direct_merge_recipe(method, models, base, params, out_dir, out_dtype, allow_pickle) -> str:
    """The one-step recipe equivalent to a `fmerge merge` command line."""
    import yaml

    names = _model_names(models)
    parsed = {}
    for item in params:
        if "=" not in item:
            raise FmergeError(f"--param '{item}' must look like KEY=VALUE (e.g. --param density=0.2).")
        k, v = item.split("=", 1)
        parsed[k.strip()] = yaml.safe_load(v)
    step = {"kind": "merge", "method": method, "params": parsed, "export": str(out_dir.resolve())}
    if out_dtype:
        step["out_dtype"] = out_dtype
    recipe = {"base": str((base or models[0]).resolve()), "models": names, "allow_pickle": allow_pickle,
              "steps": {"merge": step}}
    if base is None:
        from .methods import get_method

        if get_method(method).needs_base:
            raise FmergeError(f"Method '{method}' needs the base model: add --base DIR.")
    return yaml.safe_dump(recipe)


@app.command()
def methods():
    """List every registered merge method with its parameters and defaults."""
    from .methods import REGISTRY

    table = Table(title="merge methods", show_lines=True)
    for col in ("method", "description", "parameters (default)"):
        table.add_column(col)
    for name, m in sorted(REGISTRY.items()):
        params = []
        for fname, field in m.Params.model_fields.items():
            default = "required" if field.is_required() else repr(field.default)
            params.append(f"[bold]{field.alias or fname}[/] = {default}: {field.description or ''}")
        needs = " [dim](needs " + ", ".join(("base",) * m.needs_base + m.needs_stats) + ")[/]" if (m.needs_base or m.needs_stats) else ""
        table.add_row(name, m.description + needs, "\n".join(params))
    out.print(table)


@app.command("ls")
def ls(store: Optional[Path] = StoreOpt, kind: Optional[str] = typer.Option(None, "--kind")):
    """List the artifacts in the store."""
    s = open_store(store)
    table = Table(title=f"artifacts in {s.root}")
    for col in ("key", "kind", "step", "created", "size"):
        table.add_column(col)
    for info in s.list():
        if kind and info.kind != kind:
            continue
        table.add_row(info.key, info.kind, info.attrs.get("meta", {}).get("step", ""), info.created,
                      f"{info.size_bytes / 2**20:.1f} MiB")
    out.print(table)


@app.command()
def show(key: str = typer.Argument(..., help="artifact key (a unique prefix is enough)"), store: Optional[Path] = StoreOpt):
    """Show an artifact: what made it, its inputs, parameters and tensors."""
    from .store import check_key

    check_key(key, store or os.environ.get("FMERGE_STORE") or "artifacts")  # a path is refused before anything
    art = open_store(store).open(key)
    a = art.attrs
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
    """An iterative step's trace (one row per iteration) as a table; floats to 6 significant digits."""
    table = Table(title=title)
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
    dry_run: bool = typer.Option(False, "--dry-run"),
    store: Optional[Path] = StoreOpt,
):
    """Remove artifacts no listed recipe references (or older than a date), and leftovers of interrupted writes."""
    from . import executor
    from .api import load_recipe
    from .runtime import Runtime

    if not keep and not older_than:
        raise FmergeError("gc needs recipes to keep (fmerge gc recipes/*.yaml) or --older-than DATE; "
                          "it will not empty the store by default.")
    s = open_store(store)
    referenced: set[str] = set()
    for r in keep or []:
        rt = Runtime(load_recipe(r), s, err)
        for report in executor.status(rt):
            referenced.update(report.keys)
    cutoff = None
    if older_than:
        try:
            cutoff = dt.datetime.fromisoformat(older_than).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            raise FmergeError(f"--older-than '{older_than}' is not a date (YYYY-MM-DD).")
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


def main() -> None:
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
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished artifacts are kept; unfinished ones were never committed.")
        sys.exit(130)


if __name__ == "__main__":
    main()
