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
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from .errors import ModelError, RecipeError, quoted
from .fingerprint import file_stamp

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
        raise RecipeError(f"{where}: unknown dtype '{name}'; use one of {', '.join(DTYPE_NAMES)}.")
    return DTYPE_NAMES[name]


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
DEFAULT_SHARD_SIZE = "5GB"  # save_pretrained's default max_shard_size


def parse_byte_size(text: str | int, where: str) -> int:
    """'2GB' (10^9 bytes, as save_pretrained reads it), '500MiB' (2^20) or a plain number of bytes."""
    m = _SIZE_RE.match(str(text))
    size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()]) if m else 0
    if size < 1:
        raise RecipeError(f"{where}: {quoted(str(text))} is not a size; write a positive number of bytes with a "
                          f"unit, e.g. 2GB, 500MB or 4GiB (GB = 10^9 bytes, GiB = 2^30, as save_pretrained reads them).")
    return size


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
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in SAFETENSORS_DTYPES}
# safetensors' own reader refuses headers over 100 MB; fmerge reads no index file larger either.
MAX_HEADER_BYTES = 100 * 2**20
MAX_DIMS = 64  # no real tensor has more; bounds the work of checking a shape

# Tensors are stored under their names as paths (store: `weights/<name>`), so a name is one path
# component: a '/' would nest it (and `a` beside `a/b` would collide), '..' would climb out.
TENSOR_NAME_RULE = ("fmerge stores each tensor under its name as a path, so a tensor name must be 1 to 255 bytes "
                    "of UTF-8 text without '/', '\\' or control characters, and not '.', '..' or 'zarr.json'.")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def tensor_name_problem(name: object) -> str | None:
    """Why `name` cannot be a tensor name fmerge stores (see TENSOR_NAME_RULE), or None."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode text (it holds a lone surrogate)"
    if size > 255:
        return f"is {size} bytes long"
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\')"
    if m := _CONTROL_RE.search(name):
        return f"contains the control character U+{ord(m.group()):04X}"
    if name in (".", "..", "zarr.json"):
        return "is a name reserved for paths"
    return None


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _is_count(value: object) -> bool:
    """A JSON whole number (not a boolean, a float or a string)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _not_a_regular_file(path: Path) -> str | None:
    """Why `path` (links followed) is not a regular file to read, or None. Checked before opening:
    opening a FIFO blocks forever and a device never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return "does not exist (removed while fmerge was reading the directory?)"
    except OSError as exc:
        return f"cannot be examined ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
            "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    return f"is {kind}" + (f" (through the link to {os.readlink(path)})" if os.path.islink(path) else "")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: (name, dtype, shape, start, end) per tensor, with absolute byte
    offsets of its data in the file, and the file's `__metadata__`."""

    tensors: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]
    metadata: dict[str, str]


def read_safetensors_header(file: Path, what: str) -> SafetensorsHeader:
    """Parse and check the header of the safetensors file `file`, before anything is allocated or
    read from its data: a length within the file (and within 100 MB), UTF-8 JSON of bounded depth
    with no key twice, an object whose entries each have a known dtype, a shape of non-negative
    whole numbers and [begin, end] offsets within the data whose span is the shape's size, and
    which cover the data exactly, without overlaps or gaps (as the safetensors library requires).
    Raises ModelError naming `what` (e.g. "Model 'a'"), the file and the tensor at fault."""

    def bad(detail: str) -> ModelError:
        return ModelError(f"{what}: {file} is not a readable safetensors file: {detail}. The file is damaged "
                          f"(an interrupted download or copy?) or was not written by a safetensors library; "
                          f"fetch or save the model again.")

    problem = _not_a_regular_file(file)
    if problem:
        raise bad(f"it {problem}")
    try:
        # O_NONBLOCK: should the file have become a FIFO since it was examined, opening does not block
        with os.fdopen(os.open(file, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise bad("it is not a regular file (it was replaced while fmerge read it?)")
            size = st.st_size
            if size < 8:
                raise bad(f"it is {size} byte(s) long, shorter than the 8-byte header length every safetensors "
                          f"file starts with (empty or truncated?)")
            first = fh.read(8)
            if len(first) != 8:
                raise bad("it ended while its header length was read (truncated while fmerge read it?)")
            (n,) = struct.unpack("<Q", first)
            if n > size - 8:
                raise bad(f"its first 8 bytes give a header length of {n} bytes, but only {size - 8} bytes follow "
                          f"(truncated?)")
            if n > MAX_HEADER_BYTES:
                raise bad(f"its header would be {n} bytes long; fmerge reads headers of at most "
                          f"{MAX_HEADER_BYTES // 2**20} MB, as the safetensors library does")
            raw = fh.read(n)
    except OSError as exc:
        raise bad(f"it cannot be read ({exc.strerror or exc})") from None
    if len(raw) != n:
        raise bad("it ended while its header was read (truncated while fmerge read it?)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise bad(f"its {n}-byte header is not UTF-8 text (byte {exc.start} is not)") from None
    except RecursionError:
        raise bad("its header nests JSON deeper than fmerge parses (a safetensors header is an object of "
                  "objects, three levels deep)") from None
    except _DuplicateKey as exc:
        raise bad(f"its header names the key {quoted(exc.args[0], 80)} twice") from None
    except ValueError as exc:  # json.JSONDecodeError, or a number of thousands of digits
        raise bad(f"its header is not valid JSON ({quoted(str(exc), 120)})") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {_json_type(header)}, not an object mapping tensor names to "
                  f"{{dtype, shape, data_offsets}}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        odd = (f"a JSON {_json_type(metadata)}" if not isinstance(metadata, dict) else
               next(f"{quoted(k, 60)} maps to a JSON {_json_type(v)}" for k, v in metadata.items() if not isinstance(v, str)))
        raise bad(f"its __metadata__ must map strings to strings, but it is {odd}" if not isinstance(metadata, dict)
                  else f"its __metadata__ must map strings to strings, but {odd}")
    data_size = size - 8 - n
    tensors = []
    for name, info in header.items():
        tensor = f"tensor {quoted(name, 80)}"
        if not isinstance(info, dict):
            raise bad(f"{tensor} is described by a JSON {_json_type(info)}, not an object with dtype, shape "
                      f"and data_offsets")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise bad(f"{tensor} has no {' and no '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_TO_TORCH:
            raise bad(f"{tensor} has dtype {quoted(dtype, 40)}, which fmerge does not read (it reads "
                      f"{', '.join(_ST_TO_TORCH)})")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
            raise bad(f"{tensor} has shape {quoted(shape, 80)}, where a list of at most {MAX_DIMS} whole numbers "
                      f"is expected")
        if any(d < 0 for d in shape):
            raise bad(f"{tensor} has shape {quoted(shape, 80)}, with a negative dimension")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise bad(f"{tensor} has data_offsets {quoted(offsets, 80)}, where [begin, end], two whole numbers, "
                      f"is expected")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise bad(f"{tensor} has data_offsets [{quoted(begin, 30)}, {quoted(end, 30)}], which do not lie in "
                      f"order within the {data_size} bytes of data after the header (truncated?)")
        numel = 1
        for d in shape:
            numel *= d
        need = numel * _ITEMSIZE[_ST_TO_TORCH[dtype]]
        if end - begin != need:
            raise bad(f"{tensor} has {end - begin} bytes of data (data_offsets [{begin}, {end}]), but its shape "
                      f"{shape} of {dtype} takes {quoted(need, 40)} bytes")
        tensors.append((name, _ST_TO_TORCH[dtype], tuple(shape), begin, end))
    pos, prev = 0, None
    for name, _, _, begin, end in sorted(tensors, key=lambda t: (t[3], t[4])):
        if begin < pos:
            raise bad(f"the data of tensor {quoted(name, 80)} (bytes {begin} to {end}) overlaps that of tensor "
                      f"{quoted(prev, 80)}")
        if begin > pos:
            raise bad(f"bytes {pos} to {begin} of its data belong to no tensor (before tensor {quoted(name, 80)})")
        pos, prev = end, name
    if pos != data_size:
        raise bad(f"the last {data_size - pos} bytes of its data belong to no tensor")
    start = 8 + n
    return SafetensorsHeader([(nm, dt, sh, start + b, start + e) for nm, dt, sh, b, e in tensors], metadata)


# A source of uninitialised uint8 buffers of a given size (`ModelDir.get`, `Artifact.get`).
Allocator = Callable[[int], torch.Tensor]


def new_buffer(size: int) -> torch.Tensor:
    """An uninitialised uint8 buffer of `size` bytes: what a tensor is read into by default."""
    return torch.empty(size, dtype=torch.uint8)


def pread_exactly(fd: int, view: memoryview, offset: int) -> bool:
    """Fill `view` from file descriptor `fd` at `offset` (pread, as often as it takes; no mapping
    stays behind); False if the file ends first."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            return False
        done += got
    return True


class ModelDir:
    """The weights of a Hugging Face model directory, memory-mapped, read one tensor at a time."""

    def __init__(self, path: Path | str, *, allow_pickle: bool = False, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(self.path)
        if not self.path.is_dir():
            what = "is not a directory" if os.path.lexists(self.path) else "does not exist"
            raise ModelError(f"Model '{self.label}': {self.path} {what}; a model is a directory holding "
                             f"model.safetensors (or its shards) and config.json.")
        try:
            entries = sorted(self.path.iterdir())
        except OSError as exc:
            raise ModelError(f"Model '{self.label}': the directory {self.path} cannot be listed "
                             f"({exc.strerror or exc}); check its permissions.") from None
        self.files = [p for p in entries if WEIGHT_FILE_RE.match(p.name)]
        self._pickled: dict[str, torch.Tensor] | None = None
        self._entries: dict[str, _Entry] = {}
        self._files: dict[Path, object] = {}
        indexes = [p for p in entries if INDEX_FILE_RE.match(p.name) and p.is_file()]
        st_index = [p for p in indexes if ".safetensors." in p.name]
        if self.files or st_index:
            weight_map = self._check_index(st_index, self.files)
            for f in self.files:
                self._index_safetensors(f)
            self._check_tensors_in_index(weight_map)
        else:
            pickles = [p for p in entries if PICKLE_FILE_RE.match(p.name)]
            if not pickles:
                raise ModelError(
                    f"Model '{self.label}': no weights in {self.path} (expected model.safetensors "
                    f"or model-0000N-of-0000M.safetensors)."
                )
            if not allow_pickle:
                raise ModelError(
                    f"Model '{self.label}': {self.path} holds only pickle checkpoints "
                    f"({', '.join(p.name for p in pickles)}). Pickle files can run code when "
                    f"loaded; convert them to safetensors, or pass --allow-pickle to load them "
                    f"with torch's weights-only loader."
                )
            weight_map = self._check_index([p for p in indexes if ".bin." in p.name], pickles)
            self._load_pickles(pickles)
            self._check_tensors_in_index(weight_map)

    def _index_safetensors(self, file: Path) -> None:
        for name, dtype, shape, start, end in read_safetensors_header(file, f"Model '{self.label}'").tensors:
            self._add(name, _Entry(file, shape, dtype, start, end))

    def _load_pickles(self, files: list[Path]) -> None:
        self._pickled = {}
        for f in files:
            problem = _not_a_regular_file(f)
            if problem:
                raise ModelError(f"Model '{self.label}': {f} {problem}; fmerge reads weights only from regular "
                                 f"files. Replace it with the checkpoint file itself.")
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # UnpicklingError for objects beyond plain tensors, or a bad file
                raise ModelError(
                    f"Model '{self.label}': {f} could not be loaded as a plain tensor checkpoint with "
                    f"torch's weights-only loader ({type(exc).__name__}: {quoted(str(exc).splitlines()[0] if str(exc) else '', 200)}). "
                    f"fmerge never unpickles arbitrary objects; convert the checkpoint to safetensors."
                ) from exc
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ModelError(f"Model '{self.label}': {f} is not a state dict of tensors (a dict mapping "
                                 f"tensor names to tensors); convert the checkpoint to a safetensors file.")
            for name, t in state.items():
                if t.layout != torch.strided or t.is_quantized or t.dtype not in SAFETENSORS_DTYPES:
                    kind = (f"a {t.layout} tensor" if t.layout != torch.strided else
                            "a quantized tensor" if t.is_quantized else f"of dtype {t.dtype}")
                    raise ModelError(
                        f"Model '{self.label}': tensor {quoted(name, 80)} in {f} is {kind}; fmerge merges dense "
                        f"tensors of dtype {', '.join(str(d).replace('torch.', '') for d in SAFETENSORS_DTYPES)}. "
                        f"Convert the checkpoint (dequantize, to_dense) and save it as safetensors.")
                self._add(name, _Entry(f, tuple(t.shape), t.dtype))
                self._pickled[name] = t

    def _add(self, name: str, entry: _Entry) -> None:
        """Record a tensor; one held by two weight files is ambiguous and refused, never last-wins."""
        problem = tensor_name_problem(name)
        if problem:
            raise ModelError(f"Model '{self.label}': the tensor name {quoted(name, 80)} in {entry.file} {problem}. "
                             f"{TENSOR_NAME_RULE} Save the model again with plain names (or remove that tensor).")
        other = self._entries.get(name)
        if other is not None:
            raise ModelError(
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
            raise ModelError(
                f"Model '{self.label}': {self.path} has {len(indexes)} index files "
                f"({', '.join(p.name for p in indexes)}); fmerge reads one checkpoint per directory. "
                f"Remove the index (and shards) that do not belong to this model."
            )
        weight_map = None
        present = {f.name for f in files}
        if indexes:
            index = indexes[0]
            unreadable = (f"Model '{self.label}': {index} is not a readable shard index (a JSON object with a "
                          f"'weight_map' mapping tensor names to shard file names in {self.path})")
            advice = "Restore the file from the model's source, or remove it if the shards are complete."
            try:
                size = index.stat().st_size
                if size > MAX_HEADER_BYTES:
                    raise ModelError(f"{unreadable}: it is {size} bytes long, more than the {MAX_HEADER_BYTES // 2**20} "
                                     f"MB fmerge reads of an index. {advice}")
                weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            except RecursionError:
                raise ModelError(f"{unreadable}: its JSON nests deeper than Python can parse. {advice}") from None
            except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
                raise ModelError(f"{unreadable}: {type(exc).__name__}: {quoted(str(exc), 200)}. {advice}") from None
            if not isinstance(weight_map, dict):
                raise ModelError(f"{unreadable}: its 'weight_map' is a JSON {_json_type(weight_map)}, not an "
                                 f"object. {advice}")
            for k, v in weight_map.items():
                if not isinstance(v, str) or not v or Path(v).name != v or not (WEIGHT_FILE_RE.match(v) or PICKLE_FILE_RE.match(v)):
                    raise ModelError(
                        f"Model '{self.label}': the 'weight_map' of {index} must map tensor names to shard file names "
                        f"in {self.path} (model.safetensors or model-0000N-of-0000M.safetensors, never a path), but "
                        f"it maps {quoted(k, 80)} to {quoted(v, 80)}. {advice}")
            by_shard: dict[str, list[str]] = {}
            for tensor, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(tensor)
            absent = sorted(s for s in by_shard if s not in present)
            if absent:
                tensors = [t for s in absent for t in by_shard[s]]
                raise ModelError(
                    f"Model '{self.label}': {index.name} names shard file(s) missing from {self.path}: "
                    f"{', '.join(absent)}, which hold {len(tensors)} tensor(s) ({few(tensors)}). "
                    f"The checkpoint is incomplete (an interrupted download or copy?); fetch the missing "
                    f"shard(s) again. fmerge never merges a model with tensors missing from it."
                )
            unlisted = sorted(present - set(by_shard))
            if unlisted:
                raise ModelError(
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
                raise ModelError(
                    f"Model '{self.label}': {self.path} mixes shards of different saves ({stem}-*-of-"
                    f"{', -of-'.join(f'{t:05d}' for t in sorted(by_total))}.{ext}). Remove the shards that do "
                    f"not belong to the current checkpoint."
                )
            (total, have), = by_total.items()
            lacking = [f"{stem}-{n:05d}-of-{total:05d}.{ext}" for n in range(1, total + 1) if n not in have]
            if lacking:
                raise ModelError(
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
            raise ModelError(
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

    def get(self, name: str, alloc: Allocator | None = None) -> torch.Tensor:
        """A fresh tensor read with pread, not a view of a memory map: pages of files already merged
        do not stay mapped into the process (and counted in its resident memory). `alloc(nbytes)`
        supplies the uint8 buffer it is read into (a merge recycles them); by default a new one."""
        if self._pickled is not None:
            return self._pickled[name]
        e = self._entries[name]
        size = e.end - e.start
        if size == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        # torch's allocator, not a bytearray: no zero-filling first, aligned, and in huge pages
        # where the CLI turns them on (a fresh bytearray cost 1.9x the read of a warm file)
        buf = (alloc or new_buffer)(size)
        self._read_exactly(name, e.file, memoryview(buf.numpy()), e.start)
        return buf.view(e.dtype).reshape(e.shape)

    def _read_exactly(self, name: str, file: Path, view: memoryview, offset: int) -> None:
        """Fill `view` from `file` at `offset` (pread, as often as it takes), or refuse a short file."""
        fh = self._files.get(file)
        if fh is None:
            fh = self._files[file] = open(file, "rb", buffering=0)
        if not pread_exactly(fh.fileno(), view, offset):
            raise ModelError(f"Model '{self.label}': {file} ended while reading tensor '{name}' (truncated?).")

    def get_as(self, name: str, dtype: torch.dtype, alloc: Allocator | None = None) -> torch.Tensor:
        """A fresh tensor converted to `dtype` (safetensors only), read in pieces through this
        thread's small buffer: no tensor of the file's dtype is ever made whole, which at 1B
        parameters saved a third of a merge's page faults (BENCHMARKS.md). `alloc` as in `get`."""
        e = self._entries[name]
        if e.dtype == dtype:
            return self.get(name, alloc)
        out = (alloc or new_buffer)(nbytes(dtype, e.shape)).view(dtype).reshape(e.shape)
        flat, done = out.view(-1), 0
        block = _staging_block()
        for got in self._pieces(name, e, block):
            count = got // e.dtype.itemsize
            flat[done:done + count].copy_(block[:got].view(e.dtype))
            done += count
        return out

    def _pieces(self, name: str, e, block: torch.Tensor):
        """Read tensor `name` into `block` piece after piece, in file order; yields each piece's size."""
        view, pos = memoryview(block.numpy()), e.start
        piece = max(e.dtype.itemsize, len(view) // e.dtype.itemsize * e.dtype.itemsize)
        while pos < e.end:
            size = min(piece, e.end - pos)
            self._read_exactly(name, e.file, view[:size], pos)
            yield size
            pos += size

    def stream_bytes(self, name: str, consume, block: torch.Tensor) -> None:
        """Hand a safetensors tensor's raw bytes to `consume` in pieces read into `block` (uint8,
        reused), so that hashing a model allocates nothing per tensor."""
        view = memoryview(block.numpy())
        for got in self._pieces(name, self._entries[name], block):
            consume(view[:got])

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
    """BLAKE3 of the tensors' names, dtypes, shapes and bytes, in name order: resharding keeps it,
    any byte changes it. BLAKE3 is cryptographic (a cache key must not be forgeable) and hashes at
    ~5 GB/s per core, so hashing a cold model runs at the disk's speed; a safetensors model's
    bytes go from the file through one reused buffer, never a tensor per entry."""
    import blake3

    h = blake3.blake3()
    block = torch.empty(_READ_BLOCK, dtype=torch.uint8)
    streams = isinstance(source, ModelDir) and source.fresh_tensors
    for name in sorted(source.names()):
        if streams:
            h.update(f"{name}|{source.dtype(name)}|{tuple(source.shape(name))}|".encode())
            source.stream_bytes(name, h.update, block)
            continue
        t = source.get(name).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest(length=16)


_READ_BLOCK = 16 << 20
_STAGING = threading.local()


def _staging_block() -> torch.Tensor:
    """This thread's reusable 16 MiB read buffer (`ModelDir.get_as`)."""
    block = getattr(_STAGING, "block", None)
    if block is None:
        block = _STAGING.block = torch.empty(_READ_BLOCK, dtype=torch.uint8)
    return block


class HashCache:
    """Remembers a model's content hash by its weight files' paths and stat stamps (device, inode,
    size, mtime_ns, ctime_ns; fingerprint.file_stamp), in `file`, which is only read when `write`
    is false: a store opened read-only is never written. The weight files of every model hashed
    are recorded in `files` (what entered the run's keys, `Runtime.key_files`)."""

    def __init__(self, file: Path, write: bool = True):
        self.file, self.write = file, write
        self.files: set[Path] = set()

    def _load(self) -> dict:
        try:
            return json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def hash_model(self, model: ModelDir) -> str:
        self.files.update(f.resolve() for f in model.weight_files())
        stamp = [[str(f.resolve()), file_stamp(f)] for f in model.weight_files()]
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

    The file's xxh3-128 (the store's checksum of a whole file, and the export manifest's) is
    computed as it is written, so neither costs a second read of the weights; `offsets` records
    where each tensor's bytes lie. (SHA-256 here cost ~1 s per GB on a 2-core machine.)"""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        import xxhash

        self.path = path
        self.layout = layout
        header, self.sizes = _header_bytes(layout, metadata or {})
        self.xxh3 = xxhash.xxh3_128(header)
        self.fh = open(path, "xb")  # a fresh file in a directory fmerge made: never anyone else's
        self.fh.write(header)
        self.position = len(header)
        self.offsets: dict[str, tuple[int, int]] = {}  # name -> (start, end) in the file
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.layout[self.next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"writer expected {exp_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.size:
            self.xxh3.update(memoryview(data))
            self.fh.write(memoryview(data))
        self.offsets[name] = (self.position, self.position + data.size)
        self.position += data.size
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.layout):
            raise RuntimeError(f"{self.path}: {len(self.layout) - self.next} tensors never written")
        self.fh.close()

    @property
    def digest(self) -> str:
        return self.xxh3.hexdigest()


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


def shard_file_names(count: int) -> list[str]:
    """The weight file names save_pretrained gives `count` shards."""
    return (["model.safetensors"] if count == 1 else
            [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])


INDEX_FILE = "model.safetensors.index.json"


class WeightFilesWriter:
    """Writes `model.safetensors` (or N shards and their index) into the existing directory `dir`,
    tensor by tensor in `layout` order. After `close`, `files` holds {file name: {size, xxh3_128}}
    of every file written (the index too) and `placement` {tensor: (file, start, end)},
    both computed as the bytes went out: nothing is read back."""

    def __init__(self, dir: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str],
                 max_shard_bytes: int = 5 * 2**30):
        self.dir, self.metadata = Path(dir), metadata
        self.shards = plan_shards(layout, max_shard_bytes)
        self.names = shard_file_names(len(self.shards))
        self.total = sum(nbytes(d, s) for _, d, s in layout)
        self.files: dict[str, dict] = {}
        self.placement: dict[str, tuple[str, int, int]] = {}
        self._shard = -1
        self._writer: StreamingSafetensorsWriter | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None or self._writer.next == len(self._writer.layout):
            self._next_shard()
        self._writer.write(name, tensor)

    def _next_shard(self) -> None:
        self._finish_shard()
        self._shard += 1
        if self._shard >= len(self.shards):
            raise RuntimeError(f"{self.dir}: more tensors written than the layout declares")
        self._writer = StreamingSafetensorsWriter(self.dir / self.names[self._shard], self.shards[self._shard],
                                                  self.metadata)

    def _finish_shard(self) -> None:
        w = self._writer
        if w is None:
            return
        w.close()
        fname = self.names[self._shard]
        self.files[fname] = {"size": w.position, "xxh3_128": w.digest}
        self.placement.update({n: (fname, a, b) for n, (a, b) in w.offsets.items()})
        self._writer = None

    def close(self) -> None:
        """Finish the last shard and write the index (several shards); refuses a short write."""
        import xxhash

        while self._shard < len(self.shards) - 1:  # shards left unstarted: close raises for them
            self._next_shard()
        self._finish_shard()
        if len(self.shards) > 1:
            weight_map = {n: f for n, (f, _, _) in self.placement.items()}
            body = json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2).encode()
            with open(self.dir / INDEX_FILE, "xb") as fh:
                fh.write(body)
            self.files[INDEX_FILE] = {"size": len(body), "xxh3_128": xxhash.xxh3_128(body).hexdigest()}

    def abandon(self) -> None:
        """Close an open file after a failure (the caller removes the directory)."""
        if self._writer is not None:
            self._writer.fh.close()


def write_weight_files(
    dir: Path,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    max_shard_bytes: int = 5 * 2**30,
) -> dict[str, str]:
    """Write `model.safetensors` (or N shards and their index) into the existing directory `dir`,
    streaming `tensors` (which must yield in `layout` order). Returns {file name: xxh3-128} of the
    weight files. Only fmerge.export calls this for exports: it owns where `dir` is and what may
    be replaced; benchmarks use it to make input models."""
    writer = WeightFilesWriter(dir, layout, metadata, max_shard_bytes)
    try:
        for name, t in tensors:
            writer.write(name, t)
        writer.close()
    finally:
        writer.abandon()
    return {f: rec["xxh3_128"] for f, rec in writer.files.items() if f != INDEX_FILE}
