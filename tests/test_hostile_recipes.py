"""Hostile recipes (issue 13, the recipe family): every one is refused with exit status 2, one
paragraph naming the file and line or the key, no traceback, nothing changed, in bounded time.

Each case runs the real CLI in process (`tests/hostile.py`) on a project of empty model
directories: `validate` checks that they exist and reads no weights. `--set` cases go through
`status`, the cheapest command that takes `--set` (the recipe is refused before any store is read).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import hostile

pytestmark = pytest.mark.timeout(600, func_only=True)  # a hang guard only: never a speed check (busy machines)

BOUND_S = 300.0  # each refusal, end to end: a hang guard only, generous for a busy machine

GOOD = """\
base: zoo/base
models:
  a: zoo/task0
  b: zoo/task1
  c: zoo/task2
steps:
  ta:
    kind: merge
    method: task_arithmetic
    params: {lambda: 0.3}
  ties:
    kind: merge
    method: ties
    params: {density: 0.5, lambda: 1.0}
"""
# lines: 1 base, 2 models, 3-5 a b c, 6 steps, 7 ta, 8 kind, 9 method, 10 params, 11 ties, ..., 14 params

MERGEKIT = """\
merge_method: ties
base_model: zoo/base
models:
  - model: zoo/task0
    parameters: {weight: 0.5, density: 0.5}
  - model: zoo/task1
    parameters: {weight: 0.5, density: 0.5}
parameters:
  normalize: true
dtype: float32
"""
# lines: 1 merge_method, 2 base_model, 3 models, 4 model, 5 parameters, 6 model, 7 parameters, 8 parameters, 9 normalize


def edit(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def nested_block(depth: int) -> str:
    return "".join("  " * i + "k:\n" for i in range(depth)) + "  " * depth + "k: 1\n"


def laughs(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs": each level an anchored list of `width` aliases of the level before."""
    lines = ['l0: &l0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


GRID_1000 = "[" + ", ".join(f"{i / 1000:.3f}" for i in range(1, 1001)) + "]"
GRID_100 = "[" + ", ".join(f"{i / 100:.2f}" for i in range(1, 101)) + "]"
GRID_600 = "[" + ", ".join(f"{i / 1000:.3f}" for i in range(1, 601)) + "]"
GRID_10 = "[" + ", ".join(str(i / 10) for i in range(1, 11)) + "]"
HUGE = "x" * 900_000  # a value under the 1 MiB recipe limit, far over any message's length


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for d in ("base", "task0", "task1", "task2"):
        (tmp_path / "zoo" / d).mkdir(parents=True)
    return tmp_path


def refused(project: Path, content: str | bytes | None, *mentions: str, command=("validate",),
            target: str = "recipe.yaml", extra: tuple = (), env: dict | None = None) -> str:
    """Write `content` as the recipe, run the command, and check the refusal and that nothing changed."""
    if content is not None:
        path = project / "recipe.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = hostile.snapshot(project)
    start = time.monotonic()
    result = hostile.run([*command, target, *extra], cwd=project, env=env)
    took = time.monotonic() - start
    message = hostile.assert_refused(result, *mentions)
    assert hostile.snapshot(project) == before, "a refused command changed the project"
    assert took < BOUND_S, f"took {took:.1f} s"
    return message


def test_the_good_recipe_validates(project):
    (project / "recipe.yaml").write_text(GOOD)
    result = hostile.run(["validate", "recipe.yaml"], cwd=project)
    assert result.code == 0, result.err


# ------------------------------------------------------------------------------------------
# The file itself: encodings, size, things that are not files

FILE_CASES = {
    "latin1-value": ((GOOD + "name: caf\xe9\n").encode("latin-1"), ["recipe.yaml:15", "not UTF-8", "0xe9"]),
    "latin1-comment": (("# r\xe9sum\xe9\n" + GOOD).encode("latin-1"), ["recipe.yaml:1", "not UTF-8"]),
    "cp1252-quotes": ((GOOD + "name: \u201cdemo\u201d\n").encode("cp1252"), ["recipe.yaml:15", "not UTF-8"]),
    "utf16-bom": (GOOD.encode("utf-16"), ["recipe.yaml:1", "UTF-16", "UTF-8"]),
    "utf16-be-bom": (b"\xfe\xff" + GOOD.encode("utf-16-be"), ["recipe.yaml:1", "UTF-16"]),
    "utf32-bom": (GOOD.encode("utf-32"), ["recipe.yaml:1", "UTF-32"]),
    "utf16-no-bom": (GOOD.encode("utf-16-le"), ["recipe.yaml:1", "NUL"]),
    "nul-byte": (edit("method: ties", "method: ti\0es").encode(), ["recipe.yaml:13", "NUL"]),
    "utf8-surrogate": (GOOD.encode() + b"name: \xed\xa0\x80\n", ["recipe.yaml:15", "not UTF-8"]),
    "utf8-truncated": (GOOD.encode() + b"name: \xe2\x82", ["recipe.yaml:15", "not UTF-8"]),
    "png-bytes": (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", ["recipe.yaml:1", "not UTF-8"]),
    "empty": (b"", ["recipe.yaml", "empty"]),
    "whitespace-only": (b"  \n\n   \n", ["recipe.yaml", "empty"]),
    "comments-only": (b"# a recipe\n# to come\n", ["recipe.yaml", "empty"]),
    "document-marker-only": (b"---\n", ["recipe.yaml", "empty"]),
    "over-1-mib": (("# " + "x" * (1 << 20) + "\n" + GOOD).encode(), ["recipe.yaml", "1048576 bytes"]),
    "over-1-mib-of-yaml": ((GOOD + "exclude:\n" + "  - a\n" * 200_000).encode(), ["recipe.yaml", "1 MiB"]),
}


@pytest.mark.parametrize("content, mentions", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_file_is_refused(project, content, mentions):
    refused(project, content, *mentions)


def test_dev_zero_is_refused_without_reading_it(project):
    refused(project, None, "/dev/zero", "not a regular file", target="/dev/zero")


def test_dev_null_is_refused(project):
    refused(project, None, "/dev/null", "not a regular file", target="/dev/null")


def test_link_to_dev_zero_is_refused(project):
    (project / "recipe.yaml").symlink_to("/dev/zero")
    refused(project, None, "recipe.yaml", "not a regular file")


def test_fifo_is_refused_without_blocking(project):
    os.mkfifo(project / "recipe.yaml")  # opening it for reading would wait for a writer forever
    refused(project, None, "recipe.yaml", "not a regular file")


def test_directory_is_refused(project):
    (project / "recipe.yaml").mkdir()
    refused(project, None, "recipe.yaml", "is a directory")


def test_missing_file_is_refused(project):
    refused(project, None, "nope.yaml", "No such file", target="nope.yaml")


def test_file_name_too_long_is_refused_and_cut(project):
    msg = refused(project, None, "Cannot read recipe", target="r" * 5000 + ".yaml")
    assert "r" * 400 not in msg


# ------------------------------------------------------------------------------------------
# YAML that is not one mapping, or that the parser refuses

SHAPE_CASES = {
    "list": ("- base: zoo/base\n- models: {}\n", ["recipe.yaml:1", "a list, not a mapping"]),
    "scalar-string": ("just some words\n", ["recipe.yaml:1", "single string"]),
    "scalar-int": ("42\n", ["recipe.yaml:1", "not a mapping"]),
    "scalar-null": ("~\n", ["recipe.yaml", "not a mapping"]),
    "scalar-bool": ("yes\n", ["recipe.yaml:1", "not a mapping"]),
    "two-documents": (GOOD + "---\n" + GOOD, ["recipe.yaml:15", "malformed YAML", "single document"]),
    "tab-indent": (edit("    kind: merge\n    method: ties", "\tkind: merge\n\tmethod: ties"),
                   ["recipe.yaml:12", "malformed YAML", "tabs"]),
    "unclosed-flow": (edit("{lambda: 0.3}", "{lambda: 0.3"), ["recipe.yaml:", "malformed YAML"]),
    "unclosed-quote": (edit("method: ties", 'method: "ties'), ["recipe.yaml:", "malformed YAML"]),
    "bad-indent": (edit("  b: zoo/task1", "   b: zoo/task1"), ["recipe.yaml:4", "malformed YAML"]),
    "python-tag": (edit("base: zoo/base", "base: !!python/object/apply:os.system ['true']"),
                   ["recipe.yaml:1", "malformed YAML", "python/object/apply"]),
    "unknown-tag": (edit("method: ties", "method: !secret ties"), ["recipe.yaml:13", "malformed YAML", "!secret"]),
    "bad-explicit-float": (edit("lambda: 0.3", "lambda: !!float lots"), ["recipe.yaml:10", "steps.ta.params.lambda",
                                                                          "cannot be read as a number"]),
    "bad-explicit-int": (edit("lambda: 0.3", "lambda: !!int 0.3"), ["recipe.yaml:10", "steps.ta.params.lambda",
                                                                    "cannot be read as an integer"]),
    "bad-explicit-bool": (edit("lambda: 0.3", "lambda: !!bool maybe"), ["recipe.yaml:10", "cannot be read as a boolean"]),
    "bad-explicit-date": (GOOD + "name: !!timestamp tomorrow\n", ["recipe.yaml:15", "name", "cannot be read as a date"]),
    "impossible-date": (GOOD + "name: 2024-13-45\n", ["recipe.yaml:15", "name", "cannot be read as a date"]),
    "control-character": (GOOD + "name: bell\x07\n", ["recipe.yaml:15", "malformed YAML", "not allowed"]),
    "set-tag-on-list": (edit("params: {lambda: 0.3}", "params: !!set [a, b]"), ["recipe.yaml:10", "malformed YAML"]),
    "omap-tag-on-scalar": (edit("params: {lambda: 0.3}", "params: !!omap 5"), ["recipe.yaml:10", "malformed YAML"]),
}


@pytest.mark.parametrize("text, mentions", SHAPE_CASES.values(), ids=SHAPE_CASES.keys())
def test_shape_or_syntax_is_refused(project, text, mentions):
    refused(project, text, *mentions)


# ------------------------------------------------------------------------------------------
# Costly YAML: nesting, aliases ("billion laughs")

COST_CASES = {
    "deep-flow-lists": (GOOD + "name: " + "[" * 10_000 + "]" * 10_000 + "\n", ["recipe.yaml:15", "nest"]),
    "deep-flow-maps": (GOOD + "name: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n", ["recipe.yaml:15", "nested"]),
    "deep-block-maps": (GOOD + "name:\n" + nested_block(120).replace("\n", "\n  ").rstrip(" ").join(["  ", ""]),
                        ["recipe.yaml:", "name.k.k", "nested more than 64"]),
    "deep-key": (GOOD + "? " + "[" * 2_000 + "]" * 2_000 + "\n: 1\n", ["recipe.yaml:15", "nest"]),
    "deep-key-under-libyaml-limit": (GOOD + "? " + "[" * 300 + "]" * 300 + "\n: 1\n", ["recipe.yaml:15", "nested more than 64"]),
    "deep-flow-under-libyaml-limit": (GOOD + "name: " + "[" * 900 + "]" * 900 + "\n", ["recipe.yaml:15", "name.0.0",
                                                                                      "nested more than 64"]),
    "deep-in-params": (edit("{lambda: 0.3}", "{lambda: " + "[" * 500 + "0.3" + "]" * 500 + "}"),
                       ["recipe.yaml:10", "steps.ta.params.lambda", "nested"]),
    "billion-laughs": (GOOD + laughs(), ["recipe.yaml:", "aliases", "more than 10000 nodes"]),
    "billion-laughs-in-params": (laughs() + edit("{lambda: 0.3}", "{lambda: *l9}"),
                                 ["recipe.yaml:", "alias", "more than 10000 nodes"]),
    "laughs-as-mappings": ("a: &a {x: 1, y: 1, z: 1, w: 1}\n" + "".join(
        f"{c}: &{c} {{x: *{p}, y: *{p}, z: *{p}, w: *{p}}}\n" for p, c in zip("abcdefgh", "bcdefghi")) + GOOD,
        ["recipe.yaml:", "more than 10000 nodes"]),
    "wide-alias-fanout": ("big: &big [" + ", ".join(["1"] * 2_000) + "]\nmany: [" + ", ".join(["*big"] * 10) + "]\n"
                          + GOOD, ["recipe.yaml:2", "more than 10000 nodes"]),
    "recursive-list-alias": (GOOD + "name: &me [1, *me]\n", ["recipe.yaml:15", "name", "contains it"]),
    "recursive-map-alias": (GOOD + "name: &me {self: *me}\n", ["recipe.yaml:15", "name.self", "contains it"]),
    "recursive-merge-key": (edit("  ta:\n", "  ta: &t\n    <<: *t\n"), ["recipe.yaml:8", "steps.ta", "contains it"]),
    "deep-through-aliases": ("d: &d " + "[" * 40 + "]" * 40 + "\ne: &e " + "[" * 30 + "*d" + "]" * 30 + "\n" + GOOD,
                             ["recipe.yaml:2", "more than 64 levels"]),
    "undefined-alias": (edit("{lambda: 0.3}", "{lambda: *nope}"), ["recipe.yaml:10", "malformed YAML", "undefined alias"]),
    "duplicate-anchor": (GOOD + "x: &a 1\ny: &a 2\n", ["recipe.yaml:16", "malformed YAML", "anchor"]),
    "merge-key-scalar": (edit("    kind: merge\n    method: ties", "    <<: 5\n    kind: merge\n    method: ties"),
                         ["recipe.yaml:12", "malformed YAML"]),
    "merge-key-undefined": (edit("    kind: merge\n    method: ties", "    <<: *defaults\n    kind: merge\n    method: ties"),
                            ["recipe.yaml:12", "malformed YAML", "undefined alias"]),
    "merged-unknown-key": ("defaults: &d {kind: merge, method: ties, densty: 0.5}\n" + GOOD,
                           ["recipe.yaml:1", "unknown key"]),
    "merged-step-unknown-key": (edit("  ties:\n    kind: merge\n    method: ties\n",
                                     "  ties:\n    <<: {kind: merge, method: ties, bogus: 1}\n"),
                                ["recipe.yaml:12", "steps.ties.bogus", "unknown key"]),
}


@pytest.mark.parametrize("text, mentions", COST_CASES.values(), ids=COST_CASES.keys())
def test_costly_yaml_is_refused_quickly(project, text, mentions):
    assert len(text) < 60_000
    refused(project, text, *mentions)


def test_the_alias_bomb_is_one_kilobyte(project):
    text = GOOD + laughs()
    assert len(laughs()) < 1024
    refused(project, text, "aliases")


# ------------------------------------------------------------------------------------------
# Keys: given twice, not strings

KEY_CASES = {
    "dup-step": (GOOD + "  ta:\n    kind: merge\n    method: ties\n", ["recipe.yaml:15", "steps.ta", "lines 7 and 15", "twice"]),
    "dup-top-level": (GOOD + "steps:\n  x: {kind: merge, method: ties}\n", ["recipe.yaml:15", "steps", "lines 6 and 15"]),
    "dup-model": (edit("  c: zoo/task2", "  a: zoo/task2"), ["recipe.yaml:5", "models.a", "lines 3 and 5"]),
    "dup-param-flow": (edit("{lambda: 0.3}", "{lambda: 0.3, lambda: 0.5}"), ["recipe.yaml:10", "steps.ta.params.lambda",
                                                                           "lines 10 and 10"]),
    "dup-kind": (edit("    method: task_arithmetic", "    kind: eval\n    method: task_arithmetic"),
                 ["recipe.yaml:9", "steps.ta.kind", "lines 8 and 9"]),
    "dup-quoted-and-plain": (GOOD + '  "ta": {kind: merge, method: ties}\n', ["recipe.yaml:15", "steps.ta", "lines 7 and 15"]),
    "dup-base": ("base: zoo/task0\n" + GOOD, ["recipe.yaml:2", "base", "lines 1 and 2"]),
    "dup-sweep-key": (GOOD + "sweep:\n  ta.params.lambda: [0.1]\n  ta.params.lambda: [0.2]\n",
                      ["recipe.yaml:17", "sweep.ta.params.lambda", "lines 16 and 17"]),
    "dup-in-mergekit": (MERGEKIT + "merge_method: linear\n", ["recipe.yaml:11", "merge_method", "lines 1 and 11"]),
    "dup-in-list-item": (edit("  - model: zoo/task1\n", "  - model: zoo/task1\n    model: zoo/task2\n", MERGEKIT),
                         ["recipe.yaml:7", "models.1.model", "lines 6 and 7"]),
    "int-key-top": (GOOD + "1: one\n", ["recipe.yaml:15", "key 1", "integer", "quote it"]),
    "int-key-model": (edit("  c: zoo/task2", "  3: zoo/task2"), ["recipe.yaml:5", "models", "key 3", "quote it"]),
    "int-key-step": (GOOD + "  7: {kind: merge, method: ties}\n", ["recipe.yaml:15", "steps", "key 7"]),
    "float-key": (edit("{lambda: 0.3}", "{0.5: 0.3}"), ["recipe.yaml:10", "steps.ta.params", "key 0.5", "a number"]),
    "null-key": (GOOD + "~: nothing\n", ["recipe.yaml:15", "null", "quote it"]),
    "empty-null-key": (GOOD + "? \n: nothing\n", ["recipe.yaml:15", "null"]),
    "bool-key-yes": (edit("  c: zoo/task2", "  yes: zoo/task2"), ["recipe.yaml:5", "models", "boolean", "yes/no"]),
    "bool-key-no": (edit("  c: zoo/task2", "  no: zoo/task2"), ["recipe.yaml:5", "key no", "boolean"]),
    "bool-key-on": (edit("  ta:\n", "  on:\n"), ["recipe.yaml:7", "steps", "key on"]),
    "date-key": (edit("  c: zoo/task2", "  2024-01-01: zoo/task2"), ["recipe.yaml:5", "a date"]),
    "list-key": (GOOD + "[a, b]: x\n", ["recipe.yaml:15", "a list", "keys are names"]),
    "map-key": (GOOD + "{a: 1}: x\n", ["recipe.yaml:15", "a mapping", "keys are names"]),
    "complex-key": (GOOD + "? [a]\n: x\n", ["recipe.yaml:15", "a list"]),
    "int-key-in-params-map": (edit("{lambda: 0.3}", "{lambda: {0: 0.3}}"), ["recipe.yaml:10", "steps.ta.params.lambda",
                                                                         "key 0"]),
    "int-key-in-sweep": (GOOD + "sweep:\n  1: [0.1]\n", ["recipe.yaml:16", "sweep", "key 1"]),
    "int-key-mergekit-params": (edit("normalize: true", "1: true", MERGEKIT), ["recipe.yaml:9", "parameters", "key 1"]),
}


@pytest.mark.parametrize("text, mentions", KEY_CASES.values(), ids=KEY_CASES.keys())
def test_bad_keys_are_refused(project, text, mentions):
    refused(project, text, *mentions)


# ------------------------------------------------------------------------------------------
# Values: not finite, too large, booleans for numbers, values too long to echo

VALUE_CASES = {
    "lambda-nan": (edit("lambda: 0.3", "lambda: .nan"), ["recipe.yaml:10", "steps.ta.params.lambda", "not a finite number"]),
    "lambda-NaN": (edit("lambda: 0.3", "lambda: .NaN"), ["recipe.yaml:10", "not a finite number"]),
    "density-inf": (edit("density: 0.5", "density: .inf"), ["recipe.yaml:14", "steps.ties.params.density", "finite"]),
    "lambda-minus-inf": (edit("lambda: 1.0", "lambda: -.inf"), ["recipe.yaml:14", "steps.ties.params.lambda", "finite"]),
    "overflow-to-inf": (edit("lambda: 0.3", "lambda: 1.0e+999"), ["recipe.yaml:10", "steps.ta.params.lambda", "finite"]),
    "tagged-nan": (edit("lambda: 0.3", "lambda: !!float nan"), ["recipe.yaml:10", "finite"]),
    "nan-in-list": (edit("lambda: 0.3", "lambda: [0.3, .nan, 0.3]"), ["recipe.yaml:10", "steps.ta.params.lambda.1", "finite"]),
    "nan-in-map": (edit("lambda: 0.3", "lambda: {a: .nan}"), ["recipe.yaml:10", "steps.ta.params.lambda.a", "finite"]),
    "nan-partition": (GOOD + "data:\n  t: {path: d.jsonl, partition: {train: .nan, test: 0.5}}\n",
                      ["recipe.yaml:16", "data.t.partition.train", "finite"]),
    "nan-in-sweep": (GOOD + "sweep:\n  ta.params.lambda: [0.1, .nan]\n", ["recipe.yaml:16", "sweep.ta.params.lambda.1", "finite"]),
    "seed-huge": (GOOD + "seed: 100000000000000000000000000000\n", ["recipe.yaml:15", "seed", "64 bits"]),
    "seed-negative-huge": (GOOD + "seed: -9999999999999999999999\n", ["recipe.yaml:15", "seed", "64 bits"]),
    "seed-hex-huge": (GOOD + "seed: 0xffffffffffffffffffff\n", ["recipe.yaml:15", "seed", "64 bits"]),
    "int-5000-digits": (edit("lambda: 0.3", "lambda: " + "9" * 5000), ["recipe.yaml:10", "steps.ta.params.lambda",
                                                                      "5000 characters"]),
    "seed-bool": (GOOD + "seed: yes\n", ["recipe.yaml:15", "seed", "boolean"]),
    "seed-float": (GOOD + "seed: 1.5\n", ["recipe.yaml:15", "seed"]),
    "fisher-examples-bool": (GOOD + "  fish: {kind: fisher, examples: true}\n", ["recipe.yaml:15", "steps.fish.examples",
                                                                             "boolean"]),
    "eval-limit-bool": (GOOD + "  ev: {kind: eval, merges: [ta], limit: on}\n", ["recipe.yaml:15", "steps.ev.limit", "boolean"]),
    "partition-bool": (GOOD + "data:\n  t: {path: d.jsonl, partition: {train: true}}\n",
                       ["recipe.yaml:16", "data.t.partition", "boolean"]),
    "partition-seed-bool": (GOOD + "data:\n  t: {path: d.jsonl, partition_seed: false}\n",
                            ["recipe.yaml:16", "data.t.partition_seed", "boolean"]),
    "allow-pickle-string": (GOOD + "allow_pickle: please\n", ["recipe.yaml:15", "allow_pickle"]),
    "version-2": (GOOD + "version: 2\n", ["recipe.yaml:15", "version"]),
    "missing-tensors-huge": (GOOD + f"missing_tensors: {HUGE}\n", ["recipe.yaml:15", "missing_tensors", "characters"]),
    "device-list": (GOOD + "device: [cpu, cuda]\n", ["recipe.yaml:15", "device"]),
    "name-huge-list": (GOOD + "name: [" + ", ".join(["x"] * 50_000) + "]\n", ["recipe.yaml:15", "name"]),
    "unknown-top-huge": (GOOD + "? " + HUGE + "\n: 1\n", ["recipe.yaml:15", "unknown key", "characters"]),
    "exclude-huge-bad-regex": (GOOD + f"exclude: ['({HUGE[:200_000]}']\n", ["recipe.yaml:15", "exclude", "regular expression"]),
    "model-path-huge": (edit("  c: zoo/task2", f"  c: zoo/{HUGE}"), ["recipe.yaml:5", "models.c"]),
    "step-name-huge": (GOOD + f"  ? '{'x' * 300_000}/'\n  : {{kind: merge, method: ties}}\n", ["recipe.yaml", "steps", "name"]),
    "kind-huge": (edit("kind: merge", f"kind: {HUGE}"), ["recipe.yaml:8", "steps.ta.kind", "unknown step kind"]),
    "nul-escape-in-path": (edit("base: zoo/base", 'base: "zoo/ba\\0se"'), ["recipe.yaml:1", "base", "NUL"]),
}


@pytest.mark.parametrize("text, mentions", VALUE_CASES.values(), ids=VALUE_CASES.keys())
def test_bad_values_are_refused(project, text, mentions):
    msg = refused(project, text, *mentions)
    assert "x" * 300 not in msg


# ------------------------------------------------------------------------------------------
# The schema: top-level keys, models, steps and their names

SCHEMA_CASES = {
    "unknown-top-level": (GOOD + "modles: {}\n", ["recipe.yaml:15", "modles", "did you mean 'models'"]),
    "unknown-top-level-far": (GOOD + "zzzz: 1\n", ["recipe.yaml:15", "zzzz", "unknown key", "known keys"]),
    "no-base": (edit("base: zoo/base\n", ""), ["base", "required key is missing"]),
    "base-int": (edit("base: zoo/base", "base: 5"), ["recipe.yaml:1", "base"]),
    "base-empty": (edit("base: zoo/base", "base: ''"), ["recipe.yaml:1", "base", "empty"]),
    "base-both": (edit("base: zoo/base", "base: {path: zoo/base, from_step: ta}"), ["recipe.yaml:1", "base"]),
    "base-empty-map": (edit("base: zoo/base", "base: {}"), ["recipe.yaml:1", "base"]),
    "base-name-too-long": (edit("base: zoo/base", "base: zoo/" + "n" * 300), ["recipe.yaml:1", "base", "cannot be a path"]),
    "models-list": (edit("  a: zoo/task0\n  b: zoo/task1\n  c: zoo/task2", "  - zoo/task0"), ["recipe.yaml:2", "models", "dictionary"]),
    "models-empty": (edit("  a: zoo/task0\n  b: zoo/task1\n  c: zoo/task2", "  {}"), ["models"]),
    "models-string": (edit("models:\n  a: zoo/task0\n  b: zoo/task1\n  c: zoo/task2", "models: zoo/task0"),
                      ["recipe.yaml:2", "models"]),
    "model-missing-dir": (edit("zoo/task2", "zoo/nope"), ["recipe.yaml:5", "models.c", "does not exist"]),
    "model-unknown-field": (edit("  c: zoo/task2", "  c: {path: zoo/task2, bogus: 1}"), ["recipe.yaml:5", "models.c.bogus"]),
    "model-name-slash": (edit("  c: zoo/task2", "  c/d: zoo/task2"), ["recipe.yaml:5", "models.c/d", "must start with"]),
    "model-unknown-data": (edit("  c: zoo/task2", "  c: {path: zoo/task2, data: nope}"), ["recipe.yaml:5", "models.c.data"]),
    "steps-list": (edit("  ta:\n", "  - ta:\n", GOOD.split("  ties:")[0]), ["recipe.yaml:6", "steps", "dictionary"]),
    "steps-empty": (GOOD.split("  ta:")[0] + "  {}\n", ["steps"]),
    "steps-null": (GOOD.split("  ta:")[0], ["recipe.yaml:6", "steps"]),
    "steps-scalar": (GOOD.split("steps:")[0] + "steps: 5\n", ["recipe.yaml:6", "steps"]),
    "step-scalar": (edit("  ties:\n    kind: merge\n    method: ties\n    params: {density: 0.5, lambda: 1.0}\n", "  ties: 5\n"),
                    ["recipe.yaml:11", "steps.ties"]),
    "step-no-kind": (edit("    kind: merge\n    method: ties", "    method: ties"), ["recipe.yaml:11", "steps.ties", "needs a 'kind'"]),
    "step-kind-list": (edit("kind: merge", "kind: [merge]"), ["recipe.yaml:8", "steps.ta.kind", "unknown step kind"]),
    "step-kind-map": (edit("kind: merge", "kind: {merge: 1}"), ["recipe.yaml:8", "steps.ta.kind", "unknown step kind"]),
    "step-kind-null": (edit("kind: merge", "kind: ~"), ["recipe.yaml:8", "steps.ta.kind", "unknown step kind"]),
    "step-kind-typo": (edit("kind: merge", "kind: merj"), ["recipe.yaml:8", "did you mean 'merge'"]),
    "step-name-slash": (edit("  ties:\n", "  a/b:\n"), ["recipe.yaml:11", "steps.a/b", "no '/'"]),
    "step-name-dotdot": (edit("  ties:\n", "  ../evil:\n"), ["recipe.yaml:11", "steps...", "must start with"]),
    "step-name-unicode": (edit("  ties:\n", "  tiés:\n"), ["recipe.yaml:11", "steps.tiés", "ASCII"]),
    "step-name-empty": (edit("  ties:\n", "  '':\n"), ["recipe.yaml:11", "steps.", "empty"]),
    "step-name-space": (edit("  ties:\n", "  'my ties':\n"), ["recipe.yaml:11", "steps.my ties", "spaces"]),
    "step-name-leading-dash": (edit("  ties:\n", "  -ties:\n"), ["recipe.yaml:11", "steps.-ties"]),
    "step-name-newline": (edit("  ties:\n", '  "ties\\n":\n'), ["recipe.yaml:11", "steps.ties\\n", "must start with"]),
    "data-name-slash": (GOOD + "data:\n  a/b: {path: d.jsonl}\n", ["recipe.yaml:16", "data.a/b", "rename it"]),
    "step-params-list": (edit("{lambda: 0.3}", "[0.3]"), ["recipe.yaml:10", "steps.ta.params"]),
    "step-params-null": (edit("{lambda: 0.3}", "~"), ["recipe.yaml:10", "steps.ta.params"]),
    "step-param-typo": (edit("density: 0.5", "densty: 0.5"), ["recipe.yaml:14", "steps.ties.params.densty",
                                                              "did you mean 'density'"]),
    "step-unknown-field": (edit("    method: task_arithmetic", "    method: task_arithmetic\n    colour: red"),
                           ["recipe.yaml:10", "steps.ta.colour", "unknown key"]),
    "step-unknown-method": (edit("method: ties", "method: tise"), ["recipe.yaml:13", "steps.ties.method"]),
    "step-unknown-model": (edit("    method: task_arithmetic", "    method: task_arithmetic\n    models: [a, zz]"),
                           ["recipe.yaml:10", "steps.ta.models", "no model named 'zz'"]),
    "step-models-string": (edit("    method: task_arithmetic", "    method: task_arithmetic\n    models: a"),
                           ["recipe.yaml:10", "steps.ta.models"]),
    "step-ref-unknown": (edit("    method: ties\n", "    method: ties\n    fisher: fsh\n"), ["recipe.yaml:14", "steps.ties.fisher"]),
    "lambda-string": (edit("lambda: 0.3", "lambda: lots"), ["recipe.yaml:10", "steps.ta.params.lambda", "'lots'"]),
    "density-out-of-range": (edit("density: 0.5", "density: 7"), ["recipe.yaml:14", "steps.ties.params", "density"]),
    "exclude-string": (GOOD + "exclude: '.*'\n", ["recipe.yaml:15", "exclude"]),
    "exclude-bad-regex": (GOOD + "exclude: ['(']\n", ["recipe.yaml:15", "exclude", "regular expression"]),
    "heads-int": (GOOD + "heads: 5\n", ["recipe.yaml:15", "heads"]),
    "data-scalar": (GOOD + "data:\n  t: 5\n", ["recipe.yaml:16", "data.t"]),
    "data-missing-file": (GOOD + "data:\n  t: {path: nope.jsonl}\n", ["recipe.yaml:16", "data.t.path", "does not exist"]),
    "data-empty-path": (GOOD + "data:\n  t: {path: ''}\n", ["recipe.yaml:16", "data.t.path", "empty"]),
    "data-split-name-too-long": (GOOD + "data:\n  t: {splits: {train: " + "f" * 300 + ".jsonl}}\n",
                                 ["recipe.yaml:16", "data.t.splits.train", "cannot be a path"]),
    "store-list": (GOOD + "store: [a]\n", ["recipe.yaml:15", "store"]),
    "model-is-a-file": (edit("  c: zoo/task2", "  c: recipe.yaml"), ["recipe.yaml:5", "models.c", "not a directory"]),
    "model-is-dev-zero": (edit("  c: zoo/task2", "  c: /dev/zero"), ["recipe.yaml:5", "models.c", "not a directory"]),
    "data-is-dev-zero": (GOOD + "data:\n  t: {path: /dev/zero}\n", ["recipe.yaml:16", "data.t.path", "not a regular file"]),
    "data-split-is-dev-null": (GOOD + "data:\n  t: {splits: {train: /dev/null}}\n",
                               ["recipe.yaml:16", "data.t.splits.train", "not a regular file"]),
    "too-many-values": (GOOD + "exclude: [" + ", ".join(["a"] * 100_001) + "]\n", ["recipe.yaml:15", "exclude.",
                                                                            "more than 100000 values"]),
    "max-variants-zero": (GOOD + "max_variants: 0\n", ["recipe.yaml:15", "max_variants"]),
    "max-variants-string": (GOOD + "max_variants: lots\n", ["recipe.yaml:15", "max_variants"]),
}


@pytest.mark.parametrize("text, mentions", SCHEMA_CASES.values(), ids=SCHEMA_CASES.keys())
def test_schema_mistakes_are_refused(project, text, mentions):
    refused(project, text, *mentions)


# ------------------------------------------------------------------------------------------
# Sweeps: keys, values, the size of the grid

SWEEP_CASES = {
    "sweep-list": ("sweep: [0.1, 0.2]\n", ["recipe.yaml:15", "sweep"]),
    "sweep-scalar-value": ("sweep:\n  ta.params.lambda: 0.5\n", ["recipe.yaml:16", "sweep.ta.params.lambda", "list"]),
    "sweep-map-value": ("sweep:\n  ta.params.lambda: {a: 1}\n", ["recipe.yaml:16", "sweep.ta.params.lambda", "list"]),
    "sweep-empty-list": ("sweep:\n  ta.params.lambda: []\n", ["recipe.yaml:16", "sweep.ta.params.lambda", "non-empty"]),
    "sweep-null": ("sweep:\n  ta.params.lambda:\n", ["recipe.yaml:16", "sweep.ta.params.lambda"]),
    "sweep-unknown-step": ("sweep:\n  tie.params.lambda: [0.1]\n", ["recipe.yaml:16", "no step 'tie'", "did you mean 'ties'"]),
    "sweep-step-only": ("sweep:\n  ta: [1, 2]\n", ["recipe.yaml:16", "sweep.ta", "must name a parameter"]),
    "sweep-kind": ("sweep:\n  ta.kind: [merge, eval]\n", ["recipe.yaml:16", "sweep.ta.kind", "kind"]),
    "sweep-empty-part": ("sweep:\n  ta..lambda: [0.1]\n", ["recipe.yaml:16", "empty part"]),
    "sweep-trailing-dot": ("sweep:\n  ta.params.: [0.1]\n", ["recipe.yaml:16", "empty part"]),
    "sweep-through-scalar": ("sweep:\n  ta.method.x: [1, 2]\n", ["recipe.yaml:16", "sweep.ta.method.x", "not a mapping"]),
    "sweep-through-list": ("sweep:\n  ta.params.lambda.x: [1, 2]\n", ["recipe.yaml:16", "'params.lambda' is 0.3"]),
    "sweep-unknown-param": ("sweep:\n  ta.params.lamda: [0.1, 0.2]\n", ["recipe.yaml", "lamda"]),
    "sweep-unknown-field": ("sweep:\n  ta.colour: [red, blue]\n", ["recipe.yaml", "colour", "unknown key"]),
    "sweep-bad-value": ("sweep:\n  ties.params.density: [0.5, 1.5]\n", ["recipe.yaml", "density"]),
    "sweep-duplicate-values": ("sweep:\n  ta.params.lambda: [0.1, 0.2, 0.1]\n", ["recipe.yaml:16", "sweep.ta.params.lambda",
                                                                              "0.1", "twice"]),
    "sweep-eval": ("  ev: {kind: eval, merges: [ta]}\nsweep:\n  ev.limit: [1, 2]\n", ["recipe.yaml:17", "eval steps are not swept"]),
    "grid-10^6-two-keys": (f"sweep:\n  ta.params.lambda: {GRID_1000}\n  ta.params.weight: {GRID_1000}\n",
                           ["recipe.yaml:15", "sweep", "more than 1000", "max_variants"]),
    "grid-10^6-three-keys": ("sweep:\n" + "".join(f"  ties.params.{k}: {GRID_100}\n" for k in
                                                  ("density", "lambda", "weight")), ["recipe.yaml:15", "more than 1000"]),
    "grid-10^6-six-keys": ("sweep:\n" + "".join(f"  ties.params.{k}: {GRID_10}\n" for k in
                                                ("density", "lambda", "weight")) +
                           "".join(f"  ties.{k}: {list(range(10))}\n" for k in ("seed",)) +
                           "".join(f"  ties.params.{k}: {v}\n" for k, v in (("merge", "[mean, sum, mean2, a, b, c, d, e, f, g]"),
                                                                            ("rule", "[exact, mergekit, r1, r2, r3, r4, r5, r6, r7, r8]"))),
                           ["recipe.yaml:15", "more than 1000"]),
    "grid-1001-one-key": ("sweep:\n  ta.params.lambda: [" + ", ".join(str(i) for i in range(1, 1002)) + "]\n",
                          ["recipe.yaml:15", "more than 1000", "1001"]),
    "grid-over-two-steps": (f"sweep:\n  ta.params.lambda: {GRID_600}\n  ties.params.lambda: {GRID_600}\n",
                            ["recipe.yaml:15", "more than 1000"]),
    "grid-over-own-limit": ("max_variants: 2\nsweep:\n  ta.params.lambda: [0.1, 0.2, 0.3]\n", ["recipe.yaml:16", "more than 2"]),
    "sweep-huge-value": (f"sweep:\n  ta.params.lambda: [0.1, '{'y' * 200_000}']\n", ["recipe.yaml", "lambda"]),
}


@pytest.mark.parametrize("tail, mentions", SWEEP_CASES.values(), ids=SWEEP_CASES.keys())
def test_bad_sweeps_are_refused(project, tail, mentions):
    msg = refused(project, GOOD + tail, *mentions)
    assert "y" * 300 not in msg


def test_a_grid_within_max_variants_is_accepted(project):
    (project / "recipe.yaml").write_text(GOOD + "max_variants: 3\nsweep:\n  ta.params.lambda: [0.1, 0.2, 0.3]\n")
    result = hostile.run(["validate", "recipe.yaml"], cwd=project)
    assert result.code == 0, result.err


# ------------------------------------------------------------------------------------------
# --set (through `status`, which takes --set and reads no store before the recipe is valid)

SET_CASES = {
    "no-equals": ("ta.params.lambda", ["--set", "STEP.PARAM=VALUE"]),
    "no-dot": ("lambda=0.3", ["--set", "STEP.PARAM=VALUE"]),
    "empty-key": ("=0.3", ["--set", "STEP.PARAM=VALUE"]),
    "empty-step": (".params.lambda=0.3", ["--set", "empty part"]),
    "empty-path": ("ta.=0.3", ["--set", "empty part"]),
    "trailing-dot": ("ta.params.=0.3", ["--set", "empty part"]),
    "double-dot": ("ta..lambda=0.3", ["--set", "empty part"]),
    "unknown-step": ("tie.params.lambda=0.3", ["--set", "no step 'tie'", "did you mean 'ties'"]),
    "kind-override": ("ta.kind=eval", ["--set", "must name a parameter"]),
    "kind-deep": ("ta.kind.x=1", ["--set", "must name a parameter"]),
    "through-string": ("ta.method.x=1", ["--set", "'method' is 'task_arithmetic' (a str)", "not a mapping"]),
    "through-float": ("ta.params.lambda.x=1", ["--set", "'params.lambda' is 0.3 (a float)"]),
    "invalid-yaml-bracket": ("ta.params.lambda=[", ["--set", "malformed YAML", "lists go in brackets"]),
    "invalid-yaml-brace": ("ta.params.lambda={a: 1", ["--set", "malformed YAML"]),
    "undefined-alias": ("ta.params.lambda=*x", ["--set", "undefined alias"]),
    "recursive-alias": ("ta.params.lambda=&a [*a]", ["--set", "contains it"]),
    "alias-bomb": ("ta.params.lambda=" + laughs().replace("\n", ", ").replace(": ", ": ").join(["{", "}"]),
                   ["--set", "more than 10000 nodes"]),
    "nan": ("ta.params.lambda=.nan", ["--set", "not a finite number"]),
    "inf-in-sweep": ("ta.params.lambda=0.1,.inf", ["--set", "not a finite number"]),
    "huge-int": ("ties.seed=" + "9" * 100, ["--set", "beyond 64 bits"]),
    "empty-value": ("ta.params.lambda=", ["--set", "gives no value"]),
    "python-tag": ("ta.params.lambda=!!python/object/apply:os.system ['true']", ["--set", "malformed YAML"]),
    "dup-key-in-value": ("ta.params.lambda={a: 1, a: 2}", ["--set", "twice"]),
    "bool-for-int": ("ties.seed=true", ["--set" if False else "steps.ties.seed", "boolean"]),
    "string-for-float": ("ta.params.lambda=lots", ["steps.ta.params.lambda", "'lots'"]),
    "huge-value": ("ta.params.lambda=" + "z" * 500_000, ["steps.ta.params.lambda", "characters"]),
    "huge-sweep": ("ta.params.lambda=" + ",".join(str(i) for i in range(1, 5001)), ["more than 1000", "max_variants"]),
    "huge-key": ("ta.params." + "k" * 100_000 + "=1", ["steps.ta.params"]),
}


@pytest.mark.parametrize("item, mentions", SET_CASES.values(), ids=SET_CASES.keys())
def test_bad_set_is_refused(project, item, mentions):
    msg = refused(project, GOOD, *mentions, command=("status",), extra=("--set", item))
    assert "z" * 300 not in msg and "k" * 300 not in msg


def test_set_given_twice_is_refused(project):
    refused(project, GOOD, "--set", "twice", command=("status",),
            extra=("--set", "ta.params.lambda=0.1", "--set", "ta.params.lambda=0.2"))


@pytest.mark.parametrize("text, mentions", [
    (edit("  ta:\n", "  - ta:\n", GOOD.split("  ties:")[0]), ["--set", "'steps' is [", "(a list)"]),
    (edit("  ties:\n    kind: merge\n    method: ties\n    params: {density: 0.5, lambda: 1.0}\n", "  ties: 5\n"),
     ["--set", "the step is 5 (an int)"]),
    (GOOD + "sweep: [1, 2]\n", ["--set", "'sweep'", "not a mapping"]),
], ids=["steps-a-list", "step-a-scalar", "sweep-a-list"])
def test_set_on_a_malformed_recipe_is_refused(project, text, mentions):
    item = "ties.params.lambda=0.5,0.7" if "sweep" in text else "ties.params.lambda=0.5"
    refused(project, text, *mentions, command=("status",), extra=("--set", item))


# ------------------------------------------------------------------------------------------
# mergekit configs (a recipe with `merge_method`)

MERGEKIT_CASES = {
    "models-mapping": (edit("models:\n  - model: zoo/task0\n    parameters: {weight: 0.5, density: 0.5}\n  - model: zoo/task1\n"
                            "    parameters: {weight: 0.5, density: 0.5}\n", "models: {a: zoo/task0}\n", MERGEKIT),
                       ["recipe.yaml:3", "models", "non-empty list"]),
    "models-string": (edit("models:\n  - model: zoo/task0\n    parameters: {weight: 0.5, density: 0.5}\n  - model: zoo/task1\n"
                           "    parameters: {weight: 0.5, density: 0.5}\n", "models: zoo/task0\n", MERGEKIT),
                      ["recipe.yaml:3", "models", "non-empty list"]),
    "models-empty": (edit("models:\n  - model: zoo/task0\n    parameters: {weight: 0.5, density: 0.5}\n  - model: zoo/task1\n"
                          "    parameters: {weight: 0.5, density: 0.5}\n", "models: []\n", MERGEKIT), ["recipe.yaml:3", "models"]),
    "entry-string": (edit("  - model: zoo/task1\n    parameters: {weight: 0.5, density: 0.5}\n", "  - zoo/task1\n", MERGEKIT),
                     ["recipe.yaml:6", "models.1", "needs 'model'"]),
    "entry-model-list": (edit("model: zoo/task1", "model: [zoo/task1]", MERGEKIT), ["recipe.yaml:6", "models.1.model",
                                                                                  "non-empty string"]),
    "entry-model-empty": (edit("model: zoo/task1", "model: ''", MERGEKIT), ["recipe.yaml:6", "models.1.model"]),
    "entry-unknown-key": (edit("  - model: zoo/task1\n", "  - model: zoo/task1\n    weight: 1\n", MERGEKIT),
                          ["recipe.yaml:7", "models.1.weight", "unknown key"]),
    "entry-parameters-string": (edit("    parameters: {weight: 0.5, density: 0.5}\nparameters", "    parameters: weight\nparameters",
                                     MERGEKIT), ["recipe.yaml:7", "models.1.parameters", "mapping"]),
    "entry-parameters-list": (edit("    parameters: {weight: 0.5, density: 0.5}\nparameters", "    parameters: [0.5]\nparameters",
                                   MERGEKIT), ["recipe.yaml:7", "models.1.parameters", "mapping"]),
    "parameters-string": (edit("parameters:\n  normalize: true\n", "parameters: normalize\n", MERGEKIT),
                          ["recipe.yaml:8", "parameters", "mapping"]),
    "parameters-list": (edit("parameters:\n  normalize: true\n", "parameters: [normalize]\n", MERGEKIT),
                        ["recipe.yaml:8", "parameters", "mapping"]),
    "method-unshared": (edit("merge_method: ties", "merge_method: sce", MERGEKIT), ["recipe.yaml:1", "merge_method", "sce"]),
    "method-typo": (edit("merge_method: ties", "merge_method: tiess", MERGEKIT), ["recipe.yaml:1", "did you mean 'ties'"]),
    "method-list": (edit("merge_method: ties", "merge_method: [ties]", MERGEKIT), ["recipe.yaml:1", "merge_method"]),
    "method-null": (edit("merge_method: ties", "merge_method:", MERGEKIT), ["recipe.yaml:1", "merge_method"]),
    "method-int": (edit("merge_method: ties", "merge_method: 5", MERGEKIT), ["recipe.yaml:1", "merge_method"]),
    "slices": (MERGEKIT + "slices: []\n", ["recipe.yaml:11", "slices", "not supported"]),
    "unknown-top-key": (MERGEKIT + "tokenizer: {}\n", ["recipe.yaml:11", "tokenizer"]),
    "unknown-top-key-typo": (MERGEKIT + "base_modle: zoo/base\n", ["recipe.yaml:11", "did you mean 'base_model'"]),
    "param-typo": (edit("weight: 0.5, density: 0.5}\n  - model: zoo/task1", "weight: 0.5, densty: 0.5}\n  - model: zoo/task1",
                        MERGEKIT), ["recipe.yaml:5", "models.0.parameters.densty", "did you mean 'density'"]),
    "global-param-per-model": (edit("weight: 0.5, density: 0.5}\n  - model: zoo/task1",
                                    "weight: 0.5, normalize: true}\n  - model: zoo/task1", MERGEKIT),
                               ["recipe.yaml:5", "models.0.parameters.normalize", "top-level"]),
    "weight-string": (edit("weight: 0.5, density: 0.5}\nparameters", "weight: heavy, density: 0.5}\nparameters", MERGEKIT),
                      ["recipe.yaml:7", "models.1.parameters.weight", "'heavy'"]),
    "weight-bool": (edit("weight: 0.5, density: 0.5}\nparameters", "weight: true, density: 0.5}\nparameters", MERGEKIT),
                    ["recipe.yaml:7", "models.1.parameters.weight"]),
    "weight-huge-string": (edit("weight: 0.5, density: 0.5}\nparameters", f"weight: {HUGE}, density: 0.5}}\nparameters",
                                MERGEKIT), ["recipe.yaml:7", "weight", "characters"]),
    "density-nan": (edit("density: 0.5}\nparameters", "density: .nan}\nparameters", MERGEKIT), ["recipe.yaml:7", "finite"]),
    "normalize-string": (edit("normalize: true", "normalize: perhaps", MERGEKIT), ["recipe.yaml:9", "normalize",
                                                                                 "true or false"]),
    "filter-without-value": (edit("weight: 0.5, density: 0.5}\nparameters", "weight: [{filter: mlp}], density: 0.5}\nparameters",
                                  MERGEKIT), ["recipe.yaml:7", "models.1.parameters.weight", "'value' is missing"]),
    "base-missing-dir": (edit("base_model: zoo/base", "base_model: zoo/nope", MERGEKIT), ["recipe.yaml:2", "base_model",
                                                                                        "does not exist"]),
    "base-list": (edit("base_model: zoo/base", "base_model: [zoo/base]", MERGEKIT), ["recipe.yaml:2", "base_model"]),
    "base-name-too-long": (edit("base_model: zoo/base", "base_model: " + "b" * 300, MERGEKIT), ["recipe.yaml:2", "base_model"]),
    "no-base": (edit("base_model: zoo/base\n", "", MERGEKIT), ["recipe.yaml", "needs 'base_model'"]),
    "lora": (edit("model: zoo/task1", "model: zoo/task1+zoo/lora", MERGEKIT), ["recipe.yaml:6", "LoRA"]),
    "tokenizer-union": (MERGEKIT + "tokenizer_source: union\n", ["recipe.yaml:11", "tokenizer_source"]),
    "dtype-bogus": (edit("dtype: float32", "dtype: float7", MERGEKIT), ["float7"]),
}


@pytest.mark.parametrize("text, mentions", MERGEKIT_CASES.values(), ids=MERGEKIT_CASES.keys())
def test_bad_mergekit_config_is_refused(project, text, mentions):
    msg = refused(project, text, *mentions)
    assert "x" * 300 not in msg


def test_the_mergekit_config_validates(project):
    (project / "recipe.yaml").write_text(MERGEKIT)
    result = hostile.run(["validate", "recipe.yaml"], cwd=project)
    assert result.code == 0, result.err


# ------------------------------------------------------------------------------------------
# What must stay accepted: a UTF-8 byte-order mark, small anchors and merge keys, quoted keys

@pytest.mark.parametrize("content", [
    b"\xef\xbb\xbf" + GOOD.encode(),
    ("defaults: &m {kind: merge}\n" + GOOD).replace("defaults: &m {kind: merge}\n", "")
    .replace("  ta:\n    kind: merge\n", "  ta: &t\n    kind: merge\n") + "  ta2:\n    <<: *t\n    method: ties\n",
    edit("  c: zoo/task2", "  '3': zoo/task2").encode(),
    edit("lambda: 0.3", "lambda: [0.3, 0.2, 0.1]").encode(),
], ids=["utf8-bom", "anchor-and-merge-key", "quoted-numeric-key", "list-param"])
def test_legitimate_recipes_still_validate(project, content):
    path = project / "recipe.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = hostile.run(["validate", "recipe.yaml"], cwd=project)
    assert result.code == 0, result.err
