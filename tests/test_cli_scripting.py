"""The command line in scripts: --version, --json documents, help on every option, completion,
`fmerge methods` with the iterative algorithms, and progress as timestamped lines off a terminal."""

from __future__ import annotations

import json
import re

import click
import pytest
import typer

import hostile
from conftest import ZOO_RECIPE, fmerge_cli, write_recipe
from test_fisher_cli import make_classifier
from test_pipeline import finetune_steps, two_task_project, two_task_recipe

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def as_json(result: hostile.Result):
    assert result.code == 0, result.err
    return json.loads(result.out)  # the whole of stdout is one document


def test_version_prints_fmerge_version_and_exits_0():
    from fmerge import __version__

    result = hostile.run(["--version"])
    assert result.code == 0 and result.out.strip() == f"fmerge {__version__}"


def test_help_lists_global_options_and_completion():
    text = fmerge_cli("--help").stdout
    for opt in ("--version", "--quiet", "--verbose", "--log", "--install-completion", "--show-completion"):
        assert opt in text
    assert "run" in text and "methods" in text


def test_every_option_and_argument_has_help():
    from fmerge.cli import app

    missing = []

    def walk(cmd: click.Command, path: str) -> None:
        for p in cmd.params:
            if not (getattr(p, "help", None) or "").strip():
                missing.append(f"{path} {p.name}")
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    root = typer.main.get_command(app)
    walk(root, "fmerge")
    assert set(root.commands) >= {"run", "status", "merge", "fisher", "methods", "ls", "show", "verify", "gc"}
    assert not missing, "without help: " + ", ".join(missing)


def test_methods_lists_merge_methods_and_iterative_algorithms():
    doc = as_json(hostile.run(["methods", "--json"]))
    merge = {m["name"]: m for m in doc["merge_methods"]}
    assert {"simple_average", "task_arithmetic", "ties", "dare", "fisher", "regmean"} <= set(merge)
    ties = {p["name"]: p for p in merge["ties"]["parameters"]}
    assert ties["density"]["description"] and "default" in ties["density"]
    assert merge["ties"]["needs"] == ["base"] and "fisher" in merge["fisher"]["needs"]
    iterative = {m["name"]: m for m in doc["iterative"]}
    assert set(iterative) == {"frank_wolfe", "frank_wolfe_soft", "adamerging"}
    fw = {p["name"]: p for p in iterative["frank_wolfe"]["parameters"]}
    assert fw["step_size"]["default"] == 0.1 and fw["max_iters"]["default"] == 10 and fw["oracle"]["default"] == "cosine"
    soft = {p["name"] for p in iterative["frank_wolfe_soft"]["parameters"]}
    assert {"ada_iters", "ada_lr", "simplex"} <= soft
    ada = {p["name"]: p for p in iterative["adamerging"]["parameters"]}
    assert ada["steps"]["default"] == 200 and ada["granularity"]["default"] == "layer"
    for m in [*merge.values(), *iterative.values()]:
        assert m["description"], m["name"]
        assert all(p["description"] for p in m["parameters"]), m["name"]

    table = hostile.run(["methods"]).out
    for name in ("ties", "frank_wolfe_soft", "adamerging", "step_size", "ada_iters", "granularity"):
        assert name in table


def test_run_ls_show_status_json_and_progress_lines_off_a_terminal(tmp_path, zoo):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    result = hostile.run(["run", recipe, "--json"], cwd=tmp_path)
    doc = as_json(result)
    assert [(s["step"], s["kind"], s["state"]) for s in doc["steps"]] == [
        ("avg", "merge", "computed"), ("ta", "merge", "computed"), ("ties", "merge", "computed")]
    assert all(len(s["keys"][0]) >= 32 for s in doc["steps"]) and doc["results"] == {} and doc["sweeps"] == {}
    assert "┃" not in result.out  # no table
    # progress off a terminal: timestamped start, done with elapsed time, and step lines
    err = result.err
    assert re.search(rf"^{STAMP} ties: ties: started, \d+ to do$", err, re.M), err
    assert re.search(rf"^{STAMP} ties: ties: done, (\d+)/\1 in \d+\.\ds$", err, re.M), err
    assert re.search(rf"^{STAMP} ties \(merge\): computed in", err, re.M), err
    assert "━" not in err  # no bar

    keys = {s["step"]: s["keys"][0] for s in doc["steps"]}
    listing = as_json(hostile.run(["ls", "--json", "--store", tmp_path / "store"]))
    assert {a["key"] for a in listing["artifacts"]} == set(keys.values())
    assert {a["step"] for a in listing["artifacts"]} == {"avg", "ta", "ties"}
    assert all(a["kind"] == "merge" and a["size_bytes"] > 0 and a["created"] for a in listing["artifacts"])
    assert as_json(hostile.run(["ls", "--json", "--kind", "fisher", "--store", tmp_path / "store"]))["artifacts"] == []

    shown = as_json(hostile.run(["show", keys["ties"][:10], "--json", "--store", tmp_path / "store"]))
    assert shown["key"] == keys["ties"] and shown["kind"] == "merge"
    assert shown["params"]["method"] == "ties" and shown["params"]["params"]["density"] == 0.5
    assert shown["inputs"] and isinstance(shown["meta"], dict)
    assert "weights/encoder.layer.0.attention.self.query.weight" in shown["tensors"]

    status = as_json(hostile.run(["status", recipe, "--json"], cwd=tmp_path))
    assert [s["state"] for s in status] == ["cached"] * 3

    again = hostile.run(["run", recipe, "--json"], cwd=tmp_path)
    assert {s["state"] for s in as_json(again)["steps"]} == {"cached"}


def test_quiet_verbose_and_log(tmp_path, zoo):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    log = tmp_path / "run.log"
    quiet = hostile.run(["-q", "--log", log, "run", recipe], cwd=tmp_path)
    assert quiet.code == 0 and quiet.err == "", quiet.err
    assert "computed" in quiet.out  # the table is still printed
    logged = log.read_text()
    assert re.search(rf"^{STAMP} avg: simple_average: started", logged, re.M), logged
    assert re.search(rf"^{STAMP} ties \(merge\): computed in", logged, re.M), logged
    assert "[bold]" not in logged

    verbose = hostile.run(["-v", "--log", log, "run", recipe, "--json"], cwd=tmp_path)
    keys = [s["keys"][0] for s in as_json(verbose)["steps"]]
    assert "store" in verbose.err and all(k in verbose.err for k in keys)  # debug lines: full keys
    assert keys[0] in log.read_text() and logged in log.read_text()  # appended, with the debug lines

    normal = hostile.run(["run", recipe], cwd=tmp_path)
    assert "ties (merge): cached" in normal.err and keys[0] not in normal.err  # -v and -q do not stick

    both = hostile.run(["-q", "-v", "run", recipe], cwd=tmp_path)
    hostile.assert_refused(both, "-q", "-v")
    bad = hostile.run(["--log", tmp_path / "no" / "such" / "dir.log", "run", recipe], cwd=tmp_path)
    hostile.assert_refused(bad, "--log")


def test_tensor_progress_lines_every_tenth_and_on_a_timer(monkeypatch):
    import io

    from rich.console import Console

    from fmerge import progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    progress.configure()
    with progress.tensor_progress(console, "quick", 100) as advance:
        for _ in range(100):
            advance()
    assert len(buf.getvalue().splitlines()) == 2  # a quick task: start and done only
    buf.truncate(0), buf.seek(0)
    progress.configure(min_seconds=0.0)
    with progress.tensor_progress(console, "job", 100) as advance:
        for _ in range(100):
            advance("ignored", 1.0)
    lines = buf.getvalue().splitlines()
    assert all(re.match(rf"{STAMP} job: ", ln) for ln in lines), lines
    assert lines[0].endswith("started, 100 to do") and re.search(r"done, 100/100 in \d+\.\ds$", lines[-1])
    assert [ln.split("job: ")[1].split(",")[0] for ln in lines[1:-1]] == [f"{10 * i}/100 (" + f"{10 * i}%)"
                                                                         for i in range(1, 10)]
    buf.truncate(0), buf.seek(0)
    progress.configure(every_seconds=0.0)  # a line at every advance
    with progress.tensor_progress(console, "slow", 3) as advance:
        advance(), advance(), advance()
    assert len(buf.getvalue().splitlines()) == 4  # start, 1/3, 2/3, done
    buf.truncate(0), buf.seek(0)
    progress.configure()
    with pytest.raises(RuntimeError):
        with progress.tensor_progress(console, "boom", 5) as advance:
            advance()
            raise RuntimeError
    assert "boom: stopped at 1/5 after" in buf.getvalue()
    progress.configure(progress.QUIET)
    buf.truncate(0), buf.seek(0)
    with progress.tensor_progress(console, "hush", 5) as advance:
        advance()
    assert buf.getvalue() == ""
    progress.configure()


def test_merge_json(tmp_path, zoo):
    args = ["merge", "--method", "ties", "--base", zoo["base"], "--model", zoo["task0"], "--model", zoo["task1"],
            "--param", "density=0.5", "--out", tmp_path / "merged", "--store", tmp_path / "store", "--json"]
    doc = as_json(hostile.run(args))
    assert doc["method"] == "ties" and doc["out"] == str((tmp_path / "merged").resolve())
    assert [(s["step"], s["state"]) for s in doc["steps"]] == [("merge", "computed")]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert [s["state"] for s in as_json(hostile.run(args))["steps"]] == ["cached"]


def test_fisher_json(tmp_path):
    model, data, _ = make_classifier(tmp_path)
    result = hostile.run(["fisher", "--model", model, "--data", data, "--examples", "6", "--max-length", "16",
                          "--store", tmp_path / "store", "--json"])
    doc = as_json(result)
    (row,) = doc["fisher"]
    assert row["model"] == "clf" and row["estimator"] == "exact" and row["examples"] == 6
    assert row["fisher_mean"] > 0 and not row["extended_from"] and len(row["key"]) >= 32
    assert doc["steps"][0]["keys"] == [row["key"]] and doc["steps"][0]["state"] == "computed"
    assert re.search(rf"^{STAMP} fisher: clf: done", result.err, re.M), result.err


EVAL_RECIPE = two_task_recipe("from_step: ft_{}", finetune_steps("steps: 4, batch_size: 8, max_length: 16") + """\
  ta: {kind: merge, method: task_arithmetic}
  eval: {kind: eval, merges: [ta], max_length: 16, output: results}
""")


def test_run_json_holds_eval_results_and_sweep_summaries(tmp_path):
    two_task_project(tmp_path)
    recipe = write_recipe(tmp_path, EVAL_RECIPE, "tiny.yaml")
    doc = as_json(hostile.run(["run", recipe, "--json", "--set", "ta.params.lambda=0.3,1.0"], cwd=tmp_path))
    rows = doc["results"]["eval"]
    assert {r["task"] for r in rows} == {"sentiment", "animal"}
    assert {"base", "individual"} <= {r["variant"] for r in rows}
    assert all(0 <= r["accuracy"] <= 1 and r["split"] == "test" for r in rows)
    (sweep,) = doc["sweeps"]["eval"]
    assert sweep["split"] == "validation" and len(sweep["variants"]) == 2 and sweep["chosen"] in sweep["variants"]
    assert {r["selected_on"] for r in rows if r["variant"] == sweep["chosen"]} == {"validation"}
