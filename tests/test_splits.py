"""Splits that cannot leak: a single data file is cut into disjoint train/validation/test splits by a
seeded partition (or each split names its own file), and a step that adapts, estimates, trains or
chooses on the split an eval reports is an error unless the eval allows it explicitly."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from conftest import fmerge_cli, write_recipe
from fmerge.fingerprint import FileHashes
from fmerge.api import load_recipe
from fmerge.data import DataSpec, label_names_for, load_dataset_split, partition_indices, partition_sizes
from fmerge.errors import FmergeError
from fmerge.tasks import data_spec


def write_rows(path: Path, n: int, start: int = 0, label=lambda i: i % 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": f"row {i}", "label": label(i)}) + "\n"
                            for i in range(start, start + n)))
    return path


def ids(ds) -> list[int]:
    return list(ds["id"])


def project(root: Path, rows: int = 50) -> Path:
    """Empty model directories (validation reads no weights) and one data file of `rows` rows."""
    for d in ("base", "a", "b"):
        (root / d).mkdir(parents=True, exist_ok=True)
    write_rows(root / "data" / "t.jsonl", rows)
    return root


HEAD = """base: base
store: store
data:
  t: {DATA}
models:
  a: {path: a, data: t}
  b: {path: b, data: t}
steps:
"""


def recipe_text(steps: str, data: str = "{path: data/t.jsonl}", extra: str = "") -> str:
    return HEAD.replace("{DATA}", data) + steps + extra


def load(root: Path, steps: str, data: str = "{path: data/t.jsonl}", extra: str = "", sets=None):
    return load_recipe(write_recipe(root, recipe_text(steps, data, extra)), sets)


def error(root: Path, steps: str, data: str = "{path: data/t.jsonl}", extra: str = "", sets=None) -> str:
    with pytest.raises(FmergeError) as info:
        load(root, steps, data, extra, sets)
    return " ".join(str(info.value).split())


def split_rows(recipe, split: str, entry: str = "t"):
    return load_dataset_split(data_spec(types.SimpleNamespace(recipe=recipe, data_hashes=FileHashes(None)), entry, split))


def line_of(root: Path, text: str) -> int:
    return next(i for i, line in enumerate((root / "recipe.yaml").read_text().splitlines(), 1) if text in line)


# ------------------------------------------------------------------------------------------
# The partition of one file


def test_partition_sizes_follow_the_largest_remainder_rule():
    shares = [("train", 0.8), ("validation", 0.1), ("test", 0.1)]
    assert partition_sizes(50, shares) == {"test": 5, "train": 40, "validation": 5}
    # 24 rows: quotas 19.2, 2.4, 2.4 -> floors 19, 2, 2; the row left goes to the largest fraction,
    # test and validation tie at .4 and test comes first in sorted order.
    assert partition_sizes(24, shares) == {"test": 3, "train": 19, "validation": 2}
    assert partition_sizes(100, [("a", 0.29), ("b", 0.71)]) == {"a": 29, "b": 71}  # no float drift
    for n in range(0, 60):
        sizes = partition_sizes(n, shares)
        assert sum(sizes.values()) == n
        assert all(abs(sizes[k] - r * n) < 1 for k, r in shares)
        blocks = partition_indices(n, shares, 3)
        assert sorted(i for b in blocks.values() for i in b.tolist()) == list(range(n))


def test_single_file_is_partitioned_disjoint_covering_seeded_and_stable(tmp_path):
    root = project(tmp_path, rows=50)
    recipe = load(root, "  ta: {kind: merge, method: task_arithmetic}\n")
    parts = {s: ids(split_rows(recipe, s)) for s in ("train", "validation", "test")}
    assert {s: len(r) for s, r in parts.items()} == {"train": 40, "validation": 5, "test": 5}
    assert sorted(sum(parts.values(), [])) == list(range(50))  # disjoint, and every row
    assert all(r == sorted(r) for r in parts.values())  # file order within a split
    again = load(root, "  ta: {kind: merge, method: task_arithmetic}\n")
    assert {s: ids(split_rows(again, s)) for s in parts} == parts  # the same every run
    other = load(root, "  ta: {kind: merge, method: task_arithmetic}\n",
                 data="{path: data/t.jsonl, partition_seed: 1}")
    moved = {s: ids(split_rows(other, s)) for s in parts}
    assert moved != parts and sorted(sum(moved.values(), [])) == list(range(50))
    spec = data_spec(types.SimpleNamespace(recipe=other, data_hashes=FileHashes(None)), "t", "test")
    assert spec.partition == (("test", 0.1), ("train", 0.8), ("validation", 0.1)) and spec.partition_seed == 1


def test_configured_ratios_and_names(tmp_path):
    root = project(tmp_path, rows=40)
    recipe = load(root, "  ta: {kind: merge, method: task_arithmetic}\n",
                  data="{path: data/t.jsonl, validation_split: dev, partition: {train: 0.5, dev: 0.25, test: 0.25}}")
    sizes = {s: len(split_rows(recipe, s)) for s in ("train", "dev", "test")}
    assert sizes == {"train": 20, "dev": 10, "test": 10}


def test_a_split_the_partition_lacks_is_an_error_naming_the_key(tmp_path):
    root = project(tmp_path)
    recipe = load(root, "  ta: {kind: merge, method: task_arithmetic}\n",
                  data="{path: data/t.jsonl, partition: {train: 0.9, test: 0.1}}")
    with pytest.raises(FmergeError) as info:
        split_rows(recipe, "validation")
    msg = " ".join(str(info.value).split())
    assert f"recipe.yaml:{line_of(root, 't: {')}: data.t.partition: data 't' is one file partitioned into test, " \
           f"train; it has no split 'validation'" in msg and "add 'validation' to its partition" in msg
    # The loader alone refuses too, never handing back another split's rows.
    spec = DataSpec(path=str(root / "data" / "t.jsonl"), split="validation", partition=(("test", 0.1), ("train", 0.9)))
    with pytest.raises(FmergeError, match="is partitioned into test, train .* it has no split 'validation'"):
        load_dataset_split(spec)


def test_a_split_the_partition_leaves_empty_is_named(tmp_path):
    write_rows(tmp_path / "few.jsonl", 5)
    spec = DataSpec(path=str(tmp_path / "few.jsonl"), split="validation",
                    partition=(("test", 0.1), ("train", 0.8), ("validation", 0.1)))
    with pytest.raises(FmergeError, match="gives split 'validation' none of its rows; raise that split's share"):
        load_dataset_split(spec)


def test_label_names_of_a_partitioned_split_come_from_the_whole_file(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", 30, label=lambda i: "rare" if i == 0 else ("x" if i % 2 else "y"))
    shares = (("test", 0.1), ("train", 0.8), ("validation", 0.1))
    split = next(s for s, idx in partition_indices(30, shares, 0).items() if 0 not in idx.tolist())
    spec = DataSpec(path=str(path), split=split, partition=shares)
    assert label_names_for(load_dataset_split(spec), spec) == ["rare", "x", "y"]


# ------------------------------------------------------------------------------------------
# Named split files, directories, and mistakes in the data entry


def test_named_split_files_are_read_as_they_are(tmp_path):
    root = project(tmp_path)
    write_rows(root / "data" / "tr.jsonl", 7, start=100)
    write_rows(root / "data" / "va.jsonl", 3, start=200)
    write_rows(root / "data" / "te.jsonl", 4, start=300)
    recipe = load(root, "  ta: {kind: merge, method: task_arithmetic}\n",
                  data="{splits: {train: data/tr.jsonl, validation: data/va.jsonl, test: data/te.jsonl}}")
    assert ids(split_rows(recipe, "train")) == list(range(100, 107))
    assert ids(split_rows(recipe, "validation")) == [200, 201, 202]
    assert ids(split_rows(recipe, "test")) == [300, 301, 302, 303]
    assert data_spec(types.SimpleNamespace(recipe=recipe, data_hashes=FileHashes(None)), "t", "test").partition is None


def test_a_directory_of_split_files_keeps_its_splits(tmp_path):
    root = project(tmp_path)
    for split, start in (("train", 0), ("validation", 100), ("test", 200)):
        write_rows(root / "data" / "dir" / f"{split}.jsonl", 4, start=start)
    recipe = load(root, "  ta: {kind: merge, method: task_arithmetic}\n", data="{path: data/dir}")
    assert ids(split_rows(recipe, "validation")) == [100, 101, 102, 103]
    assert data_spec(types.SimpleNamespace(recipe=recipe, data_hashes=FileHashes(None)), "t", "test").partition is None


@pytest.mark.parametrize("data,expected", [
    ("{path: data/t.jsonl, partition: {train: 0.8, validation: 0.1}}", "data.t.partition: the shares must sum to 1 (they sum to 0.9)"),
    ("{path: data/t.jsonl, partition: {train: 0.9, valid: 0.1}}", "data.t.partition: split 'valid' is none of this entry's split names (train, validation, test)"),
    ("{path: data/t.jsonl, partition: {train: 1.1, test: -0.1}}", "data.t.partition: the share of split 'test' must be > 0"),
    ("{path: data/t.jsonl, splits: {train: data/t.jsonl}}", "data.t: give exactly one of 'path'"),
    ("{text: text}", "data.t: give exactly one of 'path'"),
    ("{splits: {train: data/t.jsonl}, partition_seed: 3}", "'partition' and 'partition_seed' cut the single file given as 'path'"),
    ("{path: data/dir, partition: {train: 0.5, test: 0.5}}", "data.t.partition: a partition cuts a single data file, but path 'data/dir' is a directory"),
    ("{path: data/t.jsonl, test_split: validation}", "data.t.test_split: 'validation' is also the validation_split"),
    ("{splits: {train: data/t.jsonl, test: data/nope.jsonl}}", "data.t.splits.test: data file"),
    ("{splits: {train: data/t.jsonl, test: ./data/t.jsonl}}", "data.t.splits.test: names the same file as splits.train"),
])
def test_data_entry_mistakes_name_the_key(tmp_path, data, expected):
    root = project(tmp_path)
    (root / "data" / "dir").mkdir()
    msg = error(root, "  ta: {kind: merge, method: task_arithmetic}\n", data=data)
    assert f"recipe.yaml:{line_of(root, 't: {')}: " in msg
    assert expected in msg


def test_asking_a_named_split_file_that_is_not_there_names_the_key(tmp_path):
    root = project(tmp_path)
    write_rows(root / "data" / "t2.jsonl", 3)
    msg = error(root, "  ada: {kind: adamerging}\n", data="{splits: {train: data/t.jsonl, test: data/t2.jsonl}}")
    assert "data.t.splits: data 't' names no file for split 'validation' (it names train, test)" in msg


# ------------------------------------------------------------------------------------------
# Leak checks


LEAKS = {
    # the reproduction: AdaMerging adapting on the split the eval reports, all in one file
    "adamerging": ("  ada: {kind: adamerging, split: test}\n  eval: {kind: eval, merges: [ada]}\n",
                   "ada: {", "steps.ada.split: step 'ada' adapts on split 'test' of data 't', the split eval step "
                   "'eval' reports, so its scores would be measured on rows it was fit to"),
    "frank_wolfe": ("  fw: {kind: frank_wolfe}\n  eval: {kind: eval, merges: [fw], split: validation}\n",
                    "fw: {", "steps.fw.split: step 'fw' adapts on split 'validation' of data 't', the split eval "
                    "step 'eval' reports"),
    "fisher": ("  fish: {kind: fisher, split: test}\n  fm: {kind: merge, method: fisher, fisher: fish}\n"
               "  eval: {kind: eval, merges: [fm]}\n",
               "fish: {", "steps.fish.split: step 'fish' estimates its statistics on split 'test' of data 't'"),
    "select": ("  ta: {kind: merge, method: task_arithmetic}\n  eval: {kind: eval, merges: [ta], select_split: test}\n"
               "sweep:\n  ta.params.lambda: [0.1, 0.3]\n",
               "eval: {", "steps.eval.select_split: eval step 'eval' chooses among swept variants on split 'test' "
               "of data 't', the split eval step 'eval' reports, so the winner would be picked on the rows it is "
               "scored on"),
}


@pytest.mark.parametrize("case", sorted(LEAKS))
def test_fitting_or_choosing_on_the_reported_split_is_an_error_via_cli(tmp_path, case):
    root = project(tmp_path)
    steps, anchor, expected = LEAKS[case]
    recipe = write_recipe(root, recipe_text(steps))
    proc = fmerge_cli("validate", recipe, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    msg = " ".join(proc.stderr.split())
    assert f"recipe.yaml:{line_of(root, anchor)}: {expected}" in msg
    assert "allow_split_overlap: true on steps.eval" in msg
    # Allowed explicitly, it validates.
    allowed = steps.replace("kind: eval,", "kind: eval, allow_split_overlap: true,")
    write_recipe(root, recipe_text(allowed))
    assert fmerge_cli("validate", recipe).returncode == 0


def test_different_blocks_of_the_partition_do_not_leak(tmp_path):
    root = project(tmp_path)
    load(root, "  ada: {kind: adamerging}\n  fw: {kind: frank_wolfe}\n  fish: {kind: fisher}\n"
               "  fm: {kind: merge, method: fisher, fisher: fish}\n  ta: {kind: merge, method: task_arithmetic}\n"
               "  eval: {kind: eval, merges: [ada, fw, fm, ta]}\n", extra="sweep:\n  ta.params.lambda: [0.1, 0.3]\n")


def test_selection_leak_through_a_command_line_sweep(tmp_path):
    root = project(tmp_path)
    steps = "  ta: {kind: merge, method: task_arithmetic}\n  eval: {kind: eval, merges: [ta], select_split: test}\n"
    load(root, steps)  # no sweep: nothing is chosen on the selection split
    msg = error(root, steps, sets=["ta.params.lambda=0.1,0.3"])
    assert "steps.eval.select_split: eval step 'eval' chooses among swept variants on split 'test'" in msg


def test_a_swept_adaptation_split_is_checked_per_variant(tmp_path):
    root = project(tmp_path)
    msg = error(root, "  ada: {kind: adamerging}\n  eval: {kind: eval, merges: [ada]}\n",
                extra="sweep:\n  ada.split: [validation, test]\n")
    assert "steps.ada.split: step 'ada[split=test]' adapts on split 'test' of data 't'" in msg


def test_finetune_on_the_reported_split_is_an_error(tmp_path):
    root = project(tmp_path)
    text = recipe_text("  ft: {kind: finetune, data: t}\n  eval: {kind: eval}\n",
                       data="{path: data/t.jsonl, test_split: train, partition: {train: 0.9, validation: 0.1}}")
    text = text.replace("a: {path: a, data: t}", "a: {from_step: ft, data: t}")
    with pytest.raises(FmergeError) as info:
        load_recipe(write_recipe(root, text))
    msg = " ".join(str(info.value).split())
    assert f"recipe.yaml:{line_of(root, 'ft: {')}: steps.ft.data: step 'ft' trains on split 'train' of data 't', " \
           f"the split eval step 'eval' reports" in msg


def test_one_file_named_twice_or_a_directory_split_reused_leaks(tmp_path):
    root = project(tmp_path)
    # The same file as the test split of one entry and the whole of another: the same rows.
    text = recipe_text("  ada: {kind: adamerging, tasks: [b]}\n  eval: {kind: eval, merges: [ada], models: [a]}\n")
    text = text.replace("  t: {path: data/t.jsonl}", "  t: {path: data/t.jsonl}\n  u: {splits: {validation: data/t.jsonl}}")
    text = text.replace("b: {path: b, data: t}", "b: {path: b, data: u}")
    with pytest.raises(FmergeError, match="step 'ada' adapts on split 'validation' of data 'u', whose rows overlap "
                                          "split 'test' of data 't' that eval step 'eval' reports"):
        load_recipe(write_recipe(root, text))
    # A directory's split asked for twice.
    for split in ("train", "validation", "test"):
        write_rows(root / "data" / "dir" / f"{split}.jsonl", 4)
    msg = error(root, "  ada: {kind: adamerging, split: test}\n  eval: {kind: eval, merges: [ada]}\n",
                data="{path: data/dir}")
    assert "steps.ada.split: step 'ada' adapts on split 'test' of data 't'" in msg
    load(root, "  ada: {kind: adamerging}\n  eval: {kind: eval, merges: [ada]}\n", data="{path: data/dir}")


# ------------------------------------------------------------------------------------------
# End to end: one file per task, partitioned; what was used is recorded


def test_adamerging_and_eval_on_partitioned_files_record_their_splits(tmp_path):
    from _iterative_project import HEADER, build, run

    root = build(tmp_path)
    for task in ("sentiment", "animal", "color"):
        rows = "".join((root / "data" / task / f"{s}.jsonl").read_text() for s in ("train", "validation", "test"))
        (root / "data" / f"{task}.jsonl").write_text(rows)  # 160 rows: 128 / 16 / 16
    header = HEADER
    for task in ("sentiment", "animal", "color"):
        header = header.replace(f"{{path: data/{task}}}", f"{{path: data/{task}.jsonl}}")
    recipe = root / "ada.yaml"
    recipe.write_text(header + """
  ada: {kind: adamerging, steps: 2, batch_size: 4, examples: 8, max_length: 16}
  eval: {kind: eval, merges: [ada], max_length: 16, individual: false, base: false}
""")
    rt, states, _ = run(recipe)
    assert states == {"ada": "computed", "eval": "computed"}
    art = rt.store.open(rt.planned["ada"][0].key)
    assert art.attrs["params"]["splits"] == ["validation"] * 3  # by position: no name in a key
    assert art.meta["adaptation_splits"] == {"sentiment": "validation", "animal": "validation", "color": "validation"}
    assert {(r["task"], r["split"], r["n"]) for r in rt.results["eval"]} == {
        ("sentiment", "test", 16), ("animal", "test", 16), ("color", "test", 16)}
