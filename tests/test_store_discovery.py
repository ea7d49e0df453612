"""One store per recipe, whatever the working directory (api.store_root, README "The store").

With no --store, `store:` or $FMERGE_STORE, the store is found as git finds `.git`: upward from the
recipe's directory (the working directory without a recipe), the first `artifacts/` marked by
fmerge-store.json, up to the repository's top; else `artifacts/` at that top, or beside a recipe
outside git. An unmarked `artifacts/` is never taken for a store."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ZOO_RECIPE, fmerge_cli, make_zoo
from fmerge.api import load_recipe, open_store, store_root
from fmerge.errors import StoreError
from fmerge.store import STORE_MARKER, Store

RECIPE = ZOO_RECIPE.replace("store: store\n", "").replace("zoo/", "../zoo/").replace("export: out/ties", "")


@pytest.fixture(autouse=True)
def no_store_variable(monkeypatch):
    monkeypatch.delenv("FMERGE_STORE", raising=False)


def project(root, git: bool):
    """root/zoo, root/recipes/x.yaml (no `store:`), and a git repository at root if `git`."""
    make_zoo(root / "zoo")
    (root / "recipes").mkdir()
    (root / "recipes" / "x.yaml").write_text(RECIPE)
    if git:
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root / "recipes" / "x.yaml"


def test_status_from_the_repository_root_and_from_recipes_sees_one_store_and_the_same_keys(tmp_path):
    recipe = project(tmp_path / "repo", git=True)
    repo = tmp_path / "repo"
    ran = json.loads(fmerge_cli("run", "--json", "recipes/x.yaml", cwd=repo).stdout)
    seen = {cwd: json.loads(fmerge_cli("status", "--json", path, cwd=cwd).stdout)
            for cwd, path in ((repo, "recipes/x.yaml"), (repo / "recipes", "x.yaml"), (tmp_path, recipe))}
    assert {cwd: {r["state"] for r in rows} for cwd, rows in seen.items()} == {cwd: {"cached"} for cwd in seen}
    assert len({json.dumps({r["step"]: r["keys"] for r in rows}) for rows in seen.values()}) == 1
    assert {r["store"] for rows in seen.values() for r in rows} == {str(repo / "artifacts")}
    assert ran["store"] == str(repo / "artifacts") and (repo / "artifacts" / STORE_MARKER).is_file()
    table = fmerge_cli("status", "x.yaml", cwd=repo / "recipes").stdout
    assert f"store: {repo / 'artifacts'}\n" in table
    # gc RECIPE judges the recipe's store, from anywhere
    assert "0 artifact(s) would be removed" in fmerge_cli("gc", recipe, "--dry-run", cwd=tmp_path).stdout
    assert not (repo / "recipes" / "artifacts").exists() and not (tmp_path / "artifacts").exists()


def test_the_first_marked_store_upward_is_used_and_commands_without_a_recipe_search_from_the_cwd(tmp_path, monkeypatch):
    recipe = project(tmp_path / "p", git=False)
    nested = tmp_path / "p" / "recipes" / "deeper"
    nested.mkdir()
    Store.create_or_open(tmp_path / "p" / "artifacts")  # a store above the recipe's directory
    r = load_recipe(recipe)
    for cwd in (tmp_path, nested, tmp_path / "p" / "zoo"):
        monkeypatch.chdir(cwd)
        assert store_root(None, r) == tmp_path / "p" / "artifacts"
    monkeypatch.chdir(nested)
    assert store_root(None) == tmp_path / "p" / "artifacts"  # ls, show, verify, merge: from the cwd
    listing = json.loads(fmerge_cli("ls", "--json", cwd=nested).stdout)
    assert listing["store"] == str(tmp_path / "p" / "artifacts")


def test_without_a_store_one_is_made_at_the_repository_top_or_beside_a_recipe_outside_git(tmp_path, monkeypatch):
    in_git = project(tmp_path / "repo", git=True)
    loose = project(tmp_path / "loose", git=False)
    monkeypatch.chdir(tmp_path)
    assert store_root(None, load_recipe(in_git)) == tmp_path / "repo" / "artifacts"
    assert store_root(None, load_recipe(loose)) == tmp_path / "loose" / "recipes" / "artifacts"
    monkeypatch.chdir(tmp_path / "repo" / "zoo")
    assert store_root(None) == tmp_path / "repo" / "artifacts"
    monkeypatch.chdir(tmp_path)
    assert store_root(None) == tmp_path / "artifacts"
    # what is named wins: --store, then the recipe's store:, then $FMERGE_STORE
    monkeypatch.setenv("FMERGE_STORE", str(tmp_path / "env"))
    assert store_root(None, load_recipe(in_git)) == tmp_path / "env"
    assert store_root(tmp_path / "given", load_recipe(in_git)) == tmp_path / "given"


def test_an_unmarked_artifacts_directory_is_passed_over_and_never_adopted(tmp_path, monkeypatch):
    recipe = project(tmp_path / "repo", git=True)
    repo = tmp_path / "repo"
    mine = repo / "recipes" / "artifacts"  # the user's own folder, nearer the recipe than the store
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    Store.create_or_open(repo / "artifacts")
    monkeypatch.chdir(repo / "recipes")
    assert store_root(None, load_recipe(recipe)) == repo / "artifacts"
    assert store_root(None) == repo / "artifacts"
    # where the store is to be created, a folder that is not a store is refused, left as it was
    (repo / "artifacts" / STORE_MARKER).unlink()
    for sub in ("objects", "tmp", "locks", "cache"):
        (repo / "artifacts" / sub).rmdir()
    (repo / "artifacts" / "results.csv").write_text("mine")
    assert store_root(None, load_recipe(recipe)) == repo / "artifacts"
    with pytest.raises(StoreError, match="is not an fmerge artifact store"):
        open_store(None, load_recipe(recipe), create=True)
    refused = fmerge_cli("run", "x.yaml", cwd=repo / "recipes", check=False)
    assert refused.returncode == 2 and "not an fmerge artifact store" in refused.stderr
    assert sorted(p.name for p in (repo / "artifacts").iterdir()) == ["results.csv"]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
