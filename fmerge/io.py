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
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from .errors import FmergeError

WEIGHT_FILE_RE = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.safetensors$")
PICKLE_FILE_RE = re.compile(r"^(pytorch_model|model)(-\d+-of-\d+)?\.(bin|pt|pth)$")
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
        if self.files:
            for f in self.files:
                self._index_safetensors(f)
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
            self._load_pickles(pickles)

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
            self._entries[name] = _Entry(file, shape, dtype, start, end)

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
                self._pickled[name] = t
                self._entries[name] = _Entry(f, tuple(t.shape), t.dtype)

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
    """Remembers a model's content hash by its weight files' path, size and mtime."""

    def __init__(self, file: Path):
        self.file = file

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
    """Writes one safetensors file whose layout is declared up front; tensors arrive in order."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = path
        self.layout = layout
        header, self.sizes = _header_bytes(layout, metadata or {})
        self.fh = open(path, "wb")
        self.fh.write(header)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.layout[self.next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"writer expected {exp_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.size:
            self.fh.write(memoryview(data))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.layout):
            raise RuntimeError(f"{self.path}: {len(self.layout) - self.next} tensors never written")
        self.fh.close()


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


def write_model_dir(
    out: Path,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    side_files_from: Path | None,
    readme: str,
    metadata: dict[str, str],
    max_shard_bytes: int = 5 * 2**30,
    finish: Callable[[Path], None] | None = None,
) -> None:
    """Write a Hugging Face model directory (sharded safetensors + index), streaming tensors.

    `tensors` must yield in `layout` order; `finish(dir)` adds files of the caller's. The directory
    is built aside and moved into place, so `out` is either the old export or the complete new one,
    never a mix.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shards = plan_shards(layout, max_shard_bytes)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        it = iter(tensors)
        weight_map = {}
        for shard, fname in zip(shards, names):
            w = StreamingSafetensorsWriter(tmp / fname, shard, metadata)
            for _ in shard:
                name, t = next(it)
                w.write(name, t)
                weight_map[name] = fname
            w.close()
        if len(shards) > 1:
            total = sum(nbytes(d, s) for _, d, s in layout)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        if side_files_from is not None:
            for fname in SIDE_FILES:
                src = Path(side_files_from) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
        (tmp / "README.md").write_text(readme)
        if finish is not None:
            finish(tmp)
        _swap_into_place(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FmergeError(f"Exporting the model to {out} failed: {exc.strerror or exc}. The partial export was "
                          f"removed{' and the previous one kept' if out.exists() else ''}; free space or "
                          f"choose another export directory, then run again.") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_dead_leftovers(out: Path) -> None:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` beside `out` left by exports killed midway."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        stem, _, pid = p.name.rpartition("-")
        if stem in (f".{out.name}.tmp", f".{out.name}.old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
