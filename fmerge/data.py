"""Task data through the `datasets` library: load a split, draw a seeded subset, tokenize.

Kept free of the CLI and recipes so the Fisher, RegMean and evaluation steps share one path.

Labels (`label_targets`, the one rule every step that reads labels goes through): a classifier's
labels are class indices within its head (integers, bools, a `datasets.ClassLabel` column, or floats
that are whole numbers), or strings mapped through the data's `label_names` (index = position in
the list) or else through the model's `id2label` when it names every string (transformers' default
`LABEL_0`.. names only where the data says those). There is no silent default: sorting the strings
seen in one subset would shift the indices whenever a class is missing from it. Anything else, out
of range, unknown, fractional or of mixed types, is refused naming the row. A regression head
(num_labels 1) reads finite numbers as targets.

Splits: a directory of split files or a hub dataset has its own splits. A single file is one
split as it stands (`partition=None`), or is cut into named splits by a seeded partition
(`DataSpec.partition`, see `partition_indices`): disjoint, covering every row, the same every
run, so no split silently stands in for another.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import DataError, FmergeError, RecipeError, quoted

# Loader per file extension.
_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# What `datasets` can read out of a directory (its packaged builders), compressed or not: a directory
# holding none of these holds no data.
_LOADABLE = {".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow", ".txt", ".png", ".jpg", ".jpeg", ".gif",
             ".bmp", ".tif", ".tiff", ".webp", ".wav", ".mp3", ".flac", ".ogg"}
_COMPRESSED = {".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4"}
_MAX_LISTED = 10_000  # entries looked at when telling whether a directory holds data
# Optional column holding each row's id for seeding per-example draws (see shard_by_rank).
EXAMPLE_ID_COLUMN = "fmerge_example_id"


@dataclass(frozen=True)
class DataSpec:
    """Where a task's examples live and which columns hold text and labels.

    `path`: a local csv/json/jsonl/parquet file, a directory of such files (splits named by file,
    e.g. train.jsonl, validation.jsonl), or a Hugging Face hub dataset id (needs a network).
    `label_column=None` means unlabelled data (enough for the exact and sampled Fisher).
    `partition`: for a single file, (split name, share) pairs cutting its rows into disjoint
    splits with `partition_seed` (see `partition_indices`); `split` must be one of the names.
    None: a file is read whole as the split asked for (a recipe names such files per split).
    Both enter cache keys: they decide which rows a split holds.
    Language-modelling data: `text_column` (and `prompt_column`), no label. Multiple choice:
    `text_column` the context, `choices_column` the choices, `label_column` the answer's index.
    """

    path: str
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = "label"
    split: str = "train"
    config: str | None = None
    partition: tuple[tuple[str, float], ...] | None = None
    partition_seed: int = 0
    prompt_column: str | None = None  # language modelling: text before `text_column`, not scored
    choices_column: str | None = None  # multiple choice: each row's list of choices; label = the answer's index
    # The content hash of a local path's files (`fingerprint.FileHashes.tree`; hashed here if not
    # given): the datasets library's cache of a build is kept under it (`_cache_dir`).
    content: str | None = None


def partition_sizes(n: int, shares: Sequence[tuple[str, float]]) -> dict[str, int]:
    """Rows per split when n rows are cut by `shares` (largest-remainder rounding): each split
    gets floor(share * n) rows, and the rows left over go one each to the splits with the largest
    fractional parts of share * n, ties to the earlier split (names in sorted order). The sizes
    sum to n; a small share of few rows may round to 0."""
    shares = _check_shares(shares)
    total = sum(r for _, r in shares)
    quotas = [(name, round(r / total * n, 9)) for name, r in shares]
    sizes = {name: int(np.floor(q)) for name, q in quotas}
    left = n - sum(sizes.values())
    by_fraction = sorted(range(len(quotas)), key=lambda i: (-(quotas[i][1] - np.floor(quotas[i][1])), i))
    for i in by_fraction[:left]:
        sizes[quotas[i][0]] += 1
    return sizes


def partition_indices(n: int, shares: Sequence[tuple[str, float]], seed: int) -> dict[str, np.ndarray]:
    """The row indices (ascending, i.e. file order) of each split of a seeded partition of n rows:
    a pure function of (n, shares, seed). The rows are shuffled by
    `np.random.default_rng(seed).permutation(n)`, and the splits, in sorted name order, take
    consecutive blocks of that order of `partition_sizes` rows: disjoint, and together all rows."""
    shares = _check_shares(shares)
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name, size in partition_sizes(n, shares).items():
        out[name] = np.sort(order[start:start + size])
        start += size
    return out


def _check_shares(shares: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    shares = sorted((str(name), float(r)) for name, r in shares)
    names = [name for name, _ in shares]
    if not shares or len(set(names)) != len(names):
        raise RecipeError(f"A partition needs distinct split names with a share each; got {shares}.")
    bad = [f"{name}: {r}" for name, r in shares if not r > 0]
    if bad or abs(sum(r for _, r in shares) - 1) > 1e-6:
        raise RecipeError(f"A partition's shares must each be > 0 and sum to 1; got "
                          f"{', '.join(f'{n}: {r}' for n, r in shares)}.")
    return shares


def describe_partition(shares: Sequence[tuple[str, float]], seed: int) -> str:
    """'train 0.8, validation 0.1, test 0.1 (seed 0)' for messages."""
    return ", ".join(f"{name} {r:g}" for name, r in shares) + f" (seed {seed})"


def _looks_local(path: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a local path."""
    return (
        Path(path).suffix.lower() in _BUILDERS
        or path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or "\\" in path
    )


def load_dataset_split(spec: DataSpec):
    """The split named by `spec` as a `datasets.Dataset`, with its columns checked."""
    import datasets

    where = f"'{spec.path}' (split '{spec.split}')"
    path = Path(spec.path).expanduser()
    _check_local(spec, path)
    full = None
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"Data file '{spec.path}' has extension '{path.suffix}', which fmerge cannot read; "
                    f"use one of {', '.join(sorted(_BUILDERS))}."
                )
            check_text_file(path, builder)
            full = _read_file(datasets, path, builder, _cache_dir(datasets, spec, path))
            if len(full):
                _check_columns(full, spec, where)
            ds = _partitioned(spec, full)
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), spec.config, split=spec.split, cache_dir=_cache_dir(datasets, spec, path))
        elif _looks_local(spec.path):
            raise DataError(
                f"Data file '{spec.path}' does not exist (resolved to '{path.resolve()}'); check the "
                "path in the data spec."
            )
        else:
            ds = datasets.load_dataset(spec.path, spec.config, split=spec.split)
    except FmergeError:
        raise
    except Exception as err:  # datasets wraps many error types; the user needs the root one
        cause = _root_cause(err)
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(
                f"Data file '{spec.path}' is not UTF-8 ({cause.reason} at byte {cause.start}); convert "
                "it, e.g. `iconv -f latin1 -t utf-8`."
            ) from err
        if (path.is_file() and path.stat().st_size == 0) or "corresponds to no data" in str(err):
            raise DataError(f"Dataset {where} has no rows; a Fisher or evaluation needs examples: add rows, or "
                            f"point the data spec at another file.") from err
        if path.is_file() and _BUILDERS.get(path.suffix.lower()) == "json":
            _find_bad_json_line(path)  # raises naming the line, when one is to blame
        unknown = re.search(r"Unknown split \"?([^\".]*)\"?.*one of \[(.*?)\]", str(cause))
        if path.is_dir() and unknown:
            raise DataError(
                f"Data directory '{spec.path}' has no split '{spec.split}' (its splits: "
                f"{unknown.group(2).replace(chr(39), '')}); its files are named after their splits (train.jsonl, "
                f"validation.jsonl, ...). Add a file for '{spec.split}', or ask for one of those splits."
            ) from err
        if path.exists():
            raise DataError(f"Reading the data at {where} failed: {_brief(cause)}. Check that the file holds what "
                            f"its extension says, or convert it to csv, json, jsonl or parquet.") from err
        raise DataError(f"No local file or directory is named so, and loading it as a hub dataset at {where} failed: "
                        f"{_brief(cause)}. Check the path (or the hub id, and the network).") from err
    if len(ds) == 0:
        if spec.partition is not None and path.is_file() and full is not None and len(full):
            raise DataError(
                f"Data file '{spec.path}': its partition {describe_partition(spec.partition, spec.partition_seed)} "
                f"gives split '{spec.split}' none of its rows; raise that split's share or add rows."
            )
        raise DataError(f"Dataset {where} has no rows; a Fisher or evaluation needs examples: add rows, or point "
                        f"the data spec at another file.")
    if full is None:
        _check_columns(ds, spec, where)
    return ds


def _check_columns(ds, spec: DataSpec, where: str) -> None:
    """The spec's columns exist, its text columns hold text in every row, its label column a label in
    every row: checked over the whole file (or split), not the subset a step draws, so that a bad
    row is found whichever rows are drawn. Rows are counted from 1 in the file's order."""
    columns = ds.column_names
    roles = [("text_column", spec.text_column), ("text_pair_column", spec.text_pair_column),
             ("prompt_column", spec.prompt_column)]
    roles.append(("label_column", spec.label_column))
    for role, column in [*roles, ("choices_column", spec.choices_column)]:
        if column is not None and column not in columns:
            hint = " or to null for unlabelled data" if role == "label_column" and not spec.choices_column else ""
            raise DataError(
                f"Dataset {where} has no column '{column}' (the spec's {role}); its columns are "
                f"{', '.join(columns)}. Set {role} to one of them{hint}."
            )
    for role, column in roles:
        if column is None:
            continue
        feature = ds.features[column]
        kind, dtype = type(feature).__name__, getattr(feature, "dtype", None)
        values = ds.data.column(column)
        if role != "label_column":
            if kind == "Value" and dtype in ("string", "large_string"):
                if values.null_count:
                    row = _first_null(values)
                    raise DataError(
                        f"Dataset {where}: row {row + 1} of text column '{column}' is empty (null or missing), "
                        f"not text ({values.null_count} row(s) so). Fill or remove such rows, then run again.")
            elif kind in ("Value", "Json"):  # numbers, booleans or mixed values where text should be
                bad = next((i for i, v in enumerate(values.to_pylist()) if not isinstance(v, str)), None)
                if bad is not None:
                    value = values[bad].as_py()
                    raise DataError(
                        f"Dataset {where}: row {bad + 1} of text column '{column}' holds "
                        f"{type(value).__name__} {quoted(value, 60)}, not text. Quote the values as strings, or "
                        f"fill or remove such rows, then run again.")
        elif values.null_count:
            row = _first_null(values)
            raise DataError(
                f"Dataset {where}: row {row + 1} of label column '{column}' is empty (null or missing) "
                f"({values.null_count} row(s) so). Give every row a label, remove unlabelled rows, or set the "
                f"label column to null (--label-column '') for unlabelled data.")
    if spec.choices_column is not None:
        _check_choices(ds, spec, where)


def answer_index(gold) -> int | None:
    """A multiple-choice answer as the index of the right choice: an integer, or a string of ASCII
    digits (HellaSwag stores "2"); None for anything else."""
    if isinstance(gold, bool):
        return None
    if isinstance(gold, int):
        return gold
    if isinstance(gold, str) and re.fullmatch(r"[0-9]+", gold):
        return int(gold)
    return None


def _check_choices(ds, spec: DataSpec, where: str) -> None:
    """Every row's choices are a non-empty list of non-empty strings, and its answer (label) an
    index into them (see answer_index); rows counted from 1 in the file's order."""
    column, answer = spec.choices_column, spec.label_column
    for row, (choices, gold) in enumerate(zip(ds[column], ds[answer]), 1):
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise DataError(
                f"Dataset {where}: row {row} of choices column '{column}' holds {quoted(choices, 80)}, not a "
                f"non-empty list of non-empty strings. Each row's choices must be a list such as "
                f'["Paris", "Rome"]; fix or remove the row, then run again.')
        index = answer_index(gold)
        if index is None or not 0 <= index < len(choices):
            raise DataError(
                f"Dataset {where}: row {row} of answer column '{answer}' holds {quoted(gold, 60)}, but the answer "
                f"of a multiple-choice row is the index of the right choice (a number or a string of digits), "
                f"0..{len(choices) - 1} for its "
                f"{len(choices)} choices. Fix the row (or set the data entry's label to the answer column).")


def _first_null(values) -> int:
    import pyarrow.compute as pc

    return int(pc.index(pc.is_null(values), True).as_py())


def _brief(exc: BaseException) -> str:
    """An exception as 'Type: first line', cut short, for one-paragraph messages."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 300 else text[:300] + "..."


def _check_local(spec: DataSpec, path: Path) -> None:
    """A local path that cannot hold data, named: a symbolic link loop or a broken link, a fifo or
    device (which would block, or never end), a directory holding no data files."""
    if os.path.lexists(path) and not os.path.exists(path):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DataError(f"Data path '{spec.path}' is a symbolic link loop (a link leading back to itself); "
                                f"point the data spec at the real file or directory.") from None
        raise DataError(f"Data path '{spec.path}' is a symbolic link to {os.readlink(path)}, which does not exist; "
                        f"fix the link, or point the data spec at the real file.")
    if not os.path.exists(path):
        return  # a hub id, or missing: said below
    if not path.is_file() and not path.is_dir():
        raise DataError(f"Data path '{spec.path}' is not a regular file nor a directory (a fifo, socket or device), "
                        f"which fmerge does not read; point the data spec at a csv/json/jsonl/parquet file.")
    if path.is_dir():
        found, seen = _data_files(path)
        if not found:
            shown = (", ".join(sorted(seen)[:5]) + (" ..." if len(seen) > 5 else "")) if seen else "nothing"
            what = (f"is a directory, not a data file (its name ends in '{path.suffix}'), and it holds no data files"
                    if path.suffix.lower() in _BUILDERS else "is a directory that holds no data files")
            raise DataError(
                f"Data path '{spec.path}' {what} (csv, json, jsonl, parquet, ... named after their splits, e.g. "
                f"train.jsonl and validation.jsonl); it holds {shown}. Point the data spec at a data file or at "
                f"a directory of split files.")


def _data_files(root: Path) -> tuple[list[str], list[str]]:
    """(data files, other entries) under `root`, links not followed, looking at _MAX_LISTED entries at most."""
    found, other, count = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            count += 1
            suffixes = [x.lower() for x in Path(name).suffixes]
            while suffixes and suffixes[-1] in _COMPRESSED:
                suffixes.pop()
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            loadable = suffixes and suffixes[-1] in _LOADABLE and not name.startswith(".")
            (found if loadable else other).append(rel)
        if found or count > _MAX_LISTED:
            break
    return found, other


_CHECKED: set[tuple] = set()  # stat stamps of text files found well formed in this process


def check_text_file(path: Path, builder: str) -> None:
    """Refuse, naming the line, a csv/json/jsonl file that is not UTF-8, or a csv row whose number
    of fields differs from its header's (pandas would fill a short row with nulls). The whole file
    is read, whatever subset a step will draw; a file found well formed is remembered by its stat
    stamp for the rest of the process."""
    if builder not in ("csv", "json"):
        return
    st = path.stat()
    stamp = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if stamp in _CHECKED:
        return
    _check_utf8(path)
    if builder == "csv":
        _check_csv(path)
    _CHECKED.add(stamp)


def _check_utf8(path: Path, chunk: int = 1 << 23) -> None:
    """Decode the file in blocks of whole lines; the first invalid byte is named by line and column."""
    lines, rest = 0, b""
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk)
            block = rest + data
            cut = block.rfind(b"\n") + 1 if data else len(block)
            if data and cut == 0:  # no newline yet: read on
                rest = block
                continue
            part, rest = block[:cut], block[cut:]
            try:
                part.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = lines + part.count(b"\n", 0, exc.start) + 1
                column = exc.start - (part.rfind(b"\n", 0, exc.start) + 1) + 1
                row = f" (row {line})" if path.suffix.lower() == ".jsonl" else ""
                raise DataError(
                    f"Data file '{path}' is not UTF-8: line {line}{row}, column {column} holds the byte "
                    f"0x{part[exc.start]:02x} ({exc.reason}). fmerge reads text as UTF-8 and refuses the file "
                    f"whichever rows a step would draw; convert it (e.g. `iconv -f latin1 -t utf-8`), then run "
                    f"again.") from None
            lines += part.count(b"\n")
            if not data:
                return


def _check_csv(path: Path) -> None:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if row and len(row) != len(header):
                n = len(row)
                raise DataError(
                    f"Data file '{path}': line {reader.line_num} has {n} field{'s' if n != 1 else ''}, but the "
                    f"header has {len(header)} ({quoted(', '.join(header), 80)}). A value holding a comma must be "
                    f"quoted; fix or remove the row, then run again.")


def _find_bad_json_line(path: Path) -> None:
    """Raise a DataError naming the first line of a json/jsonl file that is not a JSON object (for a
    file holding one JSON document, the document's first error); return if none is found."""
    text = path.read_text(encoding="utf-8")
    start = text.lstrip()[:1]
    if start == "[" or (path.suffix.lower() == ".json" and start == "{" and not _is_json_lines(text)):
        try:
            json.loads(text)
        except ValueError as exc:
            raise DataError(f"Data file '{path}' is not valid JSON: line {exc.lineno}, column {exc.colno}: "
                            f"{exc.msg}. Fix the file, then run again.") from None
        return
    for number, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise DataError(f"Data file '{path}': line {number} (row {number}) is not valid JSON ({exc.msg}, column "
                            f"{exc.colno}): {quoted(line.strip(), 80)}. Each line of a JSON-lines file must be one "
                            f"JSON object; fix or remove the line, then run again.") from None
        if not isinstance(value, dict):
            raise DataError(f"Data file '{path}': line {number} (row {number}) is a JSON {type(value).__name__}, "
                            f"not an object ({quoted(line.strip(), 80)}); each line must be one object such as "
                            f'{{"text": ..., "label": ...}}. Fix or remove the line, then run again.')


def _is_json_lines(text: str) -> bool:
    """Whether a .json file starting with '{' is JSON lines (its first line a whole object)."""
    try:
        json.loads(text.lstrip().split("\n", 1)[0])
        return True
    except ValueError:
        return False


def _read_file(datasets, path: Path, builder: str, cache_dir: str):
    """Every row of one data file, in file order (the cached `datasets` build of it)."""
    return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", cache_dir=cache_dir)


def _cache_dir(datasets, spec: DataSpec, path: Path) -> str:
    """Where the datasets library keeps its build of a local path: a folder of its cache named by
    the files' content hash. The library trusts a build by the files' mtime, so an edit with the
    mtime set back (`touch -r`) would read the old rows under the new content's key."""
    from .fingerprint import FileHashes

    content = spec.content or FileHashes(None).tree(path)
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "fmerge-by-content" / content)


def _partitioned(spec: DataSpec, ds):
    """The rows of split `spec.split` of a file: all of them without a partition, else that
    split's block of the seeded partition (a split the partition lacks is an error, never
    another split's rows)."""
    if spec.partition is None:
        return ds
    names = [name for name, _ in spec.partition]
    if spec.split not in names:
        raise DataError(
            f"Data file '{spec.path}' is partitioned into {', '.join(sorted(names))} "
            f"({describe_partition(sorted(spec.partition), spec.partition_seed)}); it has no split "
            f"'{spec.split}'. Ask for one of those splits, or add '{spec.split}' to the partition."
        )
    return ds.select(partition_indices(len(ds), spec.partition, spec.partition_seed)[spec.split].tolist())


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def select_examples(ds, n: int, seed: int, *, source: str | None = None):
    """A seeded random subset of n rows (not the first rows in storage order): the first n of one
    seeded permutation, so a larger n extends a smaller one (see steps/fisher.py). Cache keys
    name the data's content, n and the seed (tasks.data_inputs), never these rows."""
    what = f"Dataset '{source}'" if source else "The dataset"
    if n < 1:
        raise RecipeError(f"Asked for {n} examples from {what.lower()}; ask for at least one.")
    if len(ds) < n:
        raise DataError(
            f"{what} has only {len(ds)} rows, but {n} examples were requested; lower the number of "
            "examples or use a larger split."
        )
    return ds.select(np.random.default_rng(seed).permutation(len(ds))[:n].tolist())


def label_names_for(ds, spec: DataSpec) -> list[str] | None:
    """The class names of a string or ClassLabel label column (sorted unique values for strings),
    for a head made from the data (a finetune's, a CLIP zero-shot head), which records them as its
    id2label; never to guess an existing head's order (see `label_targets`). None for numeric
    labels. For a split of a partitioned file they are read over the whole file."""
    if spec.label_column is None:
        return None
    path = Path(spec.path).expanduser()
    if spec.partition is not None and path.is_file() and spec.label_column in ds.column_names:
        # Over the whole file: a small split may lack a class, which would shift every index.
        import datasets

        ds = _read_file(datasets, path, _BUILDERS[path.suffix.lower()], _cache_dir(datasets, spec, path))
    feature = ds.features[spec.label_column]
    if hasattr(feature, "names"):
        return list(feature.names)
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return sorted(set(ds.unique(spec.label_column)))
    return None


# Where a message tells the user to give class names.
_NAMES_HINT = ("give the class names in head order: 'label_names' in the recipe's data entry, --label-names "
               "neg,neu,pos on the command line, label_names=[...] in the API (or, for a step that needs no "
               "labels, set the label column to null: --label-column '')")


def label_targets(ds, spec: DataSpec, num_labels: int, label_names: Sequence[str] | None = None,
                  id2label: dict | None = None) -> np.ndarray:
    """The label column of `ds` (a whole split; rows named as the file counts them, or for a
    directory or hub dataset, as the split does) as a head of
    `num_labels` outputs reads it: int64 class indices, or float32 targets for a regression head
    (num_labels 1). The label rule of the module docstring; whatever breaks it is refused with
    the first offending row, its value and what to do."""
    column = spec.label_column
    path = Path(spec.path).expanduser()
    where = f"Dataset '{spec.path}'" + ("" if path.is_file() else f" (split '{spec.split}')")
    feature = ds.features[column]
    kind, dtype = type(feature).__name__, getattr(feature, "dtype", None)

    def refuse(row: int, value, problem: str, todo: str):
        if spec.partition is not None and path.is_file():  # the split's row as the file counts it
            import datasets

            count = len(_read_file(datasets, path, _BUILDERS[path.suffix.lower()], _cache_dir(datasets, spec, path)))
            row = int(partition_indices(count, spec.partition, spec.partition_seed)[spec.split][row])
        raise DataError(f"{where}: row {row + 1} of label column '{column}' holds {quoted(value, 60)}, {problem}. "
                        f"{todo}")

    if kind not in ("Value", "ClassLabel") or dtype not in (*_NUMERIC, "string", "large_string"):
        values = list(ds[column][:])
        row = _first_type_change(spec, values)
        refuse(row, values[row], f"but row 1 holds {quoted(values[0], 60)}: the column mixes labels of different "
               f"types (text, numbers, true/false), or holds something other than one label a row",
               "Write every label alike, class indices as numbers or class names as text, then run again.")
    values = np.asarray(ds.with_format("numpy")[column])
    if num_labels == 1:
        if dtype in ("string", "large_string"):
            refuse(0, str(values[0]), "but the model has a regression head (num_labels 1), which reads numbers",
                   "Give numeric targets, or evaluate a classifier.")
        bad = np.flatnonzero(~np.isfinite(values.astype(np.float64)))
        if bad.size:
            refuse(bad[0], values[bad[0]].item(), "not a finite regression target", "Fix or remove that row.")
        return values.astype(np.float32)
    if dtype in ("string", "large_string"):
        values = _mapped_names(values, num_labels, label_names, id2label, refuse)
    elif values.dtype.kind == "f":
        bad = np.flatnonzero(values != np.round(values))
        if bad.size:
            refuse(bad[0], values[bad[0]].item(), f"which is no class index of the model's head of {num_labels} "
                   f"classes (0..{num_labels - 1})", "Give whole class indices, or use a regression model "
                   "(num_labels 1) for numeric targets.")
    values = values.astype(np.int64)
    bad = np.flatnonzero((values < 0) | (values >= num_labels))
    if bad.size:
        refuse(bad[0], values[bad[0]].item(), f"outside the model's head of {num_labels} classes (labels "
               f"0..{num_labels - 1}; {bad.size} row(s) so)", "Check the data (-1 often marks an unlabelled test "
               "split: evaluate a labelled split, or set the label column to null) or the model's num_labels.")
    return values


_NUMERIC = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
            "float64")


def _mapped_names(values: np.ndarray, num_labels: int, label_names, id2label, refuse):
    """String labels as class indices through label_names, else through an id2label naming them all."""
    default = [f"LABEL_{i}" for i in range(num_labels)]
    if label_names is not None:
        names, source = list(label_names), "the data's label_names"
        if len(names) != num_labels:
            raise DataError(f"The data's label_names name {len(names)} classes ({quoted(', '.join(names), 80)}), but "
                            f"the model's head has {num_labels}; give one name per head output, in head order.")
    else:
        names = [str((id2label or {}).get(i, (id2label or {}).get(str(i), ""))) for i in range(num_labels)]
        source = "the model's id2label"
    index = {name: i for i, name in enumerate(names)}
    unknown = np.flatnonzero([v not in index for v in values])
    if not unknown.size:
        return np.array([index[v] for v in values], dtype=np.int64)
    value = str(values[unknown[0]])
    digits = " (it looks like a class index written as text: write it as a number)" if value.isdigit() else ""
    if label_names is not None:
        refuse(unknown[0], value, f"which is not among {source} ({quoted(', '.join(names), 80)}){digits}",
               "Add it to label_names in head order, or remove the row.")
    if names == default or not id2label:
        shown = "only transformers' default names (LABEL_0..)" if id2label else "no class names"
        refuse(unknown[0], value, f"text, but no label_names map text labels to head indices and the model's "
               f"id2label holds {shown}{digits}", f"So as not to guess an order, {_NAMES_HINT}.")
    refuse(unknown[0], value, f"which is not among {source} ({quoted(', '.join(names), 80)}){digits}",
           f"Fix the row, or {_NAMES_HINT}.")


def _first_type_change(spec: DataSpec, values: list) -> int:
    """The first row whose label's type differs from row 1's: in the values as read, else in a JSON
    lines file's own text (the reader may have turned "1" into 1); row 1 if neither tells."""
    def kind(v):
        return type(v).__name__
    row = next((i for i, v in enumerate(values) if kind(v) != kind(values[0])), None)
    path = Path(spec.path).expanduser()
    if row is None and spec.partition is None and path.is_file() and path.suffix.lower() == ".jsonl":
        raw = [json.loads(line).get(spec.label_column) for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
        row = next((i for i, v in enumerate(raw) if kind(v) != kind(raw[0])), None)
        if row is not None:
            values[0], values[row] = raw[0], raw[row]
    return row or 0


# Characters kept per token of max_length before a text is tokenized and cut to max_length: a token
# spans fewer characters than this in any tokenizer's text, so the cut drops only what truncation
# would, while a 30 MB row costs the tokenizer 64·max_length characters instead of minutes.
CHARS_PER_TOKEN = 64


def encode_batches(
    tokenizer,
    ds,
    spec: DataSpec,
    batch_size: int,
    max_length: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenized batches in dataset order, padded on the right to the longest row of each batch.

    Yields `input_ids`, `attention_mask`, `token_type_ids` (if the tokenizer makes them),
    `labels` (int64 classes or float32 targets, when the spec has a label column, which must
    hold `label_targets` already: `tasks.load_subset` puts them there) and
    `example_ids` (column `fmerge_example_id` if present, else the row's position in `ds`).
    Texts are cut to CHARS_PER_TOKEN·max_length characters before tokenizing.
    """
    if batch_size < 1:
        raise RecipeError(f"Batch size must be at least 1; got {batch_size}.")
    for column in (spec.text_column, spec.text_pair_column, spec.label_column):
        if column is not None and column not in ds.column_names:
            raise DataError(
                f"The dataset has no column '{column}'; its columns are {', '.join(ds.column_names)}."
            )
    labels = mapped_labels(ds, spec.label_column) if spec.label_column is not None else None
    ids = np.asarray(ds[EXAMPLE_ID_COLUMN]) if EXAMPLE_ID_COLUMN in ds.column_names else np.arange(len(ds))
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        chars = CHARS_PER_TOKEN * max_length
        texts = [t[:chars] for t in _texts(rows, spec.text_column, start)]
        pairs = [t[:chars] for t in _texts(rows, spec.text_pair_column, start)] if spec.text_pair_column else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
        batch = _pad_right(encoded, pad_id)
        if labels is not None:
            chunk = labels[start : start + batch_size]
            dtype = torch.float32 if chunk.dtype.kind == "f" else torch.int64
            batch["labels"] = torch.as_tensor(chunk, dtype=dtype)
        batch["example_ids"] = torch.as_tensor(ids[start : start + batch_size], dtype=torch.int64)
        yield batch


def mapped_labels(ds, column: str) -> np.ndarray:
    """A label column that `label_targets` has filled (class indices or regression targets)."""
    values = np.asarray(ds.with_format("numpy")[column])
    if values.dtype.kind not in "iuf":
        raise FmergeError(f"Label column '{column}' reached batching as {values.dtype} values, not mapped by the "
                          f"label rule (data.label_targets); this is a bug in fmerge, please report it.")
    return values


def _texts(rows: dict, column: str, offset: int) -> list[str]:
    texts = rows[column]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(
                f"Row {offset + i} of text column '{column}' holds {type(text).__name__} "
                f"({text!r}), not text; clean or filter the data."
            )
    return texts


def _pad_right(encoded, pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids in encoded["input_ids"])
    batch = {}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0)):
        if key in encoded:
            batch[key] = torch.tensor([row + [fill] * (length - len(row)) for row in encoded[key]], dtype=torch.int64)
    batch["attention_mask"] = torch.tensor(
        [[1] * len(row) + [0] * (length - len(row)) for row in encoded["input_ids"]], dtype=torch.int64
    )
    return batch


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context + continuation, and how many of them are the context's, split the way
    lm-evaluation-harness splits them: spaces ending the context move to the continuation, the
    whole string is encoded at once, and the continuation is what follows the context's own
    encoding (no special tokens are added)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    own = len(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0
    return whole, own


def _prefix_token(tokenizer) -> int | None:
    """The token a sequence starts from so that its first token is predicted too: BOS, else EOS."""
    return next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), None)


def _scored_labels(ids: list[int], start: int) -> list[int]:
    from .lm_scoring import IGNORE_INDEX

    return [IGNORE_INDEX] * start + ids[start:]


def _lm_windows(ids: list[int], start: int, max_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """(input ids, labels) windows of at most max_length tokens covering a sequence; each window
    starts at the last token of the one before, whose prediction that one scored, so every token
    from `start` on is scored exactly once and none is dropped."""
    from .lm_scoring import IGNORE_INDEX

    labels = _scored_labels(ids, start)
    step = max_length - 1
    for a in range(0, max(len(ids) - 1, 1), step):
        window = labels[a:a + max_length]
        yield ids[a:a + max_length], [IGNORE_INDEX] + window[1:]


def _padded(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    from .lm_scoring import IGNORE_INDEX

    length = max(len(ids) for ids, _ in rows)
    fill = [length - len(ids) for ids, _ in rows]
    return {"input_ids": torch.tensor([ids + [pad_id] * f for (ids, _), f in zip(rows, fill)], dtype=torch.int64),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * f for (ids, _), f in zip(rows, fill)],
                                           dtype=torch.int64),
            "labels": torch.tensor([lab + [IGNORE_INDEX] * f for (_, lab), f in zip(rows, fill)], dtype=torch.int64)}


def encode_lm_batches(tokenizer, ds, spec: DataSpec, batch_size: int,
                      max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    """Language-modelling batches: `input_ids`, `attention_mask`, `labels` (each text token, in the
    transformers convention; padding and prompt tokens IGNORE_INDEX) and `example_ids`. Each
    sequence starts with the tokenizer's BOS (else EOS) token so its first token is scored too (a
    tokenizer with neither leaves it unscored); a sequence longer than `max_length` is cut into
    windows (see `_lm_windows`), so nothing is left out."""
    if batch_size < 1 or max_length < 2:
        raise RecipeError(f"Batch size must be at least 1 and max_length at least 2; got {batch_size}, {max_length}.")
    prefix = _prefix_token(tokenizer)
    pad_id = next((t for t in (tokenizer.pad_token_id, prefix) if t is not None), 0)
    ids_column = np.asarray(ds[EXAMPLE_ID_COLUMN]) if EXAMPLE_ID_COLUMN in ds.column_names else np.arange(len(ds))
    texts = _texts(ds[:], spec.text_column, 0)
    prompts = _texts(ds[:], spec.prompt_column, 0) if spec.prompt_column else [""] * len(texts)
    pending: list[tuple[list[int], list[int]]] = []
    owners: list[int] = []
    for row, (prompt, text) in enumerate(zip(prompts, texts)):
        ids, start = encode_pair(tokenizer, prompt, text)
        if prefix is not None:
            ids, start = [prefix, *ids], start + 1
        for window in _lm_windows(ids, max(start, 1), max_length):
            pending.append(window)
            owners.append(int(ids_column[row]))
            if len(pending) == batch_size:
                yield {**_padded(pending, pad_id), "example_ids": torch.tensor(owners, dtype=torch.int64)}
                pending, owners = [], []
    if pending:
        yield {**_padded(pending, pad_id), "example_ids": torch.tensor(owners, dtype=torch.int64)}


def encode_choice_batches(tokenizer, ds, spec: DataSpec, batch_size: int,
                          max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    """Multiple-choice batches, one row per (example, choice): context + " " + choice encoded as
    `encode_pair` does, `labels` scoring the choice's tokens only, `example_ids` and
    `choice_ids`. A sequence longer than `max_length` loses tokens from the left of its context
    (as lm-evaluation-harness does); an empty context starts from the BOS (else EOS) token."""
    if batch_size < 1 or max_length < 2:
        raise RecipeError(f"Batch size must be at least 1 and max_length at least 2; got {batch_size}, {max_length}.")
    prefix = _prefix_token(tokenizer)
    pad_id = next((t for t in (tokenizer.pad_token_id, prefix) if t is not None), 0)
    ids_column = np.asarray(ds[EXAMPLE_ID_COLUMN]) if EXAMPLE_ID_COLUMN in ds.column_names else np.arange(len(ds))
    contexts = _texts(ds[:], spec.text_column, 0)
    pending, owners, which = [], [], []
    for row, (context, choices) in enumerate(zip(contexts, ds[spec.choices_column])):
        for c, choice in enumerate(choices):
            ids, start = encode_pair(tokenizer, context, " " + choice)
            if start == 0:
                if prefix is None:
                    raise DataError(f"Dataset '{spec.path}': row {row + 1} has an empty context, and the tokenizer has "
                                    f"no BOS or EOS token to start from, so its choices' first tokens cannot be "
                                    f"scored; give every row a context.")
                ids, start = [prefix, *ids], 1
            cut = max(len(ids) - max_length, 0)
            if start - cut < 1:
                raise DataError(f"Dataset '{spec.path}': row {row + 1}, choice {c} takes {len(ids) - start} tokens, "
                                f"which with one token of context exceed max_length {max_length}; raise max_length "
                                f"(--max-length) or shorten the choice.")
            pending.append((ids[cut:], _scored_labels(ids, start)[cut:]))
            owners.append(int(ids_column[row]))
            which.append(c)
            if len(pending) == batch_size:
                yield _choice_batch(pending, owners, which, pad_id)
                pending, owners, which = [], [], []
    if pending:
        yield _choice_batch(pending, owners, which, pad_id)


def _choice_batch(rows, owners: list[int], which: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    return {**_padded(rows, pad_id), "example_ids": torch.tensor(owners), "choice_ids": torch.tensor(which)}


def shard_by_rank(ds, rank: int | None = None, world_size: int | None = None):
    """This rank's examples (rank::world_size) of a datasets.Dataset, each keeping its position
    in the full dataset as its example id, so sampled labels match a single-process run."""
    import torch.distributed as dist

    if rank is None or world_size is None:
        initialised = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if initialised else 0
        world_size = dist.get_world_size() if initialised else 1
    if EXAMPLE_ID_COLUMN not in ds.column_names:
        ds = ds.add_column(EXAMPLE_ID_COLUMN, list(range(len(ds))))
    return ds.select(range(rank, len(ds), world_size))


__all__ = [
    "DataSpec",
    "EXAMPLE_ID_COLUMN",
    "encode_batches",
    "encode_choice_batches",
    "encode_lm_batches",
    "encode_pair",
    "answer_index",
    "label_names_for",
    "label_targets",
    "load_dataset_split",
    "partition_indices",
    "partition_sizes",
    "select_examples",
    "shard_by_rank",
]
