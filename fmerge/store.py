"""The content-hashed artifact store: one zarr v3 group per artifact, one array per tensor.

An artifact's key is a hash of what produced it (kind, canonical parameters, input keys, an
algorithm version), so the same request always finds the same artifact. Artifacts are written in
`tmp/` and renamed into `objects/` only when complete, so an interrupted run leaves nothing that
a later run trusts. The store knows nothing of merge methods or recipes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import zarr
from filelock import FileLock

from . import __version__
from .errors import FmergeError

# zarr has no bfloat16: such tensors are stored as their uint16 bits, the torch dtype in attrs.
_BITCAST = {torch.bfloat16: torch.uint16}
_TORCH_DTYPES = {str(d): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


def make_key(kind: str, params: Any, inputs: dict[str, Any], algorithm_version: int) -> str:
    """Canonical JSON of everything that determines an artifact's content, hashed."""
    payload = json.dumps(
        {"kind": kind, "params": params, "inputs": inputs, "version": algorithm_version},
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def _checksum(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype in _BITCAST:
        t = t.view(_BITCAST[t.dtype])
    return t.numpy()


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

    def __init__(self, path: Path):
        self.path = path
        self.group = zarr.open_group(str(path), mode="r")
        self.attrs: dict = dict(self.group.attrs)["fmerge"]
        self.key: str = self.attrs["key"]
        self.kind: str = self.attrs["kind"]

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names under `prefix` (e.g. 'fisher/'), in the order they were written."""
        return [n[len(prefix):] for n in self.attrs["tensors"] if n.startswith(prefix)]

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[self.attrs["dtypes"][name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.group[name].shape)

    def get(self, name: str) -> torch.Tensor:
        arr = self.group[name][...]
        t = torch.from_numpy(np.asarray(arr).copy())
        want = self.dtype(name)
        return t.view(want) if want in _BITCAST else t

    def view(self, prefix: str) -> "ArtifactView":
        return ArtifactView(self, prefix)

    @property
    def meta(self) -> dict:
        return self.attrs.get("meta", {})

    def verify(self) -> list[str]:
        """Names of arrays whose bytes no longer match the checksum recorded at write time."""
        bad = []
        for name, expected in self.attrs.get("checksums", {}).items():
            try:
                if _checksum(np.asarray(self.group[name][...])) != expected:
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

    def get(self, name: str) -> torch.Tensor:
        return self.artifact.get(self.prefix + name)


class ArtifactWriter:
    """Builds an artifact in tmp/; `commit` checks nothing is missing and renames it into place."""

    def __init__(self, store: "Store", key: str, kind: str, inputs: dict, params: Any, algorithm_version: int):
        self.store, self.key = store, key
        self.tmp = store.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.group = zarr.open_group(str(self.tmp), mode="w")
        self.attrs: dict[str, Any] = {
            "kind": kind, "key": key, "inputs": inputs, "params": params,
            "algorithm_version": algorithm_version, "fmerge_version": __version__,
            "tensors": [], "dtypes": {}, "checksums": {}, "meta": {},
        }

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = _to_numpy(tensor)
        parent, _, leaf = name.rpartition("/")
        group = self.group.require_group(parent) if parent else self.group
        chunks = tuple(max(1, s) for s in data.shape)
        arr = group.create_array(leaf, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=None, fill_value=0)
        arr[...] = data
        self.attrs["tensors"].append(name)
        self.attrs["dtypes"][name] = str(tensor.dtype)
        self.attrs["checksums"][name] = _checksum(data)

    def commit(self, meta: dict | None = None) -> Artifact:
        self.attrs["meta"] = meta or {}
        self.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.group.attrs["fmerge"] = json.loads(json.dumps(self.attrs, default=str))
        final = self.store.path(self.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.tmp, final)
        except OSError:
            # Another process committed the same key first: same inputs, same content; keep theirs.
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not self.store.has(self.key):
                raise
        return Artifact(final)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """The artifact store rooted at a directory (default ./artifacts)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        try:
            for sub in ("objects", "tmp", "locks", "cache"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FmergeError(f"Artifact store {self.root} cannot be created or written ({exc.strerror}); "
                              f"choose another with --store or FMERGE_STORE.")
        if not os.access(self.root / "objects", os.W_OK):
            raise FmergeError(f"Artifact store {self.root} is not writable; choose another with --store or FMERGE_STORE.")

    def path(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / key

    def has(self, key: str) -> bool:
        return (self.path(key) / "zarr.json").is_file()

    def open(self, key: str) -> Artifact:
        if not self.has(key):
            matches = [i for i in self.list() if i.key.startswith(key)] if len(key) >= 4 else []
            if len(matches) == 1:
                return Artifact(matches[0].path)
            hint = f" ({len(matches)} artifacts start with it)" if matches else ""
            raise FmergeError(f"No artifact '{key}' in store {self.root}{hint}; `fmerge ls` lists them.")
        return Artifact(self.path(key))

    def writer(self, key: str, kind: str, inputs: dict, params: Any, algorithm_version: int) -> ArtifactWriter:
        return ArtifactWriter(self, key, kind, inputs, params, algorithm_version)

    def lock(self, key: str) -> FileLock:
        """Held while computing `key`, so concurrent runs compute each artifact once."""
        return FileLock(str(self.root / "locks" / f"{key}.lock"))

    def list(self) -> Iterator[ArtifactInfo]:
        for path in sorted((self.root / "objects").glob("*/*")):
            try:
                attrs = json.loads((path / "zarr.json").read_text())["attributes"]["fmerge"]
            except (OSError, KeyError, json.JSONDecodeError):
                continue
            yield ArtifactInfo(path.name, attrs["kind"], attrs.get("created", ""), path, attrs)

    def remove(self, key: str) -> None:
        path = self.path(key)
        trash = self.root / "tmp" / f"{key}.{os.getpid()}.deleted-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)  # atomic: the artifact vanishes whole, then the bytes go
        shutil.rmtree(trash, ignore_errors=True)

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted writes (never trusted, never listed).

        A temporary entry is named KEY.PID.RANDOM; those of a live process are left alone.
        """
        n = 0
        for p in (self.root / "tmp").iterdir():
            parts = p.name.split(".")
            if len(parts) >= 3 and parts[1].isdigit() and _alive(int(parts[1])):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
        return n

    @property
    def hash_cache_file(self) -> Path:
        return self.root / "cache" / "model_hashes.json"
