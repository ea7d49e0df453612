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
import platform
import re
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
# Keys are hex digests; anything with '/', '..' or a leading dot could name a path outside the store.
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def library_versions() -> dict[str, str]:
    """Versions that can change an artifact's bytes, recorded with it for reproducibility."""
    versions = {"fmerge": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "zarr": zarr.__version__}
    try:  # from the installed metadata: importing transformers here would cost seconds per run
        from importlib.metadata import version

        versions["transformers"] = version("transformers")
    except ImportError:
        pass
    return versions


def _write_error(exc: OSError, store_root: Path, what: str) -> FmergeError:
    """A failed write (disk full, permissions) as one paragraph naming the store and the artifact."""
    reason = exc.strerror or str(exc)
    hint = " Free some space" if exc.errno in (28, 122) else " Check the store's permissions"  # ENOSPC, EDQUOT
    return FmergeError(f"Writing {what} to artifact store {store_root} failed: {reason}. Nothing was "
                       f"committed and the partial write was removed.{hint}, or choose another store with "
                       f"--store or FMERGE_STORE, then run again: finished artifacts are reused.")


def make_key(kind: str, params: Any, inputs: dict[str, Any], algorithm_version: int) -> str:
    """Canonical JSON of everything that determines an artifact's content, hashed."""
    payload = json.dumps(
        {"kind": kind, "params": params, "inputs": inputs, "version": algorithm_version},
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def _checksum(array: np.ndarray) -> str:
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # hashed in place, no bytes copy
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


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
        checksums = self.attrs.get("checksums", {})
        bad = [n for n in self.attrs.get("tensors", []) if n not in checksums]  # no checksum: untrusted
        for name, expected in checksums.items():
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
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(str(self.tmp), mode="w")
        except OSError as exc:
            self.abort()
            raise _write_error(exc, store.root, f"artifact {key[:12]} ({kind})") from exc
        self.attrs: dict[str, Any] = {
            "kind": kind, "key": key, "inputs": inputs, "params": params,
            "algorithm_version": algorithm_version, "fmerge_version": __version__,
            "versions": library_versions(), **store.provenance,
            "tensors": [], "dtypes": {}, "checksums": {}, "meta": {},
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

    def commit(self, meta: dict | None = None) -> Artifact:
        self.attrs["meta"] = meta or {}
        self.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        final = self.store.path(self.key)
        try:
            self.group.attrs["fmerge"] = json.loads(json.dumps(self.attrs, default=str))
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

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        """Whatever fails (or interrupts) before `commit` leaves nothing behind."""
        if exc_type is not None:
            self.abort()


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
        # Recorded in every artifact written through this store (e.g. the recipe that asked for it).
        self.provenance: dict[str, Any] = {}

    def path(self, key: str) -> Path:
        if not KEY_RE.match(key):
            raise FmergeError(f"'{key}' is not an artifact key (keys are letters and digits, as `fmerge ls` "
                              f"shows them); store {self.root}.")
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
        self.path(key)  # validates the key
        return FileLock(str(self.root / "locks" / f"{key}.lock"))

    def list(self) -> Iterator[ArtifactInfo]:
        for path in sorted((self.root / "objects").glob("*/*")):
            try:
                attrs = json.loads((path / "zarr.json").read_text())["attributes"]["fmerge"]
            except (OSError, KeyError, json.JSONDecodeError):
                continue
            yield ArtifactInfo(path.name, attrs["kind"], attrs.get("created", ""), path, attrs)

    def find(self, kind: str, **meta: Any) -> list[ArtifactInfo]:
        """Committed artifacts of `kind` whose meta holds every given key=value (a full scan)."""
        found = []
        for info in self.list():
            got = info.attrs.get("meta", {})
            if info.kind == kind and all(got.get(k) == v for k, v in meta.items()):
                found.append(info)
        return found

    def verify(self) -> list["BadArtifact"]:
        """Every entry of objects/ that is not a complete artifact matching its write-time checksums."""
        bad = []
        for path in sorted((self.root / "objects").glob("*/*")):
            kind = step = ""
            try:
                art = Artifact(path)
                kind, step = art.kind, art.meta.get("step", "")
                if art.key != path.name:
                    problem = f"its attributes name key {art.key}"
                else:
                    wrong = art.verify()
                    problem = (f"{len(wrong)} tensor(s) differ from their checksums: " + ", ".join(wrong[:3])
                               + (" ..." if len(wrong) > 3 else "")) if wrong else ""
            except Exception as exc:  # unreadable metadata: nothing in it can be trusted
                problem = f"unreadable ({type(exc).__name__}: {exc})"
            if problem:
                bad.append(BadArtifact(path.name, kind, step, path, problem))
        return bad

    def remove_path(self, path: Path) -> None:
        """Remove an entry of objects/, whatever state it is in: it vanishes whole (an atomic
        rename into tmp/), then its bytes go."""
        trash = self.root / "tmp" / f"{path.name}.{os.getpid()}.deleted-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, key: str) -> None:
        self.remove_path(self.path(key))

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
