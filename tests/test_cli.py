"""The command line as users call it: direct merge, methods, status --json, error paragraphs."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import ZOO_RECIPE, fmerge_cli, write_recipe


def dense_ties(base: torch.Tensor, models: list[torch.Tensor], density: float, lam: float) -> torch.Tensor:
    """TIES written plainly: per-model top-k trim, elected sign, disjoint mean of agreeing entries."""
    taus = []
    for m in models:
        tau = (m - base).flatten()
        k = int(torch.ceil(torch.tensor(density * tau.numel())).item())
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[torch.argsort(tau.abs(), descending=True)[:k]] = True
        taus.append(torch.where(keep, tau, torch.zeros_like(tau)))
    stacked = torch.stack(taus)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    merged = torch.where(count > 0, (stacked * agree).sum(0) / count.clamp(min=1), torch.zeros_like(sign))
    return base + lam * merged.reshape(base.shape)


def test_direct_ties_merge_of_three_tiny_berts_matches_dense_reference(tmp_path, zoo):
    out = tmp_path / "merged"
    fmerge_cli("merge", "--method", "ties", "--base", zoo["base"], "--model", zoo["task0"], "--model", zoo["task1"],
               "--model", zoo["task2"], "--param", "density=0.4", "--param", "lambda=0.8", "--out", out,
               "--store", tmp_path / "store")
    merged = load_file(out / "model.safetensors")
    base = load_file(zoo["base"] / "model.safetensors")
    models = [load_file(zoo[f"task{i}"] / "model.safetensors") for i in range(3)]
    assert set(merged) == set(base)
    for name, b in base.items():
        expected = dense_ties(b, [m["bert." + name] for m in models], 0.4, 0.8)
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    # same command again: served from the store
    again = fmerge_cli("merge", "--method", "ties", "--base", zoo["base"], "--model", zoo["task0"], "--model", zoo["task1"],
                       "--model", zoo["task2"], "--param", "density=0.4", "--param", "lambda=0.8", "--out", out,
                       "--store", tmp_path / "store")
    assert "cached" in again.stdout and "computed" not in again.stdout


def test_status_json_and_second_run_all_cached(tmp_path, zoo):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    before = json.loads(fmerge_cli("status", recipe, "--json").stdout)
    assert [(s["step"], s["state"]) for s in before] == [("avg", "stale"), ("ta", "stale"), ("ties", "stale")]
    fmerge_cli("run", recipe)
    after = json.loads(fmerge_cli("status", recipe, "--json").stdout)
    assert {s["state"] for s in after} == {"cached"}
    second = fmerge_cli("run", recipe)
    assert "computed" not in second.stdout and second.stdout.count("cached") >= 3


def test_methods_lists_every_method_with_parameters():
    text = fmerge_cli("methods").stdout
    for name in ("simple_average", "weighted_average", "task_arithmetic", "ties", "dare", "fisher"):
        assert name in text
    for param in ("density", "lambda", "weights", "p =", "floor"):
        assert param in text


def test_user_mistake_is_one_paragraph_exit_2_no_traceback(tmp_path, zoo):
    recipe = write_recipe(tmp_path, ZOO_RECIPE.replace("density: 0.5", "densty: 0.5"))
    proc = fmerge_cli("run", recipe, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "did you mean 'density'?" in proc.stderr
    proc = fmerge_cli("merge", "--method", "tis", "--base", zoo["base"], "--model", zoo["task0"], "--out",
                      tmp_path / "o", "--store", tmp_path / "s", check=False)
    assert proc.returncode == 2 and "Did you mean 'ties'?" in proc.stderr and "Traceback" not in proc.stderr


def test_ls_show_and_gc(tmp_path, zoo):
    recipe = write_recipe(tmp_path, ZOO_RECIPE)
    fmerge_cli("run", recipe)
    listing = fmerge_cli("ls", "--store", tmp_path / "store").stdout
    assert listing.count("merge") >= 3
    key = json.loads(fmerge_cli("status", recipe, "--json").stdout)[2]["keys"][0]
    shown = fmerge_cli("show", key[:8], "--store", tmp_path / "store").stdout
    assert '"method": "ties"' in shown and "density" in shown
    # a recipe keeping only the ties step: gc removes the other two merges
    small = write_recipe(tmp_path, ZOO_RECIPE.split("  avg:")[0] + "  ties:" + ZOO_RECIPE.split("  ties:")[1], "small.yaml")
    gc = fmerge_cli("gc", small, "--store", tmp_path / "store").stdout
    assert "2 artifact(s) removed" in gc
    assert json.loads(fmerge_cli("status", small, "--json").stdout)[0]["state"] == "cached"


def test_a_trace_table_shows_each_tasks_accuracy_in_its_own_column():
    from fmerge.cli import trace_table

    table = trace_table([{"iteration": 0, "loss": 0.5, "task_accuracy": {"a": 0.25, "b": 1.0}},
                         {"iteration": 1, "loss": 0.25, "task_accuracy": {"a": 0.5, "b": 0.75}}], "t")
    assert [c.header for c in table.columns] == ["iteration", "loss", "task_accuracy[a]", "task_accuracy[b]"]
    assert list(table.columns[2].cells) == ["0.25", "0.5"] and list(table.columns[3].cells) == ["1", "0.75"]
