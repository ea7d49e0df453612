"""Task data through the `datasets` library: load a split, draw a seeded subset, tokenize.

Kept free of the CLI and recipes so the Fisher, RegMean and evaluation steps share one path.

Labels: integer (or bool, or `datasets.ClassLabel`) columns are used as they are. String labels
are mapped to class indices through an explicit list, `label_names` (index = position in the
list). There is no silent default, because sorting the labels seen in one subset would shift the
indices whenever a class is missing from it: compute the list once over the full split with
`label_names_for` (sorted unique values, or the ClassLabel names) and record it with the model.
Float labels are regression targets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import FmergeError

# Loader per file extension.
_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Optional column holding each row's id for seeding per-example draws (see fisher.shard_by_rank).
EXAMPLE_ID_COLUMN = "fmerge_example_id"


@dataclass(frozen=True)
class DataSpec:
    """Where a task's examples live and which columns hold text and labels.

    `path`: a local csv/json/jsonl/parquet file, a directory of such files (splits named by file,
    e.g. train.jsonl, validation.jsonl), or a Hugging Face hub dataset id (needs a network).
    `label_column=None` means unlabelled data (enough for the exact and sampled Fisher).
    """

    path: str
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = "label"
    split: str = "train"
    config: str | None = None


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
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise FmergeError(
                    f"Data file '{spec.path}' has extension '{path.suffix}', which fmerge cannot read; "
                    f"use one of {', '.join(sorted(_BUILDERS))}."
                )
            ds = datasets.load_dataset(builder, data_files={spec.split: str(path)}, split=spec.split)
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), spec.config, split=spec.split)
        elif _looks_local(spec.path):
            raise FmergeError(
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
            raise FmergeError(
                f"Data file '{spec.path}' is not UTF-8 ({cause.reason} at byte {cause.start}); convert "
                "it, e.g. `iconv -f latin1 -t utf-8`."
            ) from err
        if (path.is_file() and path.stat().st_size == 0) or "corresponds to no data" in str(err):
            raise FmergeError(f"Dataset {where} has no rows; a Fisher or evaluation needs examples.") from err
        what = "Reading the data" if path.exists() else "No local file or directory is named so, and loading it as a hub dataset"
        raise FmergeError(f"{what} at {where} failed: {type(cause).__name__}: {cause}") from err
    if len(ds) == 0:
        raise FmergeError(f"Dataset {where} has no rows; a Fisher or evaluation needs examples.")
    columns = ds.column_names
    roles = [("text_column", spec.text_column), ("text_pair_column", spec.text_pair_column)]
    roles.append(("label_column", spec.label_column))
    for role, column in roles:
        if column is not None and column not in columns:
            hint = " or to null for unlabelled data" if role == "label_column" else ""
            raise FmergeError(
                f"Dataset {where} has no column '{column}' (the spec's {role}); its columns are "
                f"{', '.join(columns)}. Set {role} to one of them{hint}."
            )
    return ds


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def select_examples(ds, n: int, seed: int, *, source: str | None = None):
    """A seeded random subset of n rows (not the first rows in storage order) and its
    fingerprint: a hash of the dataset's identity and the chosen row indices, for cache keys."""
    what = f"Dataset '{source}'" if source else "The dataset"
    if n < 1:
        raise FmergeError(f"Asked for {n} examples from {what.lower()}; ask for at least one.")
    if len(ds) < n:
        raise FmergeError(
            f"{what} has only {len(ds)} rows, but {n} examples were requested; lower the number of "
            "examples or use a larger split."
        )
    indices = np.random.default_rng(seed).permutation(len(ds))[:n]
    digest = hashlib.sha256()
    digest.update(f"{source or ''}:{getattr(ds, '_fingerprint', '')}:{len(ds)}:".encode())
    digest.update(indices.astype("<i8").tobytes())
    return ds.select(indices.tolist()), digest.hexdigest()[:32]


def subset_family(ds, seed: int, *, source: str | None = None) -> str:
    """A hash of what `select_examples` draws from, without the count: for a fixed seed the subset
    of n rows is the first n rows of one permutation, so estimates over n rows can be extended."""
    identity = f"{source or ''}:{getattr(ds, '_fingerprint', '')}:{len(ds)}:{seed}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def label_names_for(ds, spec: DataSpec) -> list[str] | None:
    """The class names of a string or ClassLabel label column (sorted unique values for strings);
    None for numeric labels, which are class indices or regression targets already."""
    if spec.label_column is None:
        return None
    feature = ds.features[spec.label_column]
    if hasattr(feature, "names"):
        return list(feature.names)
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return sorted(set(ds.unique(spec.label_column)))
    return None


def _label_values(ds, spec: DataSpec, label_names: Sequence[str] | None) -> np.ndarray:
    """The label column as class indices (string labels mapped through label_names) or floats."""
    column = spec.label_column
    values = ds.with_format("numpy")[column]
    values = np.asarray(values)
    if values.dtype.kind in "OUS":
        if label_names is None:
            raise FmergeError(
                f"Label column '{column}' holds strings; pass label_names (the class names in head "
                "order, e.g. from fmerge.data.label_names_for on the full split, or the model's "
                "id2label) so each string maps to a fixed class index."
            )
        index = {name: i for i, name in enumerate(label_names)}
        unknown = sorted({str(v) for v in values if v not in index})
        if unknown:
            raise FmergeError(
                f"Label column '{column}' holds value(s) {', '.join(repr(u) for u in unknown[:5])} that "
                f"are not in label_names ({', '.join(map(repr, label_names))})."
            )
        return np.array([index[v] for v in values], dtype=np.int64)
    if values.dtype.kind == "b":
        return values.astype(np.int64)
    return values


def check_labels(ds, spec: DataSpec, num_labels: int, label_names: Sequence[str] | None = None) -> None:
    """Fail early, naming the value, if a label is outside a head of `num_labels` outputs
    (num_labels == 1: a regression head, whose targets must be finite numbers)."""
    if spec.label_column is None:
        return
    column = spec.label_column
    values = _label_values(ds, spec, label_names)
    if values.dtype.kind not in "iuf":
        raise FmergeError(f"Label column '{column}' holds {values.dtype} values, neither classes nor numbers.")
    if num_labels == 1:
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise FmergeError(f"Label column '{column}' holds a NaN or infinite regression target.")
        return
    if values.dtype.kind == "f":
        fractional = values[values != np.round(values)]
        if fractional.size:
            raise FmergeError(
                f"Label column '{column}' holds the non-integer value {fractional[0]!r}, but the "
                f"model's head has {num_labels} classes (0..{num_labels - 1})."
            )
    bad = values[(values < 0) | (values >= num_labels)]
    if bad.size:
        raise FmergeError(
            f"Dataset '{spec.path}': label column '{column}' holds the value {bad[0].item()!r} ({bad.size} row(s) out of "
            f"range), but the model's head has {num_labels} classes, so labels must lie in "
            f"0..{num_labels - 1}. Check the data (-1 often marks an unlabelled test split) or the "
            "model's num_labels."
        )


def encode_batches(
    tokenizer,
    ds,
    spec: DataSpec,
    batch_size: int,
    max_length: int,
    label_names: Sequence[str] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenized batches in dataset order, padded on the right to the longest row of each batch.

    Yields `input_ids`, `attention_mask`, `token_type_ids` (if the tokenizer makes them),
    `labels` (int64 classes or float32 targets, when the spec has a label column) and
    `example_ids` (column `fmerge_example_id` if present, else the row's position in `ds`).
    """
    if batch_size < 1:
        raise FmergeError(f"Batch size must be at least 1; got {batch_size}.")
    for column in (spec.text_column, spec.text_pair_column, spec.label_column):
        if column is not None and column not in ds.column_names:
            raise FmergeError(
                f"The dataset has no column '{column}'; its columns are {', '.join(ds.column_names)}."
            )
    labels = _label_values(ds, spec, label_names) if spec.label_column is not None else None
    ids = np.asarray(ds[EXAMPLE_ID_COLUMN]) if EXAMPLE_ID_COLUMN in ds.column_names else np.arange(len(ds))
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    for start in range(0, len(ds), batch_size):
        rows = ds[start : start + batch_size]
        texts = _texts(rows, spec.text_column, start)
        pairs = _texts(rows, spec.text_pair_column, start) if spec.text_pair_column else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
        batch = _pad_right(encoded, pad_id)
        if labels is not None:
            chunk = labels[start : start + batch_size]
            dtype = torch.float32 if chunk.dtype.kind == "f" else torch.int64
            batch["labels"] = torch.as_tensor(chunk, dtype=dtype)
        batch["example_ids"] = torch.as_tensor(ids[start : start + batch_size], dtype=torch.int64)
        yield batch


def _texts(rows: dict, column: str, offset: int) -> list[str]:
    texts = rows[column]
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise FmergeError(
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


__all__ = [
    "DataSpec",
    "EXAMPLE_ID_COLUMN",
    "check_labels",
    "encode_batches",
    "label_names_for",
    "load_dataset_split",
    "select_examples",
    "subset_family",
]
