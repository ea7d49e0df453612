"""Reading and writing model weights tensor by tensor.

Models are read lazily from memory-mapped safetensors so a merge of N models holds about one
tensor per model at a time. Output is written by a streaming safetensors writer: the header is
known from shapes and dtypes before any data exists, so tensors go to disk as they are produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import torch

from .errors import FmergeError

WEIGHT_FILE_RE = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.safetensors$")
PICKLE_FILE_RE = re.compile(r"^(pytorch_model|model)(-\d+-of-\d+)?\.(bin|pt|pth)$")
INDEX_FILE_RE = re.compile(r"^(model|pytorch_model|adapter_model)\.(safetensors|bin)\.index\.json$")
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)-of-(?P<m>\d+)\.(?P<ext>[a-z]+)$")
# Files copied from the base model into an exported model directory.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "preprocessor_config.json", "sentencepiece.bpe.model", "spiece.model",
)

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
DTYPE_NAMES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str, where: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise FmergeError(f"{where}: unknown dtype '{name}'; use one of {', '.join(DTYPE_NAMES)}.")
    return DTYPE_NAMES[name]


class TensorSource(Protocol):
    """Anything that serves named tensors lazily: a model directory or a store artifact."""

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int = -1  # byte range of the data in a safetensors file
    end: int = -1


_ST_TO_TORCH = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class ModelDir:
    """The weights of a Hugging Face model directory, memory-mapped, read one tensor at a time."""

    def __init__(self, path: Path | str, *, allow_pickle: bool = False, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(self.path)
        if not self.path.is_dir():
            raise FmergeError(f"Model '{self.label}': directory {self.path} does not exist.")
        self.files = sorted(p for p in self.path.iterdir() if WEIGHT_FILE_RE.match(p.name))
        self._pickled: dict[str, torch.Tensor] | None = None
        self._entries: dict[str, _Entry] = {}
        self._files: dict[Path, object] = {}
        indexes = sorted(p for p in self.path.iterdir() if INDEX_FILE_RE.match(p.name) and p.is_file())
        st_index = [p for p in indexes if ".safetensors." in p.name]
        if self.files or st_index:
            weight_map = self._check_index(st_index, self.files)
            for f in self.files:
                self._index_safetensors(f)
            self._check_tensors_in_index(weight_map)
        else:
            pickles = sorted(p for p in self.path.iterdir() if PICKLE_FILE_RE.match(p.name))
            if not pickles:
                raise FmergeError(
                    f"Model '{self.label}': no weights in {self.path} (expected model.safetensors "
                    f"or model-0000N-of-0000M.safetensors)."
                )
            if not allow_pickle:
                raise FmergeError(
                    f"Model '{self.label}': {self.path} holds only pickle checkpoints "
                    f"({', '.join(p.name for p in pickles)}). Pickle files can run code when "
                    f"loaded; convert them to safetensors, or pass --allow-pickle to load them "
                    f"with torch's weights-only loader."
                )
            weight_map = self._check_index([p for p in indexes if ".bin." in p.name], pickles)
            self._load_pickles(pickles)
            self._check_tensors_in_index(weight_map)

    def _index_safetensors(self, file: Path) -> None:
        try:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            file_size = file.stat().st_size
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FmergeError(f"Model '{self.label}': {file} is not a readable safetensors file ({exc}).")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_TO_TORCH:
                raise FmergeError(f"Model '{self.label}': tensor '{name}' in {file} has unsupported dtype {info['dtype']}.")
            dtype, shape = _ST_TO_TORCH[info["dtype"]], tuple(info["shape"])
            start, end = (8 + n + int(o) for o in info["data_offsets"])
            if end - start != nbytes(dtype, shape) or end > file_size:
                raise FmergeError(f"Model '{self.label}': tensor '{name}' in {file} has a byte range that does not "
                                  f"match its shape {list(shape)} or lies past the end of the file (truncated?).")
            self._add(name, _Entry(file, shape, dtype, start, end))

    def _load_pickles(self, files: list[Path]) -> None:
        self._pickled = {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # UnpicklingError for objects beyond plain tensors, or a bad file
                raise FmergeError(
                    f"Model '{self.label}': {f} could not be loaded as a plain tensor checkpoint with "
                    f"torch's weights-only loader ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                    f"fmerge never unpickles arbitrary objects; convert the checkpoint to safetensors."
                ) from exc
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise FmergeError(f"Model '{self.label}': {f} is not a state dict of tensors.")
            for name, t in state.items():
                self._add(name, _Entry(f, tuple(t.shape), t.dtype))
                self._pickled[name] = t

    def _add(self, name: str, entry: _Entry) -> None:
        """Record a tensor; one held by two weight files is ambiguous and refused, never last-wins."""
        other = self._entries.get(name)
        if other is not None:
            raise FmergeError(
                f"Model '{self.label}': tensor '{name}' is in two weight files, {other.file.name} and "
                f"{entry.file.name} (in {self.path}), so which one is meant is ambiguous. This usually means "
                f"a stale file from an earlier save sits beside the current one: remove the file that does "
                f"not belong to the checkpoint (compare with its model.safetensors.index.json, if any)."
            )
        self._entries[name] = entry

    def _check_index(self, indexes: list[Path], files: list[Path]) -> dict[str, str] | None:
        """Check the shard files against the index (if any) and against their N-of-M names.

        With an index, every shard it names must exist and every weight file present must be one
        of them; without one, `model-0000N-of-0000M` files must be all M shards of one save.
        Returns the index's weight map (tensor -> shard file name), or None without an index.
        """
        if len(indexes) > 1:
            raise FmergeError(
                f"Model '{self.label}': {self.path} has {len(indexes)} index files "
                f"({', '.join(p.name for p in indexes)}); fmerge reads one checkpoint per directory. "
                f"Remove the index (and shards) that do not belong to this model."
            )
        weight_map = None
        present = {f.name for f in files}
        if indexes:
            index = indexes[0]
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise FmergeError(f"Model '{self.label}': {index} is not a readable shard index (a JSON "
                                  f"object with a 'weight_map'): {type(exc).__name__}: {exc}. Restore the "
                                  f"file from the model's source, or remove it if the shards are complete.")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v for k, v in weight_map.items()):
                raise FmergeError(f"Model '{self.label}': the 'weight_map' of {index} must map tensor names to "
                                  f"shard file names in {self.path}. Restore the file from the model's source.")
            by_shard: dict[str, list[str]] = {}
            for tensor, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(tensor)
            absent = sorted(s for s in by_shard if s not in present)
            if absent:
                tensors = [t for s in absent for t in by_shard[s]]
                raise FmergeError(
                    f"Model '{self.label}': {index.name} names shard file(s) missing from {self.path}: "
                    f"{', '.join(absent)}, which hold {len(tensors)} tensor(s) ({few(tensors)}). "
                    f"The checkpoint is incomplete (an interrupted download or copy?); fetch the missing "
                    f"shard(s) again. fmerge never merges a model with tensors missing from it."
                )
            unlisted = sorted(present - set(by_shard))
            if unlisted:
                raise FmergeError(
                    f"Model '{self.label}': weight file(s) {', '.join(unlisted)} in {self.path} are not named "
                    f"in {index.name}, so it is unclear whether they belong to the checkpoint (a stale file "
                    f"from an earlier save?). Remove or move them, or add their tensors to the index's weight_map."
                )
        shards: dict[tuple[str, str], dict[int, set[int]]] = {}
        for name in present:
            if m := SHARD_RE.match(name):
                shards.setdefault((m["stem"], m["ext"]), {}).setdefault(int(m["m"]), set()).add(int(m["n"]))
        for (stem, ext), by_total in sorted(shards.items()):
            if len(by_total) > 1:
                raise FmergeError(
                    f"Model '{self.label}': {self.path} mixes shards of different saves ({stem}-*-of-"
                    f"{', -of-'.join(f'{t:05d}' for t in sorted(by_total))}.{ext}). Remove the shards that do "
                    f"not belong to the current checkpoint."
                )
            (total, have), = by_total.items()
            lacking = [f"{stem}-{n:05d}-of-{total:05d}.{ext}" for n in range(1, total + 1) if n not in have]
            if lacking:
                raise FmergeError(
                    f"Model '{self.label}': shard file(s) {', '.join(lacking)} missing from {self.path} "
                    f"(the names say there are {total} shards, {len(have)} are present). The checkpoint is "
                    f"incomplete (an interrupted download or copy?); fetch the missing shard(s) again."
                )
        return weight_map

    def _check_tensors_in_index(self, weight_map: dict[str, str] | None) -> None:
        """Every tensor the index names is in the shard it is mapped to, and no shard holds more."""
        if weight_map is None:
            return
        misplaced = [f"'{t}' (index: {shard}, " + (f"found in {self._entries[t].file.name})" if t in self._entries else "found nowhere)")
                     for t, shard in weight_map.items()
                     if t not in self._entries or self._entries[t].file.name != shard]
        extra = [t for t in self._entries if t not in weight_map]
        if misplaced or extra:
            parts = []
            if misplaced:
                parts.append(f"{len(misplaced)} tensor(s) of the index are not in the shard it names: "
                             f"{'; '.join(misplaced[:3])}{f' and {len(misplaced) - 3} more' if len(misplaced) > 3 else ''}")
            if extra:
                parts.append(f"{len(extra)} tensor(s) in the shards are not in the index ({few(extra)})")
            raise FmergeError(
                f"Model '{self.label}': its shard index and shard files in {self.path} disagree: "
                f"{'; and '.join(parts)}. The checkpoint is inconsistent (shards from different saves, or a "
                f"hand-edited index); fetch or save the model again."
            )

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def get(self, name: str) -> torch.Tensor:
        """A fresh tensor read with pread, not a view of a memory map: pages of files already merged
        do not stay mapped into the process (and counted in its resident memory)."""
        if self._pickled is not None:
            return self._pickled[name]
        e = self._entries[name]
        size = e.end - e.start
        if size == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        fh = self._files.get(e.file)
        if fh is None:
            fh = self._files[e.file] = open(e.file, "rb", buffering=0)
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:
            got = os.preadv(fh.fileno(), [view[done:]], e.start + done)
            if got == 0:
                raise FmergeError(f"Model '{self.label}': {e.file} ended while reading tensor '{name}' (truncated?).")
            done += got
        return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)

    @property
    def fresh_tensors(self) -> bool:
        """Whether `get` returns a new tensor each call (safetensors), not a shared one (pickles)."""
        return self._pickled is None

    def weight_files(self) -> list[Path]:
        return self.files or sorted({e.file for e in self._entries.values()})


def few(names: list[str], shown: int = 3) -> str:
    """'a', 'b', 'c' and 4 more: the first names of a list, quoted, and how many are left out."""
    head = ", ".join(f"'{n}'" for n in names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def content_hash(source: TensorSource) -> str:
    """Hash of the tensors' names, dtypes, shapes and bytes: resharding keeps it, any byte changes it."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(source.names()):
        t = source.get(name).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


class HashCache:
    """Remembers a model's content hash by its weight files' path, size and mtime (in `file`,
    which is only read when `write` is false: a store opened read-only is never written)."""

    def __init__(self, file: Path, write: bool = True):
        self.file, self.write = file, write

    def _load(self) -> dict:
        try:
            return json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def hash_model(self, model: ModelDir) -> str:
        stamp = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in model.weight_files()]
        cache_id = hashlib.blake2b(json.dumps(stamp).encode(), digest_size=16).hexdigest()
        cached = self._load().get(cache_id)
        if cached:
            return cached
        digest = content_hash(model)
        if not self.write:
            return digest
        try:
            from filelock import FileLock

            self.file.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.file) + ".lock"):
                data = self._load()
                data[cache_id] = digest
                tmp = self.file.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(data, indent=0))
                os.replace(tmp, self.file)
        except OSError:
            pass  # a read-only store still merges; it just hashes again next time
        return digest


# ---------------------------------------------------------------------------------------------
# Writing


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def _header_bytes(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset, sizes = 0, []
    for name, dtype, shape in layout:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose layout is declared up front; tensors arrive in order.

    The file's SHA-256 (the Hugging Face hub's LFS object id) is computed as it is written, so an
    export's manifest costs no second read of the weights."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = path
        self.layout = layout
        header, self.sizes = _header_bytes(layout, metadata or {})
        self.sha256 = hashlib.sha256(header)
        self.fh = open(path, "xb")  # a fresh file in a directory fmerge made: never anyone else's
        self.fh.write(header)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.layout[self.next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"writer expected {exp_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.size:
            self.sha256.update(memoryview(data))
            self.fh.write(memoryview(data))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.layout):
            raise RuntimeError(f"{self.path}: {len(self.layout) - self.next} tensors never written")
        self.fh.close()

    @property
    def digest(self) -> str:
        return self.sha256.hexdigest()


def plan_shards(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for entry in layout:
        entry_bytes = nbytes(entry[1], entry[2])
        if shards[-1] and size + entry_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry_bytes
    return shards


def write_weight_files(
    dir: Path,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    max_shard_bytes: int = 5 * 2**30,
) -> dict[str, str]:
    """Write `model.safetensors` (or N shards and their index) into the existing directory `dir`,
    streaming `tensors` (which must yield in `layout` order). Returns {file name: SHA-256} of the
    weight files. Only fmerge.export calls this for exports: it owns where `dir` is and what may
    be replaced; benchmarks use it to make input models."""
    shards = plan_shards(layout, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    it = iter(tensors)
    weight_map, digests = {}, {}
    for shard, fname in zip(shards, names):
        w = StreamingSafetensorsWriter(Path(dir) / fname, shard, metadata)
        try:
            for _ in shard:
                name, t = next(it)
                w.write(name, t)
                weight_map[name] = fname
        finally:
            w.fh.close()
        w.close()
        digests[fname] = w.digest
    if len(shards) > 1:
        total = sum(nbytes(d, s) for _, d, s in layout)
        (Path(dir) / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return digests
