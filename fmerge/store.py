"""The content-hashed artifact store: one zarr v3 group per artifact, one array per tensor.

An artifact's key is a hash of what produced it (kind, canonical parameters, input keys, an
algorithm version), so the same request always finds the same artifact. Artifacts are written in
`tmp/` and renamed into `objects/` only when complete, so an interrupted run leaves nothing that
a later run trusts. The store knows nothing of merge methods or recipes.

A store is a directory marked by `fmerge-store.json`. Only a writing command creates one, and
only in a new or empty directory (or adopts the unmarked layout an earlier fmerge left); every
other command refuses a directory without the marker, so no command of fmerge ever writes into or
deletes from a directory it did not create. Deletions touch only what fmerge names itself
(`objects/xx/KEY`, `tmp/KEY.PID.RANDOM`, `quarantine/KEY.PID.RANDOM`).

A merge's weights are not zarr arrays but the files they leave in: sharded safetensors under the
artifact's `safetensors/` folder (`ArtifactWriter.safetensors`), each file's xxh3-128 and SHA-256
and each tensor's place recorded in the attributes, so an export hard-links them (`Artifact.files`)
instead of writing the weights a second time. Statistics (Fisher, Grams, task vectors) stay zarr.

Nothing is served unchecked: every tensor read through `Artifact.get` is hashed and compared with
the checksum recorded when it was written, an artifact's attributes carry a checksum of their own,
and `Store.has_intact` (asked by the executor before it reuses an artifact) verifies a whole
artifact and moves a bad one to `quarantine/` so that it is recomputed.

Verified once, trusted while unchanged: after an artifact is verified whole (or written), the stat
stamp of each of its files (device, inode, size, mtime_ns, ctime_ns) is kept in
`cache/verified/KEY.json`; while every stamp still matches, `has_intact` trusts the artifact without
reading it again, so a cached run costs a few `stat` calls per artifact. Any change to a file
through the file system (a write, `touch`, a copy, a new hard link) moves its ctime, which no user
command can set back, so the artifact is verified whole again. Tensors are still checked as they
are read. What this cannot see: bytes that rot on the disk under an unchanged inode; `fmerge
verify` reads everything.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import math
import os
import platform
import re
import shutil
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import xxhash

from . import __version__
from .errors import StoreError, quoted
from .io import Allocator, WeightFilesWriter, pread_exactly

if TYPE_CHECKING:  # imported where a lock is taken: status, validate and ls take none
    from filelock import FileLock

# zarr has no bfloat16: such tensors are stored as their uint16 bits, the torch dtype in attrs.
_BITCAST = {torch.bfloat16: torch.uint16}
_TORCH_DTYPES = {str(d): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}
# Keys are hex digests; anything with '/', '..' or a leading dot could name a path outside the store.
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
HEX_RE = re.compile(r"^[0-9a-f]+$")  # what make_key makes: a key (or a prefix of one) a user may type
# What fmerge names in tmp/ and quarantine/: KEY.PID.RANDOM (a write in progress, an artifact moved
# aside) and KEY.PID.deleted-RANDOM (an artifact being removed). Nothing else there is fmerge's.
TEMP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.(\d+)\.(?:deleted-)?[0-9a-f]{8}$")

STORE_MARKER = "fmerge-store.json"
STORE_FORMAT = 1
_LAYOUT = ("objects", "tmp", "locks", "cache")
_QUARANTINE = "quarantine"
_WHAT_A_STORE_IS = ("An artifact store is the directory where `fmerge run`, `merge` and `fisher` keep what they "
                    f"compute, marked by a {STORE_MARKER} file; choose one with --store DIR, the FMERGE_STORE "
                    "variable or the recipe's `store:` (default: the artifacts/ found upward from the recipe, README \"The store\").")

# Checksums of tensor bytes: xxh3_128 hashes at ~15 GB/s on one core (blake2b: ~0.9 GB/s; see
# bench/verify_on_read.py), so checking every read costs a fraction of the read. It detects
# corruption, not tampering: the store trusts whoever can write to it. Artifacts record the
# algorithm in attrs["checksum_algorithm"]; those without it (written before it was recorded) were
# checksummed with blake2b-128, and are still read and checked.
CHECKSUM_ALGORITHM = "xxh3_128"
SAFETENSORS_DIR = "safetensors"  # in an artifact: tensors kept as the safetensors files they leave in
LEGACY_CHECKSUM_ALGORITHM = "blake2b_128"


def _zarr():
    """zarr, imported when an artifact is written or read through it: `status`, `ls` and a cached
    run read artifacts' zarr.json and raw chunk files only, and importing zarr costs ~0.15 s."""
    import zarr

    return zarr


def library_versions() -> dict[str, str]:
    """Versions that can change an artifact's bytes, recorded with it for reproducibility."""
    from importlib.metadata import version

    versions = {"fmerge": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    # from the installed metadata: importing transformers (seconds) or zarr (~0.15 s) here would
    # slow every run, even one that only writes a model card
    for lib in ("zarr", "transformers"):
        try:
            versions[lib] = sys.modules[lib].__version__ if lib in sys.modules else version(lib)
        except ImportError:
            pass
    return versions


def _write_error(exc: OSError, store_root: Path, what: str) -> StoreError:
    """A failed write (disk full, permissions) as one paragraph naming the store and the artifact."""
    reason = exc.strerror or str(exc)
    hint = " Free some space" if exc.errno in (28, 122) else " Check the store's permissions"  # ENOSPC, EDQUOT
    return StoreError(f"Writing {what} to artifact store {store_root} failed: {reason}. Nothing was "
                       f"committed and the partial write was removed.{hint}, or choose another store with "
                       f"--store or FMERGE_STORE, then run again: finished artifacts are reused.")


def make_key(kind: str, params: Any, inputs: dict[str, Any], algorithm_version: int) -> str:
    """Canonical JSON of everything that determines an artifact's content, hashed."""
    payload = json.dumps(
        {"kind": kind, "params": params, "inputs": inputs, "version": algorithm_version},
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def _checksum(array: np.ndarray, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # hashed in place, no copy
    if algorithm == CHECKSUM_ALGORITHM:
        return xxhash.xxh3_128(data).hexdigest()
    if algorithm == LEGACY_CHECKSUM_ALGORITHM:
        return hashlib.blake2b(data, digest_size=16).hexdigest()
    raise ValueError(f"unknown checksum algorithm '{algorithm}'")


def _attrs_checksum(attrs: dict) -> str:
    """Checksum of an artifact's attributes (canonical JSON, without this checksum itself)."""
    body = {k: v for k, v in attrs.items() if k != "attrs_checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return xxhash.xxh3_128(text.encode()).hexdigest()


def _hash_file(path: Path) -> str:
    """xxh3-128 of a whole file, read in 16 MiB blocks."""
    h = xxhash.xxh3_128()
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _read_range(file: Path, start: int, arr: np.ndarray) -> None:
    """Fill `arr` with the bytes of `file` from `start` on (pread; no mapping stays behind)."""
    with open(file, "rb", buffering=0) as fh:
        if not pread_exactly(fh.fileno(), memoryview(arr.reshape(-1).view(np.uint8)), start):
            raise ValueError(f"{file.name} ends before the tensor's last byte (truncated)")


def file_stamps(path: Path) -> list[list]:
    """[relative path, device, inode, size, mtime_ns, ctime_ns] of every file under `path`, sorted:
    what must stay the same for a verified artifact to be trusted without reading it."""
    stamps, folders = [], [("", str(path))]
    while folders:
        rel, folder = folders.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                name = rel + e.name
                if e.is_dir(follow_symlinks=False):
                    folders.append((name + "/", e.path))
                else:
                    st = e.stat(follow_symlinks=False)
                    stamps.append([name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return sorted(stamps)


def _empty(shape: tuple[int, ...], dtype: np.dtype, alloc: Allocator | None) -> np.ndarray:
    """An uninitialised array, in a buffer from `alloc(nbytes)` (a uint8 tensor) when given."""
    if alloc is None:
        return np.empty(shape, dtype)
    return alloc(math.prod(shape) * dtype.itemsize).numpy().view(dtype).reshape(shape)


def _read_single_chunk(array_dir: Path, alloc: Allocator | None = None) -> np.ndarray | None:
    """An array written as fmerge writes them (one chunk of its whole shape, raw little-endian bytes,
    no compression), read with one `readinto` from its chunk file: 2-3x faster than zarr's reader,
    which is most of what checking an artifact costs. None for anything else (zarr reads it then):
    another layout, a missing chunk file or one of the wrong size."""
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
        shape = tuple(int(n) for n in meta["shape"])
        (codec,) = meta["codecs"]
        if (meta.get("node_type") != "array" or meta.get("storage_transformers") or codec["name"] != "bytes"
                or codec.get("configuration", {}).get("endian", "little") != "little" or sys.byteorder != "little"
                or meta["chunk_grid"]["name"] != "regular" or meta["chunk_key_encoding"]["name"] != "default"
                or meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/"):
            return None
        dtype = np.dtype(meta["data_type"])
        if dtype.kind not in "biuf" or str(dtype) != meta["data_type"]:
            return None
        if 0 in shape:
            return np.zeros(shape, dtype)
        if tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]) != shape:
            return None
        arr = _empty(shape, dtype, alloc)
        chunk = array_dir.joinpath("c", *("0" for _ in shape))
        with open(chunk, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != arr.nbytes or f.readinto(memoryview(arr.reshape(-1).view(np.uint8))) != arr.nbytes:
                return None
        return arr
    except (OSError, ValueError, KeyError, TypeError):
        return None


class CorruptArtifactError(StoreError):
    """An artifact's bytes or attributes no longer match the checksums recorded when it was written."""

    problem: str = ""  # what is wrong, in a few words (the message says it in full)


def _corrupt(path: Path, what: str, kind: str = "", step: str = "") -> CorruptArtifactError:
    store = path.parent.parent.parent
    made = f" ({kind}" + (f", step {step}" if step else "") + ")" if kind else ""
    error = CorruptArtifactError(
        f"Artifact {path.name}{made} in store {store} is corrupt: {what}. It was not used. Its files changed "
        f"after fmerge wrote them (disk, copy or hand edit); `fmerge verify --store {store}` lists every bad "
        f"artifact, `fmerge verify --repair --store {store}` removes them, and the next `fmerge run` "
        f"recomputes them (it also moves a bad artifact it meets aside to {store / _QUARANTINE} itself).")
    error.problem = what
    return error


def _brief(exc: BaseException) -> str:
    """An exception as 'Type: first line', cut short, for one-paragraph messages."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 200 else text[:200] + "..."


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype in _BITCAST:
        t = t.view(_BITCAST[t.dtype])
    return t.numpy()


@dataclass
class BadArtifact:
    key: str
    kind: str
    step: str
    path: Path
    problem: str


@dataclass
class ArtifactInfo:
    key: str
    kind: str
    created: str
    path: Path
    attrs: dict

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class Artifact:
    """A finished artifact, read-only: tensors by name (optionally in subgroups) and attributes."""

    def __init__(self, path: Path, verified: bool = False):
        """Opens `path` and checks its attributes against their checksum (CorruptArtifactError).
        `verified`: its tensors were all checked in this process already (Store.check), so `get`
        need not hash them again."""
        self.path = path
        try:
            node = json.loads((path / "zarr.json").read_text())  # what zarr.open_group would read
            if node.get("node_type") != "group":
                raise ValueError(f"zarr.json describes a {node.get('node_type')!r}, not a group")
            self.attrs: dict = node["attributes"]["fmerge"]
            self.key: str = self.attrs["key"]
            self.kind: str = self.attrs["kind"]
        except Exception as exc:  # missing or unreadable zarr.json, no fmerge attributes
            raise _corrupt(path, f"its metadata is unreadable ({_brief(exc)})") from exc
        if not isinstance(self.attrs, dict) or not isinstance(self.attrs.get("tensors", []), list):
            raise _corrupt(path, "its metadata is unreadable (the fmerge attributes are not a mapping)")
        recorded = self.attrs.get("attrs_checksum")
        if recorded is not None and recorded != _attrs_checksum(self.attrs):
            raise _corrupt(path, "its attributes differ from their checksum", self.kind, self.meta.get("step", ""))
        self.checksum_algorithm: str = self.attrs.get("checksum_algorithm", LEGACY_CHECKSUM_ALGORITHM)
        if self.checksum_algorithm not in (CHECKSUM_ALGORITHM, LEGACY_CHECKSUM_ALGORITHM):
            raise _corrupt(path, f"its checksums use algorithm '{self.checksum_algorithm}', which this fmerge "
                                 f"does not know (a newer fmerge wrote it?)", self.kind, self.meta.get("step", ""))
        self.verified = verified
        self._group = None

    @property
    def group(self):
        """The zarr group, opened on first use (shapes, arrays in another layout than fmerge's)."""
        if self._group is None:
            self._group = _zarr().open_group(str(self.path), mode="r")
        return self._group

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names under `prefix` (e.g. 'fisher/'), in the order they were written."""
        return [n[len(prefix):] for n in self.attrs["tensors"] if n.startswith(prefix)]

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[self.attrs["dtypes"][name]]

    @property
    def placement(self) -> dict[str, list]:
        """{tensor: [file, start, end, shape]} of tensors kept in safetensors files."""
        return self.attrs.get("placement", {})

    def files(self, prefix: str) -> dict[str, tuple[Path, dict]]:
        """{file name: (path, record with size and xxh3_128)} of the safetensors files (and
        index) holding the tensors under `prefix`; empty when they are zarr arrays (an artifact
        written before merges kept safetensors, or a statistic)."""
        folder = SAFETENSORS_DIR + "/" + prefix.rstrip("/")
        return {rel.rsplit("/", 1)[1]: (self.path / rel, rec) for rel, rec in self.attrs.get("files", {}).items()
                if rel.rsplit("/", 1)[0] == folder}

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.placement:
            return tuple(int(n) for n in self.placement[name][3])
        try:  # from the array's zarr.json, without importing zarr
            return tuple(int(n) for n in json.loads((self.path / name / "zarr.json").read_text())["shape"])
        except (OSError, ValueError, KeyError, TypeError):
            return tuple(self.group[name].shape)

    def read(self, name: str, alloc: Allocator | None = None) -> np.ndarray:
        """The stored array, unchecked (`get` checks it): straight from its one chunk file when it
        has the layout fmerge writes (into a buffer from `alloc`, if given), else through zarr."""
        if name in self.placement:
            rel, start, end, shape = self.placement[name]
            dtype = _to_numpy(torch.empty(0, dtype=self.dtype(name))).dtype
            if math.prod(shape) * dtype.itemsize != end - start:
                raise ValueError(f"its recorded place in {rel} does not fit its shape")
            arr = _empty(tuple(shape), dtype, alloc)
            _read_range(self.path / rel, start, arr)
            return arr
        arr = _read_single_chunk(self.path / name, alloc)
        return arr if arr is not None else np.asarray(self.group[name][...])

    def get(self, name: str, alloc: Allocator | None = None) -> torch.Tensor:
        """A fresh tensor, its bytes checked against the checksum recorded at write time; `alloc`
        supplies the buffer it is read into, as for `ModelDir.get`."""
        try:
            arr = self.read(name, alloc)
        except Exception as exc:  # a missing, truncated or garbled chunk or array metadata
            raise _corrupt(self.path, f"tensor '{name}' cannot be read ({_brief(exc)})", self.kind,
                           self.meta.get("step", "")) from exc
        if not self.verified:
            expected = self.attrs.get("checksums", {}).get(name)
            if expected is None:
                raise _corrupt(self.path, f"tensor '{name}' has no recorded checksum", self.kind, self.meta.get("step", ""))
            if _checksum(arr, self.checksum_algorithm) != expected:
                raise _corrupt(self.path, f"tensor '{name}' differs from the checksum recorded when it was written",
                               self.kind, self.meta.get("step", ""))
        t = torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)
        want = self.dtype(name)
        return t.view(want) if want in _BITCAST else t

    def view(self, prefix: str) -> "ArtifactView":
        return ArtifactView(self, prefix)

    @property
    def meta(self) -> dict:
        return self.attrs.get("meta", {})

    def verify(self) -> list[str]:
        """Names of arrays whose bytes no longer match the checksum recorded at write time."""
        checksums = self.attrs.get("checksums", {})
        bad = [n for n in self.attrs.get("tensors", []) if n not in checksums]  # no checksum: untrusted
        for rel, record in self.attrs.get("files", {}).items():  # whole files: headers and tensors at once
            try:
                ok = (os.path.getsize(self.path / rel) == record["size"]
                      and _hash_file(self.path / rel) == record["xxh3_128"])
            except (OSError, KeyError, TypeError):
                ok = False
            if not ok:
                bad.append(rel)
        placed = self.placement
        for name, expected in checksums.items():
            if name in placed:
                continue  # checked with its file
            try:
                if _checksum(self.read(name), self.checksum_algorithm) != expected:
                    bad.append(name)
            except Exception:  # missing or unreadable chunk: as bad as a wrong byte
                bad.append(name)
        return bad


class ArtifactView:
    """The tensors of one subgroup of an artifact, served like a model (a TensorSource)."""

    def __init__(self, artifact: Artifact, prefix: str):
        self.artifact, self.prefix = artifact, prefix

    def names(self) -> list[str]:
        return self.artifact.names(self.prefix)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.artifact.shape(self.prefix + name)

    def dtype(self, name: str) -> torch.dtype:
        return self.artifact.dtype(self.prefix + name)

    def get(self, name: str, alloc: Allocator | None = None) -> torch.Tensor:
        return self.artifact.get(self.prefix + name, alloc)

    def get_as(self, name: str, dtype: torch.dtype, alloc: Allocator | None = None) -> torch.Tensor:
        """A fresh tensor in `dtype`: read into a buffer from `alloc` when it is stored in it."""
        if self.dtype(name) == dtype:
            return self.get(name, alloc)
        return self.get(name).to(dtype)

    fresh_tensors = True  # `get` reads a new tensor each call


class ArtifactWriter:
    """Builds an artifact in tmp/; `commit` checks nothing is missing and renames it into place."""

    def __init__(self, store: "Store", key: str, kind: str, inputs: dict, params: Any, algorithm_version: int):
        self.store, self.key = store, key
        store._require_created(f"write artifact {key[:12]} ({kind})")
        self.tmp = store.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.group = _zarr().open_group(str(self.tmp), mode="w")
        except OSError as exc:
            self.abort()
            raise _write_error(exc, store.root, f"artifact {key[:12]} ({kind})") from exc
        self.attrs: dict[str, Any] = {
            "kind": kind, "key": key, "inputs": inputs, "params": params,
            "algorithm_version": algorithm_version, "fmerge_version": __version__,
            "versions": library_versions(), **store.provenance,
            "tensors": [], "dtypes": {}, "checksums": {}, "checksum_algorithm": CHECKSUM_ALGORITHM, "meta": {},
        }

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = _to_numpy(tensor)
        parent, _, leaf = name.rpartition("/")
        try:
            group = self.group.require_group(parent) if parent else self.group
            chunks = tuple(max(1, s) for s in data.shape)
            # write_empty_chunks: skip zarr's all-fill-value scan of every chunk (6x the write time)
            arr = group.create_array(leaf, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=None,
                                     fill_value=0, config={"write_empty_chunks": True})
            arr[...] = data
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.store.root, f"tensor '{name}' of artifact {self.key[:12]} "
                                                     f"({self.attrs['kind']})") from exc
        self.attrs["tensors"].append(name)
        self.attrs["dtypes"][name] = str(tensor.dtype)
        self.attrs["checksums"][name] = _checksum(data)

    def safetensors(self, prefix: str, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                    metadata: dict[str, str], max_shard_bytes: int) -> "SafetensorsPayload":
        """A writer of the tensors `prefix + name` of `layout` (in that order) into safetensors files
        under SAFETENSORS_DIR/prefix (the files an export links), checksummed as they are written."""
        folder = self.tmp / SAFETENSORS_DIR / prefix.rstrip("/")
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.store.root, f"artifact {self.key[:12]} ({self.attrs['kind']})") from exc
        return SafetensorsPayload(self, prefix, folder, WeightFilesWriter(folder, layout, metadata, max_shard_bytes))

    def commit(self, meta: dict | None = None) -> Artifact:
        self.attrs["meta"] = meta or {}
        self.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        final = self.store.path(self.key)
        try:
            attrs = json.loads(json.dumps(self.attrs, default=str))
            attrs["attrs_checksum"] = _attrs_checksum(attrs)
            self.group.attrs["fmerge"] = attrs
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.store.root, f"artifact {self.key[:12]} ({self.attrs['kind']})") from exc
        try:
            os.rename(self.tmp, final)
        except OSError as exc:
            # Another process committed the same key first: same inputs, same content; keep theirs.
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not self.store.has(self.key):
                raise _write_error(exc, self.store.root, f"artifact {self.key[:12]} ({self.attrs['kind']})") from exc
            return Artifact(final)
        # its checksums were computed from the bytes as they were written: trusted as verified
        self.store._remember_intact(self.key)
        return Artifact(final)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        """Whatever fails (or interrupts) before `commit` leaves nothing behind."""
        if exc_type is not None:
            self.abort()


class SafetensorsPayload:
    """Tensors of one artifact written as sharded safetensors files (see `ArtifactWriter.safetensors`)."""

    def __init__(self, writer: ArtifactWriter, prefix: str, folder: Path, files: WeightFilesWriter):
        self.writer, self.prefix, self.folder, self.files = writer, prefix, folder, files

    def write(self, name: str, tensor: torch.Tensor) -> None:
        w = self.writer
        data = _to_numpy(tensor)
        try:
            self.files.write(name, tensor)
        except OSError as exc:
            self.files.abandon()
            w.abort()
            raise _write_error(exc, w.store.root, f"tensor '{self.prefix + name}' of artifact {w.key[:12]} "
                                                  f"({w.attrs['kind']})") from exc
        full = self.prefix + name
        w.attrs["tensors"].append(full)
        w.attrs["dtypes"][full] = str(tensor.dtype)
        w.attrs["checksums"][full] = _checksum(data)

    def close(self) -> None:
        """Finish the files and record them (with where each tensor lies) in the artifact."""
        w = self.writer
        try:
            self.files.close()
        except OSError as exc:
            self.files.abandon()
            w.abort()
            raise _write_error(exc, w.store.root, f"artifact {w.key[:12]} ({w.attrs['kind']})") from exc
        rel = self.folder.relative_to(w.tmp).as_posix()
        w.attrs.setdefault("files", {}).update({f"{rel}/{f}": record for f, record in self.files.files.items()})
        placement = w.attrs.setdefault("placement", {})
        for name, (f, start, end) in self.files.placement.items():
            placement[self.prefix + name] = [f"{rel}/{f}", start, end, list(self.shape_of[name])]

    @property
    def shape_of(self) -> dict[str, tuple[int, ...]]:
        return {n: s for shard in self.files.shards for n, _, s in shard}

    def __enter__(self) -> "SafetensorsPayload":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.files.abandon()


def check_key(key: str, root: Path | str) -> None:
    """Keys are hex digests; anything else (a path, '..') is refused before it names a file."""
    if not KEY_RE.match(key):
        raise StoreError(f"{quoted(key)} is not an artifact key (keys are letters and digits, as `fmerge ls` "
                         f"shows them); store {root}.")


def pid_alive(pid: int) -> bool:
    """Whether a process exists (a leftover named after a live pid is not a leftover)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """The artifact store rooted at a directory (default ./artifacts), marked by fmerge-store.json.

    `Store(root)` or `Store.create_or_open(root)`: for commands that write artifacts (run, merge,
    fisher). Opens the store at `root`, creating it when `root` does not exist or is empty, and
    adopting the unmarked layout of an earlier fmerge (only objects/ tmp/ locks/ cache/); any other
    directory is refused. `Store.open_existing(root)`: for every other command (ls, show, verify,
    gc, status). Refuses a directory that is not a store and creates nothing.
    """

    def __init__(self, root: Path | str, create: bool = True, missing_ok: bool = False):
        self.root = Path(root)
        # Recorded in every artifact written through this store (e.g. the recipe that asked for it).
        self.provenance: dict[str, Any] = {}
        self.writable = create   # artifacts may be written (a store opened by a writing command)
        self.exists = True       # False only for open_existing(missing_ok=True) of a missing directory
        self._verified: dict[str, list] = {}  # key -> file stamps of artifacts checked whole this process
        self.unreadable: list[Path] = []  # entries of objects/ the last `list()` could not read
        if create:
            self._create_or_adopt()
        else:
            self._open_existing(missing_ok)

    @classmethod
    def create_or_open(cls, root: Path | str) -> "Store":
        """The store at `root` for writing: created in a new or empty directory, never elsewhere."""
        return cls(root, create=True)

    @classmethod
    def open_existing(cls, root: Path | str, missing_ok: bool = False) -> "Store":
        """The store at `root`, which must exist (unless `missing_ok`: then an empty store that
        lists nothing and has no directory). Creates, adopts and writes nothing."""
        return cls(root, create=False, missing_ok=missing_ok)

    # -- the marker and the layout ------------------------------------------------------------

    @property
    def marker(self) -> Path:
        return self.root / STORE_MARKER

    def _layout_only(self, entries: list[str], need_objects: bool) -> bool:
        """Whether `entries` of the root are only fmerge's own directories (an earlier fmerge's store)."""
        allowed = set(_LAYOUT) | {_QUARANTINE}
        return (bool(entries) and all(e in allowed and (self.root / e).is_dir() and not (self.root / e).is_symlink()
                                      for e in entries)
                and (not need_objects or "objects" in entries))

    def _not_a_store(self, entries: list[str]) -> StoreError:
        shown = ", ".join(sorted(entries)[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        return StoreError(f"{self.root} is not an fmerge artifact store: it has no {STORE_MARKER} and is not empty "
                           f"(it holds {shown}). fmerge creates a store only in a new or empty directory and never "
                           f"writes into or deletes from a directory it did not create. {_WHAT_A_STORE_IS}")

    def _read_marker(self) -> None:
        for attempt in range(50):  # a concurrent creator may be between creating and filling it
            try:
                info = json.loads(self.marker.read_text())
                version = int(info["version"])
                break
            except (OSError, ValueError, KeyError, TypeError):
                if attempt == 49 or os.path.isdir(self.marker):
                    raise StoreError(f"The store marker {self.marker} of artifact store {self.root} is unreadable "
                                     f"(it is {self._what(self.marker)}); it should hold "
                                      f'{{"format": "fmerge-store", "version": {STORE_FORMAT}}}. Restore it, or '
                                      f"choose another store with --store or FMERGE_STORE.") from None
                time.sleep(0.02)
        if version > STORE_FORMAT:
            raise StoreError(f"Artifact store {self.root} has format version {version} ({self.marker}); this "
                              f"fmerge ({__version__}) reads version {STORE_FORMAT} and older. Upgrade fmerge, or "
                              f"choose another store with --store or FMERGE_STORE.")

    def _write_marker(self) -> None:
        """Creates the marker unless a concurrent creator did; never replaces one."""
        body = json.dumps({"format": "fmerge-store", "version": STORE_FORMAT, "fmerge": __version__,
                           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, indent=1)
        try:
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as f:
            f.write(body + "\n")

    @staticmethod
    def _what(path: Path) -> str:
        """What `path` is, in words, for messages about a damaged store."""
        try:
            st = os.lstat(path)
        except OSError:
            return "missing"
        if stat.S_ISLNK(st.st_mode):
            return "a symbolic link" + ("" if os.path.exists(path) else " that leads nowhere (or to itself)")
        if stat.S_ISDIR(st.st_mode):
            return "a directory"
        return "a file" if stat.S_ISREG(st.st_mode) else "not a regular file"

    def _check_root(self) -> None:
        """Refuse a root that is a symbolic link loop, a broken link or a file, naming it."""
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            if os.path.lexists(self.root):
                raise StoreError(f"Artifact store {self.root} is a symbolic link to {os.readlink(self.root)}, which "
                                 f"does not exist; fmerge neither follows nor replaces it. Fix the link, or choose "
                                 f"another store with --store or FMERGE_STORE.") from None
            return
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                return  # (under a file, unreadable, ...): said when the store is created or opened
            raise StoreError(f"Artifact store {self.root} cannot be used: it is a symbolic link loop (a link leading "
                             f"back to itself, or a path through one). Fix the path, or choose another store with "
                             f"--store or FMERGE_STORE.") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{self.root} is not an fmerge artifact store: it is a file, not a directory. "
                             f"{_WHAT_A_STORE_IS}")

    def _check_layout(self) -> None:
        """A marked store's own entries (objects/, tmp/, locks/, cache/, quarantine/ and the marker)
        must be what fmerge made them; anything else there is named, never replaced. (A directory
        without the marker is not a store: `_not_a_store` says so.)"""
        if not os.path.lexists(self.marker):
            return
        if not self.marker.is_file():
            raise StoreError(f"Artifact store {self.root} is damaged: its marker {self.marker} is "
                             f"{self._what(self.marker)}, not the file fmerge writes. fmerge will not remove it; "
                             f"move it away (a store's marker holds {{\"format\": \"fmerge-store\", \"version\": "
                             f"{STORE_FORMAT}}}), or choose another store with --store or FMERGE_STORE.")
        for name in (*_LAYOUT, _QUARANTINE):
            sub = self.root / name
            if os.path.lexists(sub) and not sub.is_dir():
                raise StoreError(f"Artifact store {self.root} is damaged: {sub} is {self._what(sub)}, not a directory "
                                 f"(fmerge keeps its {name} there). fmerge will not remove it; move it out of the "
                                 f"store, then run again, or choose another store with --store or FMERGE_STORE.")

    def _create_or_adopt(self) -> None:
        self._check_root()
        self._check_layout()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not self.marker.is_file():
                entries = os.listdir(self.root)
                if STORE_MARKER not in entries:  # (there: a concurrent creator was first)
                    if entries and not self._layout_only(entries, need_objects=False):
                        raise self._not_a_store(entries)
                    self._write_marker()  # an empty directory, or an earlier fmerge's store: adopted
            self._read_marker()
            for sub in _LAYOUT:
                (self.root / sub).mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Artifact store {self.root} cannot be created or written ({exc.strerror or exc}); "
                              f"choose another with --store or FMERGE_STORE.")
        if not os.access(self.root / "objects", os.W_OK):
            raise StoreError(f"Artifact store {self.root} is not writable; choose another with --store or FMERGE_STORE.")

    def _open_existing(self, missing_ok: bool) -> None:
        self._check_root()
        if not self.root.exists():
            if missing_ok:
                self.exists = False
                return
            raise StoreError(f"No artifact store at {self.root}: the directory does not exist (nothing was "
                              f"created). {_WHAT_A_STORE_IS}")
        if not self.root.is_dir():
            raise StoreError(f"{self.root} is not an fmerge artifact store: it is a file, not a directory. "
                              f"{_WHAT_A_STORE_IS}")
        self._check_layout()
        if self.marker.is_file():
            self._read_marker()
            return
        entries = os.listdir(self.root)
        if self._layout_only(entries, need_objects=True):
            return  # an earlier fmerge's store: read as it is; the next writing command marks it
        if not entries:
            raise StoreError(f"{self.root} is not an fmerge artifact store: it is an empty directory without "
                              f"{STORE_MARKER}. {_WHAT_A_STORE_IS}")
        raise self._not_a_store(entries)

    def _require_created(self, what: str) -> None:
        if not self.writable:
            raise StoreError(f"Artifact store {self.root} was opened read-only, so fmerge cannot {what}; only "
                              f"`fmerge run`, `merge` and `fisher` write artifacts.")

    # -- artifacts ----------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        check_key(key, self.root)
        return self.root / "objects" / key[:2] / key

    def has(self, key: str) -> bool:
        """Whether `key` is committed (says nothing of its bytes: see `has_intact`)."""
        return self.exists and (self.path(key) / "zarr.json").is_file()

    def open(self, key: str) -> Artifact:
        """A committed artifact by key or unique prefix, its attributes checked (its tensors are
        checked as they are read)."""
        path = self.path(key)
        if not (self.exists and os.path.lexists(path)):
            if not HEX_RE.match(key):
                raise StoreError(f"No artifact {quoted(key)} in store {self.root}: {quoted(key, 60)} is not an artifact "
                                 f"key. Keys are hexadecimal digests (0-9, a-f), and a unique prefix of one is enough, "
                                 f"as `fmerge ls --store {self.root}` shows them.")
            matches = self._named(key) if len(key) >= 4 else []
            if len(matches) == 1:
                return self.open(matches[0])
            hint = f" ({len(matches)} artifacts start with it)" if matches else ""
            raise StoreError(f"No artifact '{key}' in store {self.root}{hint}; `fmerge ls` lists them.")
        art = Artifact(path, verified=self._is_verified(key))
        if art.key != key:
            raise _corrupt(path, f"its attributes name another key, {art.key}", art.kind, art.meta.get("step", ""))
        return art

    def _named(self, prefix: str) -> list[str]:
        """Keys of the entries of objects/ (intact or not) that start with `prefix` and lie where
        fmerge puts them."""
        if len(prefix) < 2:
            return []
        folder = self.root / "objects" / prefix[:2]
        try:
            names = os.listdir(folder)
        except OSError:
            return []
        return sorted(n for n in names if n.startswith(prefix) and KEY_RE.match(n))

    def writer(self, key: str, kind: str, inputs: dict, params: Any, algorithm_version: int) -> ArtifactWriter:
        return ArtifactWriter(self, key, kind, inputs, params, algorithm_version)

    def lock(self, key: str) -> FileLock:
        """Held while computing `key`, so concurrent runs compute each artifact once."""
        self.path(key)  # validates the key
        lock = self.root / "locks" / f"{key}.lock"
        if os.path.lexists(lock) and (lock.is_symlink() or not lock.is_file()):
            raise StoreError(f"Artifact store {self.root} is damaged: the lock file {lock} is {self._what(lock)}, "
                             f"not the file fmerge locks while it computes artifact {key[:12]}. fmerge will not "
                             f"remove it; move it out of the store (no fmerge may be running on this store), then "
                             f"run again.")
        from filelock import FileLock  # here: status, validate and ls take no lock (~10 ms to import)

        return FileLock(str(lock))

    def list(self) -> Iterator[ArtifactInfo]:
        """The artifacts whose attributes can be read (`verify` checks them whole); entries of
        objects/ that cannot be read are skipped and collected in `self.unreadable`."""
        self.unreadable = []
        for path in sorted((self.root / "objects").glob("*/*")):
            try:
                attrs = json.loads((path / "zarr.json").read_text())["attributes"]["fmerge"]
                info = ArtifactInfo(path.name, str(attrs["kind"]), str(attrs.get("created", "")), path, attrs)
                if not isinstance(info.attrs.get("meta", {}), dict):
                    raise TypeError("meta")
            except (OSError, KeyError, TypeError, ValueError, AttributeError):  # ValueError: bad JSON or UTF-8
                if path.is_dir() and not path.is_symlink():
                    self.unreadable.append(path)
                continue
            yield info

    def find(self, kind: str, **meta: Any) -> list[ArtifactInfo]:
        """Committed artifacts of `kind` whose meta holds every given key=value (a full scan)."""
        found = []
        for info in self.list():
            got = info.attrs.get("meta", {})
            if info.kind == kind and all(got.get(k) == v for k, v in meta.items()):
                found.append(info)
        return found

    # -- verification -------------------------------------------------------------------------

    def _current_stamps(self, key: str) -> list[list] | None:
        try:
            return file_stamps(self.path(key))
        except OSError:
            return None

    def _is_verified(self, key: str) -> bool:
        """Verified whole by this process, and its files unchanged since (their tensors are then
        served without hashing them again)."""
        stamps = self._verified.get(key)
        return stamps is not None and stamps == self._current_stamps(key)

    def _examine(self, path: Path) -> BadArtifact | None:
        """What is wrong with the entry `path` of objects/, or None when it is a complete artifact
        whose attributes and tensors all match their write-time checksums."""
        kind = step = ""
        try:
            art = Artifact(path)
            kind, step = art.kind, art.meta.get("step", "")
            if art.key != path.name:
                problem = f"its attributes name another key, {art.key}"
            elif path.parent.name != path.name[:2]:
                problem = f"it lies in objects/{path.parent.name}/, not objects/{path.name[:2]}/"
            else:
                wrong = art.verify()
                problem = (f"{len(wrong)} tensor(s) differ from their checksums: " + ", ".join(wrong[:3])
                           + (" ..." if len(wrong) > 3 else "")) if wrong else ""
        except CorruptArtifactError as exc:
            problem = exc.problem
        except Exception as exc:  # unreadable metadata: nothing in it can be trusted
            problem = f"unreadable ({_brief(exc)})"
        return BadArtifact(path.name, kind, step, path, problem) if problem else None

    def check(self, key: str) -> str:
        """'' when artifact `key` is committed and intact (attributes readable and matching their
        checksum, naming this key; every tensor listed has a checksum its bytes match), else what is
        wrong. An intact artifact is remembered for the rest of this process (while its files stay
        the same ones), so that reading its tensors afterwards does not hash them again, and its
        files' stamps are kept in the store: while they match, later runs trust it unread
        (`get` still checks each tensor it reads)."""
        if not self.has(key):
            return "it is not in the store"
        stamps = self._current_stamps(key)
        if stamps is not None and (stamps == self._verified.get(key) or stamps == self._recorded_stamps(key)):
            return ""
        bad = self._examine(self.path(key))
        if bad is None:
            self._verified[key] = stamps
            self._save_stamps(key, stamps)
            return ""
        return bad.problem

    def _stamps_file(self, key: str) -> Path:
        return self.root / "cache" / "verified" / f"{key}.json"

    def _recorded_stamps(self, key: str) -> list | None:
        """The stamps kept when `key` was last verified whole (by any run), if any."""
        try:
            return json.loads(self._stamps_file(key).read_text())
        except (OSError, ValueError):
            return None

    def _save_stamps(self, key: str, stamps: list | None) -> None:
        """Keep the stamps of a verified artifact's files (best effort: a store that cannot be
        written only verifies again next time)."""
        if not self.writable or stamps is None:
            return
        target = self._stamps_file(key)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(stamps))
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)

    def _forget_stamps(self, key: str) -> None:
        self._verified.pop(key, None)
        try:
            self._stamps_file(key).unlink(missing_ok=True)
        except OSError:
            pass

    def _remember_intact(self, key: str) -> None:
        """An artifact this process has just written, checksummed as its bytes went out."""
        self._verified[key] = stamps = self._current_stamps(key)
        self._save_stamps(key, stamps)

    def restamp(self, key: str, change: Callable[[], Any]) -> Any:
        """Run `change` (which links the artifact's files elsewhere: that moves their ctime) and
        keep trusting the artifact if it was trusted right before; returns what `change` returns."""
        before = self._current_stamps(key)
        in_process = before is not None and before == self._verified.get(key)
        trusted = in_process or (before is not None and before == self._recorded_stamps(key))
        result = change()
        if trusted:
            after = self._current_stamps(key)
            only_ctimes_moved = after is not None and [s[:5] for s in after] == [s[:5] for s in before]
            if only_ctimes_moved and after != before:
                if in_process:
                    self._verified[key] = after
                self._save_stamps(key, after)
        return result

    def has_intact(self, key: str, on_bad: Callable[[BadArtifact], None] | None = None,
                   locked: bool = False) -> bool:
        """Whether `key` is committed and intact (`check`). A bad one is moved to quarantine/ (under
        the key's lock, so never a good one a concurrent run just wrote; `locked`: the caller holds
        it already), reported to `on_bad` with its new path, and False is returned: the caller
        recomputes it."""
        if not self.has(key):
            if self.exists and self.writable and os.path.lexists(self.path(key)):
                # something at the key's path without readable metadata (a damaged artifact):
                # moved aside like any bad one, so that the new artifact can take its place
                with (contextlib.nullcontext() if locked else self.lock(key)):
                    bad = self.quarantine(key) if os.path.lexists(self.path(key)) and not self.has(key) else None
                if bad is not None and on_bad is not None:
                    on_bad(bad)
            return False
        if not self.check(key):
            return True
        with (contextlib.nullcontext() if locked else self.lock(key)):
            if not self.has(key):
                return False  # another run moved it aside meanwhile
            bad = self.quarantine(key)  # examines it again: None if replaced by a good one meanwhile
            if bad is None:
                self.check(key)
                return True
        if on_bad is not None:
            on_bad(bad)
        return False

    def quarantine(self, key: str) -> BadArtifact | None:
        """Move a bad artifact out of objects/ to quarantine/KEY.PID.RANDOM (never deleted silently:
        `fmerge verify --repair` removes quarantined entries, saying so). None if it is intact."""
        path = self.path(key)
        bad = self._examine(path)
        if bad is None:
            return None
        dest = self.root / _QUARANTINE / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            dest.parent.mkdir(exist_ok=True)
            os.rename(path, dest)
        except OSError as exc:
            raise StoreError(f"Artifact {key} in store {self.root} is corrupt ({bad.problem}), and moving it aside to "
                             f"{dest.parent} failed: {exc.strerror or exc}. Nothing was removed; `fmerge verify "
                             f"--repair --store {self.root}` removes bad artifacts, or move {path} away, then run "
                             f"again.") from None
        self._forget_stamps(key)
        try:
            (dest / "fmerge-quarantine.json").write_text(json.dumps(
                {"key": key, "kind": bad.kind, "step": bad.step, "problem": bad.problem,
                 "moved": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, indent=1))
        except OSError:
            pass
        bad.path = dest
        return bad

    def quarantined(self) -> list[Path]:
        """Artifacts moved aside by `quarantine` (only entries named as fmerge names them)."""
        q = self.root / _QUARANTINE
        return sorted(p for p in q.iterdir() if TEMP_RE.match(p.name) and not p.is_symlink()) if q.is_dir() else []

    def verify(self) -> list["BadArtifact"]:
        """Every entry of objects/ that is not a complete artifact matching its write-time checksums."""
        bad = []
        for path in sorted((self.root / "objects").glob("*/*")):
            found = self._examine(path)
            if found is not None:
                bad.append(found)
        return bad

    # -- removal: only what fmerge itself named -----------------------------------------------

    def remove_path(self, path: Path) -> None:
        """Remove an entry of objects/ (objects/xx/KEY), whatever state it is in: it vanishes whole
        (an atomic rename into tmp/), then its bytes go. Refuses any other path."""
        path = Path(path)
        objects = Path(os.path.abspath(self.root / "objects"))
        if (Path(os.path.abspath(path)).parent.parent != objects or not KEY_RE.match(path.name)
                or path.parent.name != path.name[:2]  # not where fmerge puts that key
                or path.is_symlink() or not path.is_dir()  # fmerge's artifacts are directories, never links
                or path.parent.is_symlink() or objects.is_symlink()):  # a link could lead out of the store
            raise StoreError(f"Refusing to remove {path}: fmerge removes only artifacts, entries objects/xx/KEY "
                              f"of the store {self.root}.")
        self._forget_stamps(path.name)
        trash = self.root / "tmp" / f"{path.name}.{os.getpid()}.deleted-{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(exist_ok=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, key: str) -> None:
        self.remove_path(self.path(key))

    def remove_quarantined(self, path: Path) -> None:
        """Remove an entry of quarantine/ that `quarantined` lists; refuses any other path."""
        if Path(path) not in self.quarantined():
            raise StoreError(f"Refusing to remove {path}: it is not an artifact fmerge moved to "
                              f"{self.root / _QUARANTINE}.")
        shutil.rmtree(path, ignore_errors=True)

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted writes (never trusted, never listed).

        Only entries named as fmerge names them are touched: KEY.PID.RANDOM (a write) and
        KEY.PID.deleted-RANDOM (a removal); those of a live process are left alone, and so is
        anything else in tmp/.
        """
        tmp = self.root / "tmp"
        if not tmp.is_dir() or tmp.is_symlink():
            return 0
        n = 0
        for p in tmp.iterdir():
            m = TEMP_RE.match(p.name)
            if not m or p.is_symlink() or pid_alive(int(m.group(1))):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
        return n

    @property
    def hash_cache_file(self) -> Path:
        return self.root / "cache" / "model_hashes.json"
