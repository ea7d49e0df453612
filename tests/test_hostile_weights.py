"""Hostile weights, tensor names, values and devices (issue 13, round 2): every case goes through
the real CLI (`fmerge merge ...`), must exit 2 with one paragraph naming the file, tensor or option
at fault, print no traceback, finish quickly, and leave the inputs and the store as they were.

One tiny zoo is built per module; hostile models are crafted by writing raw safetensors bytes
(8-byte length, JSON header, data) or by re-saving the zoo's tensors with one thing changed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hostile
from conftest import make_zoo

pytestmark = pytest.mark.timeout(600, func_only=True)  # a hang guard only (the module's zoo is built once, untimed)

EVIL = "evil"  # the directory name of the crafted model, so its label in messages
MERGED = "encoder.layer.0.attention.self.query.weight"  # a tensor every model merges (base naming)
IN_MODEL = "bert." + MERGED  # its name in the fine-tuned models
HEAD = "classifier.weight"  # a task head: exported per model, never merged


# ------------------------------------------------------------------------------------------------
# The zoo, the store, and running one case


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_weights")
    zoo = make_zoo(root / "zoo", n_models=2)
    store = root / "store"
    ok = hostile.run(["merge", "--method", "simple_average", "--base", zoo["base"], "--model", zoo["task0"],
                      "--model", zoo["task1"], "--out", root / "good", "--store", store], cwd=root)
    assert ok.code == 0, ok.err
    return {"root": root, "zoo": zoo, "store": store,
            "tensors": load_file(zoo["task1"] / "model.safetensors"),
            "base_tensors": load_file(zoo["base"] / "model.safetensors")}


def store_state(store: Path) -> dict:
    """The store's artifacts, temporary builds, quarantine and marker; its caches (model hashes by
    file stamp) and lock files may change when a refused run has hashed a model."""
    return {p: v for p, v in hostile.snapshot(store).items()
            if not any(part in ("cache", "locks") for part in Path(p).relative_to(store).parts)}


def refused(world, tmp_path, args: list, *mentions: str, inputs: list[Path] = (), env: dict | None = None,
            out: Path | None = None) -> str:
    """Run `fmerge ARGS`; check the refusal (exit 2, one paragraph naming `mentions`), that the inputs
    and the store are unchanged and that no export appeared."""
    inputs = [world["zoo"]["base"], world["zoo"]["task0"], *inputs]
    before, store_before = hostile.snapshot(*inputs), store_state(world["store"])
    result = hostile.run(args, cwd=tmp_path, env=env)
    assert "Traceback" not in result.err + result.out, result.err
    # A refusal in the middle of a merge follows the merge's progress lines on stderr: the error is
    # the paragraph from 'error:' on.
    lines = result.err.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), 0)
    message = hostile.assert_refused(hostile.Result(result.code, result.out, "\n".join(lines[start:])), *mentions)
    assert hostile.snapshot(*inputs) == before, "a refused command changed its inputs"
    assert store_state(world["store"]) == store_before, "a refused command changed the store"
    if out is not None:
        assert not os.path.lexists(out), f"a refused command left {out}"
    return message


def merge_args(world, tmp_path, model: Path, *extra, method: str = "simple_average", base: Path | None = None):
    return ["merge", "--method", method, "--base", base or world["zoo"]["base"], "--model", world["zoo"]["task0"],
            "--model", model, "--out", tmp_path / "out", "--store", world["store"], *extra]


def refuse_model(world, tmp_path, model: Path, *mentions: str, extra=(), method="simple_average", base=None):
    return refused(world, tmp_path, merge_args(world, tmp_path, model, *extra, method=method, base=base),
                   *mentions, inputs=[model], out=tmp_path / "out")


def evil_dir(world, tmp_path: Path, name: str = EVIL) -> Path:
    d = tmp_path / name
    d.mkdir()
    shutil.copy(world["zoo"]["task1"] / "config.json", d / "config.json")
    return d


# ------------------------------------------------------------------------------------------------
# Raw safetensors files


def st(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: little-endian u64 header length, the header (a dict as JSON, or raw
    bytes/str), then the data."""
    raw = header if isinstance(header, bytes) else header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


W = {"w": entry()}  # one float32 tensor of 2 values: 8 bytes of data
DATA = struct.pack("<2f", 1.0, 2.0)
DEEP = 100_000


def field(key, value):
    """A header whose tensor 'w' has `key` set to `value` (None: the key left out)."""
    e = entry()
    if value is None:
        del e[key]
    else:
        e[key] = value
    return {"w": e}


HEADERS = {
    # the file is too short, or its length field lies
    "empty-file": b"",
    "three-bytes": b"abc",
    "seven-bytes": b"\x08\x00\x00\x00\x00\x00\x00",
    "length-2^63": st(W, DATA, length=2**63),
    "length-2^64-1": st(W, DATA, length=2**64 - 1),
    "length-past-file": st(W, DATA, length=len(json.dumps(W)) + len(DATA) + 1),
    "length-zero": st(W, DATA, length=0),
    "length-cuts-json": st(W, DATA, length=10),
    # the header is not a JSON object
    "not-utf8": st(b"\xff\xfe{}"),
    "not-json": st("{not json"),
    "json-list": st("[]"),
    "json-list-of-entries": st(json.dumps([W])),
    "json-string": st('"w"'),
    "json-number": st("42"),
    "json-null": st("null"),
    "json-true": st("true"),
    "utf8-bom": st(b"\xef\xbb\xbf" + json.dumps(W).encode(), DATA),
    "deep-arrays": st("[" * DEEP + "]" * DEEP),
    "deep-objects": st('{"a":' * DEEP + "1" + "}" * DEEP),
    "deep-in-entry": st('{"w": {"dtype": ' + "[" * DEEP + "]" * DEEP + ', "shape": [2], "data_offsets": [0, 8]}}', DATA),
    "huge-number": st('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 8]}}', DATA),
    "duplicate-tensor": st('{"w": %s, "w": %s}' % (json.dumps(entry()), json.dumps(entry())), DATA),
    "duplicate-field": st('{"w": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}', DATA),
    # an entry that is not {dtype, shape, data_offsets}
    "entry-number": st({"w": 5}, DATA),
    "entry-list": st({"w": ["F32", [2], [0, 8]]}, DATA),
    "entry-null": st({"w": None}, DATA),
    "entry-empty": st({"w": {}}, DATA),
    "no-dtype": st(field("dtype", None), DATA),
    "no-shape": st(field("shape", None), DATA),
    "no-offsets": st(field("data_offsets", None), DATA),
    # dtypes
    "dtype-number": st(field("dtype", 5), DATA),
    "dtype-null": st('{"w": {"dtype": null, "shape": [2], "data_offsets": [0, 8]}}', DATA),
    "dtype-F128": st(field("dtype", "F128"), DATA),
    "dtype-lowercase": st(field("dtype", "float32"), DATA),
    "dtype-empty": st(field("dtype", ""), DATA),
    "dtype-F8": st(field("dtype", "F8_E4M3"), DATA),
    "dtype-U64": st(field("dtype", "U64"), DATA),
    "dtype-long": st(field("dtype", "F" * 10_000), DATA),
    # shapes
    "shape-string": st(field("shape", "2"), DATA),
    "shape-number": st(field("shape", 2), DATA),
    "shape-object": st(field("shape", {"0": 2}), DATA),
    "shape-negative": st(field("shape", [-2]), DATA),
    "shape-negative-pair": st(field("shape", [-1, -2]), DATA),
    "shape-float": st(field("shape", [2.0]), DATA),
    "shape-bool": st(field("shape", [True, True]), DATA),
    "shape-string-dim": st(field("shape", ["2"]), DATA),
    "shape-nested": st(field("shape", [[2]]), DATA),
    "shape-null-dim": st(field("shape", [None]), DATA),
    "shape-65-dims": st(field("shape", [1] * 65), DATA),
    "shape-huge-tiny-file": st(field("shape", [2**40, 2**40]), DATA),
    "shape-overflows-int64": st(field("shape", [2**62, 2**62, 2**62]), DATA),
    "shape-1000-digits": st('{"w": {"dtype": "F32", "shape": [' + "9" * 1000 + '], "data_offsets": [0, 8]}}', DATA),
    "shape-0-dim-8-bytes": st(field("shape", []), DATA),
    "shape-too-small": st(field("shape", [3]), DATA),
    "shape-zero-with-bytes": st(field("shape", [0, 2]), DATA),
    # data offsets
    "offsets-strings": st(field("data_offsets", ["0", "8"]), DATA),
    "offsets-floats": st(field("data_offsets", [0.0, 8.0]), DATA),
    "offsets-bools": st(field("data_offsets", [False, True]), DATA),
    "offsets-one": st(field("data_offsets", [0]), DATA),
    "offsets-three": st(field("data_offsets", [0, 8, 16]), DATA),
    "offsets-string": st(field("data_offsets", "0-8"), DATA),
    "offsets-object": st(field("data_offsets", {"begin": 0, "end": 8}), DATA),
    "offsets-null-end": st(field("data_offsets", [0, None]), DATA),
    "offsets-nan": st('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [NaN, 8]}}', DATA),
    "offsets-infinity": st('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, Infinity]}}', DATA),
    "offsets-negative": st(field("data_offsets", [-8, 0]), DATA),
    "offsets-reversed": st(field("data_offsets", [8, 0]), DATA),
    "offsets-past-end": st(field("data_offsets", [0, 16]), DATA),
    "offsets-2^64": st(field("data_offsets", [0, 2**64]), DATA),
    "offsets-both-past-end": st(field("data_offsets", [100, 108]), DATA),
    "truncated-data": st(W, DATA[:5]),
    "overlap": st({"w": entry(offsets=(0, 8)), "v": entry(offsets=(4, 12))}, DATA + DATA[:4]),
    "aliased": st({"w": entry(offsets=(0, 8)), "v": entry(offsets=(0, 8))}, DATA),
    "gap": st({"w": entry(offsets=(0, 8)), "v": entry(offsets=(16, 24))}, DATA * 3),
    "gap-at-start": st({"w": entry(offsets=(8, 16))}, DATA * 2),
    "trailing-bytes": st(W, DATA + b"\x00" * 4),
    # __metadata__
    "metadata-list": st({"__metadata__": ["format", "pt"], **W}, DATA),
    "metadata-string": st({"__metadata__": "pt", **W}, DATA),
    "metadata-null": st({"__metadata__": None, **W}, DATA),
    "metadata-number-value": st({"__metadata__": {"format": 1}, **W}, DATA),
    "metadata-object-value": st({"__metadata__": {"format": {"a": "b"}}, **W}, DATA),
    "metadata-null-value": st({"__metadata__": {"format": None}, **W}, DATA),
}

# What each message must say beyond the model and the file (which every case checks).
HEADER_SAYS = {
    "empty-file": "0 byte(s) long", "three-bytes": "3 byte(s) long", "seven-bytes": "7 byte(s) long",
    "length-2^63": f"header length of {2**63} bytes", "length-2^64-1": f"header length of {2**64 - 1} bytes",
    "length-past-file": "bytes follow", "length-zero": "not valid JSON", "length-cuts-json": "not valid JSON",
    "not-utf8": "not UTF-8", "not-json": "not valid JSON", "json-list": "JSON array",
    "json-list-of-entries": "JSON array", "json-string": "JSON string", "json-number": "JSON number",
    "json-null": "JSON null", "json-true": "JSON boolean", "utf8-bom": "not valid JSON",
    "deep-arrays": "nests JSON deeper", "deep-objects": "nests JSON deeper", "deep-in-entry": "nests JSON deeper",
    "huge-number": "not valid JSON", "duplicate-tensor": "names the key 'w' twice",
    "duplicate-field": "names the key 'dtype' twice",
    "entry-number": "tensor 'w' is described by a JSON number", "entry-list": "tensor 'w' is described by a JSON array",
    "entry-null": "tensor 'w' is described by a JSON null", "entry-empty": "no dtype and no shape and no data_offsets",
    "no-dtype": "tensor 'w' has no dtype", "no-shape": "tensor 'w' has no shape",
    "no-offsets": "tensor 'w' has no data_offsets",
    "dtype-number": "dtype 5", "dtype-null": "dtype None", "dtype-F128": "dtype 'F128'",
    "dtype-lowercase": "dtype 'float32'", "dtype-empty": "dtype ''", "dtype-F8": "dtype 'F8_E4M3'",
    "dtype-U64": "dtype 'U64'", "dtype-long": "characters)",
    "shape-string": "shape '2'", "shape-number": "shape 2", "shape-object": "shape {'0': 2}",
    "shape-negative": "negative dimension", "shape-negative-pair": "negative dimension",
    "shape-float": "shape [2.0]", "shape-bool": "shape [True, True]", "shape-string-dim": "shape ['2']",
    "shape-nested": "shape [[2]]", "shape-null-dim": "shape [None]", "shape-65-dims": "at most 64",
    "shape-huge-tiny-file": f"takes {2**80 * 4} bytes", "shape-overflows-int64": "8 bytes of data",
    "shape-1000-digits": "8 bytes of data", "shape-0-dim-8-bytes": "shape [] of F32 takes 4 bytes",
    "shape-too-small": "shape [3] of F32 takes 12 bytes", "shape-zero-with-bytes": "takes 0 bytes",
    "offsets-strings": "data_offsets ['0', '8']", "offsets-floats": "data_offsets [0.0, 8.0]",
    "offsets-bools": "data_offsets [False, True]", "offsets-one": "data_offsets [0]",
    "offsets-three": "data_offsets [0, 8, 16]", "offsets-string": "data_offsets '0-8'",
    "offsets-object": "data_offsets {'begin'", "offsets-null-end": "data_offsets [0, None]",
    "offsets-nan": "data_offsets [nan, 8]", "offsets-infinity": "data_offsets [0, inf]",
    "offsets-negative": "data_offsets [-8, 0]", "offsets-reversed": "data_offsets [8, 0]",
    "offsets-past-end": "within the 8 bytes of data", "offsets-2^64": "within the 8 bytes",
    "offsets-both-past-end": "[100, 108]", "truncated-data": "within the 5 bytes of data",
    "overlap": "tensor 'v' (bytes 4 to 12) overlaps that of tensor 'w'", "aliased": "overlaps",
    "gap": "bytes 8 to 16 of its data belong to no tensor", "gap-at-start": "bytes 0 to 8",
    "trailing-bytes": "last 4 bytes of its data belong to no tensor",
    "metadata-list": "__metadata__ must map strings to strings, but it is a JSON array",
    "metadata-string": "it is a JSON string", "metadata-null": "it is a JSON null",
    "metadata-number-value": "'format' maps to a JSON number", "metadata-object-value": "'format' maps to a JSON object",
    "metadata-null-value": "'format' maps to a JSON null",
}
assert set(HEADER_SAYS) == set(HEADERS)


@pytest.mark.parametrize("case", list(HEADERS))
def test_bad_safetensors_file_is_refused(world, tmp_path, case):
    d = evil_dir(world, tmp_path)
    (d / "model.safetensors").write_bytes(HEADERS[case])
    refuse_model(world, tmp_path, d, f"Model '{EVIL}'", f"{d / 'model.safetensors'} is not a readable safetensors file",
                 HEADER_SAYS[case])


def test_header_over_100_mb_is_refused_without_reading_it(world, tmp_path):
    d = evil_dir(world, tmp_path)
    length = 150 * 2**20
    with open(d / "model.safetensors", "wb") as fh:  # sparse: the 150 MB cost nothing
        fh.write(struct.pack("<Q", length))
        fh.truncate(8 + length)
    refuse_model(world, tmp_path, d, f"Model '{EVIL}'", "at most 100 MB", str(length))


def test_an_unbroken_header_with_metadata_zero_size_and_0_dim_tensors_is_read(world, tmp_path):
    """The checks refuse nothing a safetensors library writes: metadata, [0]-shaped and 0-dim tensors."""
    from fmerge.io import ModelDir

    d = evil_dir(world, tmp_path, "fine")
    save_file({"a": torch.zeros(0, 3), "b": torch.tensor(2.5), "c": torch.ones(2, dtype=torch.bfloat16),
               "d": torch.zeros(0)}, str(d / "model.safetensors"), metadata={"format": "pt"})
    m = ModelDir(d, label="fine")
    assert m.shape("a") == (0, 3) and m.get("b").item() == 2.5 and m.get("c").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Tensor names: they become paths in the store (weights/<name>)


NAMES = {
    "dot-dot": ("..", "'..'"),
    "dot": (".", "'.'"),
    "empty": ("", "name '' in"),
    "nul": ("a\x00b", "U+0000"),
    "newline": ("a\nb", "U+000A"),
    "del": ("a\x7fb", "U+007F"),
    "slash": ("a/b", "path separator"),
    "leading-slash": ("/etc/passwd", "path separator"),
    "climbing": ("../../outside", "path separator"),
    "backslash": ("a\\b", "path separator"),
    "zarr-json": ("zarr.json", "reserved"),
    "long": ("x" * 300, "300 bytes long"),
    "long-utf8": ("é" * 200, "400 bytes long"),
}


def write_named(d: Path, names: list[str]) -> None:
    header = {n: entry(offsets=(8 * i, 8 * i + 8)) for i, n in enumerate(names)}
    (d / "model.safetensors").write_bytes(st(header, DATA * len(names)))


@pytest.mark.parametrize("case", list(NAMES))
def test_unstorable_tensor_name_is_refused(world, tmp_path, case):
    name, says = NAMES[case]
    d = evil_dir(world, tmp_path)
    write_named(d, ["ok.weight", name])
    refuse_model(world, tmp_path, d, f"Model '{EVIL}'", "model.safetensors", says, "must be 1 to 255 bytes")


def test_a_name_beside_a_name_nested_under_it_is_refused(world, tmp_path):
    """`a` and `a/b` would be an array and a group at the same path of the store."""
    d = evil_dir(world, tmp_path)
    write_named(d, ["a", "a/b"])
    refuse_model(world, tmp_path, d, f"Model '{EVIL}'", "'a/b'", "path separator")


def test_a_lone_surrogate_in_a_name_is_refused(world, tmp_path):
    d = evil_dir(world, tmp_path)
    (d / "model.safetensors").write_bytes(st('{"\\ud800x": %s}' % json.dumps(entry()), DATA))
    refuse_model(world, tmp_path, d, f"Model '{EVIL}'", "not valid Unicode text")


def test_names_of_the_base_are_checked_too(world, tmp_path):
    d = evil_dir(world, tmp_path, "badbase")
    write_named(d, ["../escape"])
    refused(world, tmp_path, merge_args(world, tmp_path, world["zoo"]["task1"], base=d), "Model 'base'",
            "'../escape'", inputs=[d], out=tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Weight files that are not regular files: never opened (a FIFO would block forever)


def link_to(target):
    def make(d: Path) -> None:
        os.symlink(target(d) if callable(target) else target, d / "model.safetensors")
    return make


NOT_FILES = {
    "directory": (lambda d: (d / "model.safetensors").mkdir(), "is a directory"),
    "fifo": (lambda d: os.mkfifo(d / "model.safetensors"), "is a named pipe (FIFO)"),
    "link-to-dev-zero": (link_to("/dev/zero"), "is a device (through the link to /dev/zero)"),
    "dangling-link": (link_to("nowhere.safetensors"), "symbolic link to nowhere.safetensors, which does not exist"),
    "link-loop": (link_to("model.safetensors"), "cannot be examined"),
    "link-to-directory": (link_to(lambda d: d.parent), "is a directory (through the link"),
}


@pytest.mark.parametrize("case", list(NOT_FILES))
def test_weight_file_that_is_not_a_regular_file_is_refused(world, tmp_path, case):
    make, says = NOT_FILES[case]
    d = evil_dir(world, tmp_path)
    make(d)
    refuse_model(world, tmp_path, d, f"Model '{EVIL}'", "model.safetensors", says)


def test_a_link_to_a_weight_file_outside_the_directory_is_followed(world, tmp_path):
    """The hub's cache links snapshots/<rev>/model.safetensors to ../../blobs/<sha>: links are followed."""
    d = evil_dir(world, tmp_path, "linked")
    os.symlink(world["zoo"]["task1"] / "model.safetensors", d / "model.safetensors")
    r = hostile.run(merge_args(world, tmp_path, d), cwd=tmp_path)
    assert r.code == 0, r.err


# ------------------------------------------------------------------------------------------------
# Directories: pickles, indexes, shards


def save_pickle(d: Path, obj, name: str = "pytorch_model.bin") -> None:
    torch.save(obj, d / name)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/fmerge-hostile-pwned",))


def shard_into(world, d: Path, names_of: dict[str, list[str]], index: dict | str | None = None) -> None:
    t = world["tensors"]
    for fname, names in names_of.items():
        save_file({n: t[n] for n in names}, str(d / fname))
    if index is not None:
        (d / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))


def halves(world):
    names = sorted(world["tensors"])
    return names[: len(names) // 2], names[len(names) // 2:]


def index_of(world, mapping=None, **changes):
    first, second = halves(world)
    wm = {n: "model-00001-of-00002.safetensors" for n in first} | {n: "model-00002-of-00002.safetensors" for n in second}
    wm.update(changes)
    return {"metadata": {"total_size": 0}, "weight_map": mapping if mapping is not None else wm}


FIRST = "bert.embeddings.LayerNorm.bias"  # the first name in order: in the first of two shards


def two_shards(world, d, index):
    first, second = halves(world)
    shard_into(world, d, {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}, index)


DIRS = {
    "empty-dir": (lambda w, d: None, [], "no weights in"),
    "pickle-without-allow": (lambda w, d: save_pickle(d, dict(w["tensors"])), [], "only pickle checkpoints"),
    "pickle-with-code": (lambda w, d: save_pickle(d, {"w": torch.ones(2), "x": _Payload()}), ["--allow-pickle"],
                         "weights-only loader"),
    "pickle-garbage": (lambda w, d: (d / "pytorch_model.bin").write_bytes(b"\x80\x04garbage" * 10), ["--allow-pickle"],
                       "weights-only loader"),
    "pickle-empty": (lambda w, d: (d / "pytorch_model.bin").write_bytes(b""), ["--allow-pickle"], "weights-only loader"),
    "pickle-list": (lambda w, d: save_pickle(d, [torch.ones(2)]), ["--allow-pickle"], "not a state dict of tensors"),
    "pickle-int-values": (lambda w, d: save_pickle(d, {"w": 3}), ["--allow-pickle"], "not a state dict of tensors"),
    "pickle-int-key": (lambda w, d: save_pickle(d, {**w["tensors"], 7: torch.ones(2)}), ["--allow-pickle"],
                       "is a int, not a string"),
    "pickle-climbing-name": (lambda w, d: save_pickle(d, {**w["tensors"], "../x": torch.ones(2)}), ["--allow-pickle"],
                             "'../x'"),
    "pickle-complex": (lambda w, d: save_pickle(d, {**w["tensors"], "z": torch.ones(2, dtype=torch.complex64)}),
                       ["--allow-pickle"], "of dtype torch.complex64"),
    "pickle-sparse": (lambda w, d: save_pickle(d, {**w["tensors"], "s": torch.eye(2).to_sparse()}),
                      ["--allow-pickle"], "sparse_coo"),
    "pickle-fifo": (lambda w, d: os.mkfifo(d / "pytorch_model.bin"), ["--allow-pickle"], "named pipe"),
    "index-climbs-out": (lambda w, d: two_shards(w, d, index_of(w, **{IN_MODEL: "../x.safetensors"})), [],
                         "must map tensor names to shard file names", "'../x.safetensors'"),
    "index-absolute": (lambda w, d: two_shards(w, d, index_of(w, **{IN_MODEL: "/etc/passwd"})), [], "'/etc/passwd'"),
    "index-names-config": (lambda w, d: two_shards(w, d, index_of(w, **{IN_MODEL: "config.json"})), [], "'config.json'"),
    "index-value-number": (lambda w, d: two_shards(w, d, index_of(w, **{IN_MODEL: 3})), [], "to 3."),
    "index-map-list": (lambda w, d: two_shards(w, d, index_of(w, mapping=["a"])), [], "is a JSON array"),
    "index-json-list": (lambda w, d: two_shards(w, d, "[]"), [], "not a readable shard index"),
    "index-no-weight-map": (lambda w, d: two_shards(w, d, {"metadata": {}}), [], "KeyError"),
    "index-not-json": (lambda w, d: two_shards(w, d, "{weight_map"), [], "not a readable shard index"),
    "index-deep": (lambda w, d: two_shards(w, d, "[" * DEEP + "]" * DEEP), [], "nests deeper"),
    "index-missing-shard": (lambda w, d: shard_into(w, d, {"model-00001-of-00002.safetensors": halves(w)[0]},
                                                    index_of(w)), [], "missing from", "model-00002-of-00002"),
    "index-wrong-shard": (lambda w, d: two_shards(w, d, index_of(w, **{FIRST: "model-00002-of-00002.safetensors"})),
                          [], "disagree", f"'{FIRST}' (index: model-00002-of-00002.safetensors, found in model-00001"),
    "duplicate-across-shards": (lambda w, d: shard_into(w, d, {"model-00001-of-00002.safetensors": halves(w)[0],
                                                               "model-00002-of-00002.safetensors": halves(w)[1] + [FIRST]}),
                                [], f"'{FIRST}' is in two weight files"),
    "shards-of-two-saves": (lambda w, d: shard_into(w, d, {"model-00001-of-00002.safetensors": halves(w)[0],
                                                           "model-00002-of-00003.safetensors": halves(w)[1]}),
                            [], "mixes shards of different saves"),
    "two-indexes": (lambda w, d: (two_shards(w, d, index_of(w)),
                                  (d / "pytorch_model.safetensors.index.json").write_text(json.dumps(index_of(w)))),
                    [], "2 index files"),
}


@pytest.mark.parametrize("case", list(DIRS))
def test_bad_model_directory_is_refused(world, tmp_path, case):
    make, extra, *says = DIRS[case]
    d = evil_dir(world, tmp_path)
    make(world, d)
    refuse_model(world, tmp_path, d, f"Model '{EVIL}'", *says, extra=extra)
    assert not Path("/tmp/fmerge-hostile-pwned").exists()


def test_huge_index_is_refused_unread(world, tmp_path):
    d = evil_dir(world, tmp_path)
    two_shards(world, d, None)
    with open(d / "model.safetensors.index.json", "wb") as fh:  # sparse
        fh.truncate(150 * 2**20)
    refuse_model(world, tmp_path, d, f"Model '{EVIL}'", "more than the 100 MB")


@pytest.mark.parametrize("case", ["missing", "a-file"])
def test_model_path_that_is_no_directory_is_refused(world, tmp_path, case):
    d = tmp_path / EVIL
    if case == "a-file":
        d.write_bytes(b"not a directory")
    refused(world, tmp_path, merge_args(world, tmp_path, d), EVIL, inputs=[d], out=tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Values: non-finite weights and heads, integer tensors, shapes that differ


def resaved(world, tmp_path, change, name: str = EVIL, source: str = "tensors") -> Path:
    d = evil_dir(world, tmp_path, name)
    t = {k: v.clone() for k, v in world[source].items()}
    change(t)
    save_file(t, str(d / "model.safetensors"))
    return d


def setter(name, value, index=0):
    def change(t):
        t[name].view(-1)[index] = value
    return change


def retype(name, dtype):
    def change(t):
        t[name] = (t[name] * 100).to(dtype)
    return change


def reshape(name, shape):
    def change(t):
        t[name] = torch.zeros(shape)
    return change


def drop(name):
    def change(t):
        del t[name]
    return change


VALUES = {
    "nan-in-merged": (setter(IN_MODEL, float("nan")), f"Tensor '{IN_MODEL}' of model '{EVIL}' holds 1 NaN or Inf"),
    "inf-in-merged": (setter(IN_MODEL, float("inf"), 5), f"'{IN_MODEL}' of model '{EVIL}' holds 1 NaN"),
    "minus-inf-in-merged": (setter("bert.pooler.dense.bias", float("-inf")), "'bert.pooler.dense.bias' of model"),
    "all-nan": (lambda t: t["bert.embeddings.LayerNorm.weight"].fill_(float("nan")), "holds 16 NaN or Inf"),
    "nan-in-head": (setter(HEAD, float("nan")), f"Tensor '{HEAD}' of model '{EVIL}'", f"heads/{EVIL}.safetensors"),
    "inf-in-head-bias": (setter("classifier.bias", float("inf")), "'classifier.bias' of model", "will not export it"),
    "int64-where-float": (retype(IN_MODEL, torch.int64), f"'{MERGED}' is float32 in the base but int64 in model '{EVIL}'"),
    "int8-where-float": (retype(IN_MODEL, torch.int8), "int8 in model"),
    "bool-where-float": (retype(IN_MODEL, torch.bool), "bool in model"),
    "uint8-where-float": (retype("bert.pooler.dense.bias", torch.uint8), "uint8 in model"),
    "transposed": (reshape("bert.encoder.layer.0.output.dense.weight", (32, 16)), "Tensor shapes differ",
                   "[16, 32] in the base but [32, 16] in evil"),
    "0-dim-for-vector": (reshape("bert.pooler.dense.bias", ()), "'pooler.dense.bias' is [16] in the base but [] in evil"),
    "vocab-grown": (reshape("bert.embeddings.word_embeddings.weight", (65, 16)), "vocabulary-size mismatch"),
    "empty-tensor": (reshape("bert.pooler.dense.bias", (0,)), "[0] in evil"),
    "lacks-a-tensor": (drop(IN_MODEL), f"model '{EVIL}' lacks 1", MERGED),
    "no-tensors": (lambda t: t.clear(), "share no floating-point tensor"),
}


@pytest.mark.parametrize("case", list(VALUES))
def test_bad_values_are_refused(world, tmp_path, case):
    change, *says = VALUES[case]
    d = resaved(world, tmp_path, change)
    refuse_model(world, tmp_path, d, *says)


def test_inf_in_base_is_named(world, tmp_path):
    d = resaved(world, tmp_path, setter("pooler.dense.bias", float("inf")), "infbase", "base_tensors")
    refused(world, tmp_path, merge_args(world, tmp_path, world["zoo"]["task1"], base=d, method="task_arithmetic"),
            "Tensor 'pooler.dense.bias' of the base model holds 1 NaN or Inf", inputs=[d], out=tmp_path / "out")


def test_nan_in_a_tensor_copied_from_the_base_is_refused(world, tmp_path):
    d = resaved(world, tmp_path, setter("pooler.dense.weight", float("nan")), "nanbase", "base_tensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {d}\nmodels: {{a: {world['zoo']['task0']}, b: {world['zoo']['task1']}}}\n"
                      f"exclude: ['pooler']\nsteps:\n  avg: {{kind: merge, method: simple_average, export: out}}\n")
    refused(world, tmp_path, ["run", recipe, "--store", world["store"]],
            "Tensor 'pooler.dense.weight' of the base model, copied unchanged", inputs=[d, recipe], out=tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Parameters: non-finite, beyond float32, or overflowing when combined or downcast


PARAMS = {
    "lambda-1e300": ("task_arithmetic", ["lambda=1e300"], "beyond float32's range", "lambda"),
    "lambda-1.0e300": ("task_arithmetic", ["lambda=1.0e+300"], "beyond float32's range"),
    "lambda-minus-1e300": ("task_arithmetic", ["lambda=-1.0e+300"], "beyond float32's range"),
    "lambda-inf": ("task_arithmetic", ["lambda=.inf"], "finite"),
    "lambda-nan": ("task_arithmetic", ["lambda=.nan"], "finite"),
    "lambda-list-1e39": ("task_arithmetic", ["lambda=[0.3, 1.0e+39]"], "beyond float32's range"),
    "lambda-map-inf": ("task_arithmetic", ["lambda={task0: 0.3, evil: .inf}"], "finite"),
    "weight-1e300": ("task_arithmetic", ["weight=1.0e+300"], "beyond float32's range", "weight"),
    "lambda-times-weight": ("task_arithmetic", ["lambda=3.0e+38", "weight=3.0e+38"], "Merging tensor",
                            "overflowed float32"),
    "average-weights-1e300": ("weighted_average", ["weights=1.0e+300"], "beyond float32's range"),
    "average-weights-inf": ("weighted_average", ["weights=[1, .inf]"], "finite"),
    "average-sum-overflows": ("weighted_average", ["weights=[3.0e+38, 3.0e+38]", "normalize=false"],
                              "Merging tensor", "NaN or Inf"),
    "ties-lambda-1e300": ("ties", ["lambda=1.0e+300"], "beyond float32's range"),
    "ties-density-nan": ("ties", ["density=.nan"], "density"),
    "dare-lambda-1e300": ("dare", ["p=0.5", "lambda=1.0e+300"], "beyond float32's range"),
    "dare-p-inf": ("dare", ["p=.inf"], "p"),
    "fisher-floor-1e300": ("fisher", ["floor=1.0e+300"], "beyond float32's range", "floor"),
    "regmean-jitter-1e300": ("regmean", ["jitter=1.0e+300"], "beyond float32's range", "jitter"),
    "out-dtype-int8": ("simple_average", ["--out-dtype", "int8"], "unknown dtype 'int8'"),
    "out-dtype-potato": ("simple_average", ["--out-dtype", "potato"], "unknown dtype 'potato'"),
}


@pytest.mark.parametrize("case", list(PARAMS))
def test_bad_parameters_are_refused(world, tmp_path, case):
    method, params, *says = PARAMS[case]
    extra = params if params[0].startswith("--") else [a for p in params for a in ("--param", p)]
    d = resaved(world, tmp_path, lambda t: None)
    refuse_model(world, tmp_path, d, *says, extra=extra, method=method)


def test_float16_output_that_overflows_on_downcast_names_the_tensor(world, tmp_path):
    d = resaved(world, tmp_path, lambda t: None)
    msg = refuse_model(world, tmp_path, d, "Merging tensor", "beyond the range of float16", "--out-dtype float32",
                       extra=["--param", "lambda=1.0e+7", "--out-dtype", "float16"], method="task_arithmetic")
    assert "bfloat16" in msg


def test_float16_models_whose_merge_overflows_float16_are_refused(world, tmp_path):
    half = {k: v.half() for k, v in world["base_tensors"].items()}
    base = evil_dir(world, tmp_path, "halfbase")
    save_file(half, str(base / "model.safetensors"))
    d = resaved(world, tmp_path, lambda t: t.update({k: v.half() for k, v in t.items()}))
    refused(world, tmp_path, merge_args(world, tmp_path, d, "--param", "lambda=1.0e+7", method="task_arithmetic",
                                        base=base),
            "beyond the range of float16 (±65504)", "out_dtype: float32", inputs=[d, base], out=tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Devices and seeds


DEVICES = {
    "potato": ("potato", "unknown device 'potato'"),
    "empty": ("", "unknown device ''"),
    "meta": ("meta", "unknown device 'meta'"),
    "cuda-negative": ("cuda:-1", "unknown device 'cuda:-1'"),
    "cuda-letter": ("cuda:x", "unknown device 'cuda:x'"),
    "cuda-huge-index": ("cuda:99999999999999999999", "unknown device"),
    "cpu-1": ("cpu:1", "one CPU device"),
    "mps-1": ("mps:1", "device 'mps:1'"),
    "injection": ("cpu; rm -rf /", "unknown device"),
    "long": ("c" * 5000, "characters)"),
}
if not torch.cuda.is_available():
    DEVICES.update({"cuda": ("cuda", "device 'cuda' is not available"),
                    "cuda-3": ("cuda:3", "device 'cuda:3' is not available"),
                    "upper-CUDA": ("CUDA:0", "device 'CUDA:0' is not available")})
if not torch.backends.mps.is_available():
    DEVICES["mps"] = ("mps", "device 'mps' is not available here")


@pytest.mark.parametrize("case", list(DEVICES))
def test_bad_device_is_refused_before_any_work(world, tmp_path, case):
    device, says = DEVICES[case]
    refused(world, tmp_path, merge_args(world, tmp_path, world["zoo"]["task1"], "--device", device), "--device",
            says, out=tmp_path / "out")


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_gpu_index_beyond_the_machine_is_refused(world, tmp_path, one_gpu):
    refused(world, tmp_path, merge_args(world, tmp_path, world["zoo"]["task1"], "--device", "cuda:3"),
            "--device", "device 'cuda:3' does not exist", "1 CUDA GPU(s), cuda:0 to cuda:0", out=tmp_path / "out")


def test_gpu_index_in_a_recipe_beyond_the_machine_names_the_line(world, tmp_path, one_gpu):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {world['zoo']['base']}\nmodels: {{a: {world['zoo']['task0']}}}\ndevice: cuda:3\n"
                      f"steps:\n  avg: {{kind: merge, method: simple_average}}\n")
    refused(world, tmp_path, ["run", recipe, "--store", world["store"]], "recipe.yaml:3", "device",
            "'cuda:3' does not exist", inputs=[recipe])


def test_local_rank_beyond_the_machine_is_refused_under_torchrun(world, tmp_path, one_gpu):
    refused(world, tmp_path, merge_args(world, tmp_path, world["zoo"]["task1"], "--device", "cuda"),
            "LOCAL_RANK is 2", env={"WORLD_SIZE": "4", "LOCAL_RANK": "2"}, out=tmp_path / "out")


def test_cuda_without_a_visible_gpu_says_so(world, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    refused(world, tmp_path, merge_args(world, tmp_path, world["zoo"]["task1"], "--device", "cuda"),
            "no CUDA GPU is visible", "CUDA_VISIBLE_DEVICES", out=tmp_path / "out")


def test_a_recipe_for_a_gpu_machine_can_be_inspected_anywhere(world, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {world['zoo']['base']}\nmodels: {{a: {world['zoo']['task0']}}}\ndevice: cuda\n"
                      f"steps:\n  avg: {{kind: merge, method: simple_average}}\n")
    assert hostile.run(["status", recipe, "--store", world["store"]], cwd=tmp_path).code == 0


@pytest.mark.parametrize("seed", ["-1", "-99999999999999999999"])
def test_negative_fisher_seed_is_refused(world, tmp_path, seed):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    refused(world, tmp_path, ["fisher", "--model", world["zoo"]["task1"], "--data", data, "--seed", seed,
                              "--store", world["store"]], f"--seed {seed}", inputs=[data])


def test_library_callers_get_the_error_subtypes(tmp_path):
    """Weights are ModelErrors, options RecipeErrors: library callers tell them apart by type."""
    from fmerge.distributed import check_device
    from fmerge.errors import ModelError, RecipeError
    from fmerge.io import ModelDir, read_safetensors_header

    (tmp_path / "model.safetensors").write_bytes(HEADERS["json-list"])
    with pytest.raises(ModelError, match="JSON array"):
        read_safetensors_header(tmp_path / "model.safetensors", "Model 'x'")
    with pytest.raises(ModelError, match="Model 'x'"):
        ModelDir(tmp_path, label="x")
    with pytest.raises(RecipeError, match="unknown device 'potato'"):
        check_device("potato")
    assert check_device("cpu") == "cpu" and check_device(" CPU ") == "cpu"
    assert check_device("cuda:7", available=False) == "cuda:7"  # status on a machine without the GPU
