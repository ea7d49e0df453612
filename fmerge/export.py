"""The one export path: every file fmerge writes outside its store is written here.

Merges, the iterative merges (Frank-Wolfe, AdaMerging) and Fisher exports all come through this
module, under one lock per export target (`export_lock`).

A model directory is built beside its target under a temporary name (`.NAME.tmp-PID.RAND`): the
weights, the base's config and tokenizer files, the model card, the caller's files (task heads),
then the manifest `.fmerge-export.json`, which records the artifact key and every file fmerge
wrote with its xxh3-128 and its stat stamp (size, mtime, ctime, inode), taken before the digest
is read. The whole directory is then swapped into place in one atomic
rename (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, repaired by the next export if
a crash falls between them), so the target is always the previous export or the complete new
one, never a mix.

fmerge never deletes or overwrites a file it did not write:

* A non-empty directory without a manifest is refused.
* In a directory fmerge exported, entries the manifest does not list are the user's (an eval
  script, a results folder). They are carried into the new export untouched: hard-linked (the
  same file, so nothing is copied, mtimes and permissions stay, and the original never moves
  until the new directory holding it is in place), recreated if a symbolic link, copied only
  where the file system refuses hard links. The previous export is then removed entry by entry:
  only files its manifest lists and that still match their record, and entries that are now the
  very same file in the new export; anything else (a file made while the export ran) is moved
  into the new export, or left where it is. A crash at any point loses none of them.
* A user file whose name the new export needs, and a file fmerge wrote that was changed since,
  are refused, naming them: fmerge cannot keep both.
* A single-file export (a Fisher diagonal) is recorded in a hidden sidecar beside it,
  `.NAME.fmerge-export.json`; an existing file without one is replaced only if its safetensors
  header carries an `fmerge_key` (an export of an fmerge older than sidecars).

Side files are read only if they are regular files inside the base model's directory (for a
hub download, inside its cache entry, whose snapshot files link to its blobs): a link that leads
elsewhere is refused, since an export is made to be shared and could otherwise publish a private
file; fifos and devices are refused too. The tokenizer is loaded from those files (never its own
code) and written with `save_pretrained`, so its chat template comes along; one that does not
load is copied file by file, and the model card says so.

`check_exports` refuses, at validation (before anything is computed), two steps exporting to the
same place (or one inside the other), exports inside (or holding) the artifact store, and export
paths that cannot be written or would swallow what the user has (`check_export_path`): under a
file, through a symbolic link loop or a link at the target itself, into a directory fmerge may not
write, or onto (or around) a model directory, a data file, the recipe or the current directory.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import filecmp
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import uuid
from contextlib import nullcontext
from pathlib import Path, PurePosixPath
from typing import Callable

import xxhash

from . import __version__
from .errors import ExportError, FmergeError, quoted
from .io import SIDE_FILES, StreamingSafetensorsWriter, TensorSource, few, write_weight_files
from .model_card import tokenizer_fallback_note
from .store import pid_alive

MARKER = ".fmerge-export.json"
SIDECAR_SUFFIX = ".fmerge-export.json"  # beside a file export NAME: .NAME.fmerge-export.json
BUILDING = ".fmerge-building"  # inside a temporary export directory until it is complete
FORMAT = 2  # 1: the marker held only the key (fmerge's files are then known by name)
_OWN_WEIGHTS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)(\.[0-9a-f]+)?$")


def export_lock(store, path: Path):
    """The lock of one export target (a directory or a file), held while it is checked and written."""
    from .store import make_key

    if store is None:
        return nullcontext()
    return store.lock(make_key("export", str(Path(path).resolve()), {}, 1))


# ---------------------------------------------------------------------------------------------
# Validation


def check_exports(recipe, store_root: Path | str) -> None:
    """Refuse exports that would collide: two steps exporting to the same path or one inside the
    other (each export replaces its whole target), and exports inside or around the store."""
    store = _real(Path(store_root))
    protected = protected_paths(recipe)
    group_of = {v.name: group for group, variants in (getattr(recipe, "sweeps", None) or {}).items() for v in variants}
    seen: list[tuple[str, str, Path, str]] = []  # (step, its recipe-level name, path, where)
    exports = [(name, getattr(cfg, "export", None)) for name, cfg in recipe.steps.items()]
    exports += [(group, path) for group, (_, path) in getattr(recipe, "chosen_exports", {}).items()]
    for name, export in exports:
        if not export:
            continue
        group = group_of.get(name, name)
        where = recipe.where("steps", group, "export")
        path = _real(recipe.resolve(str(export)))
        if _within(path, store):
            raise ExportError(
                f"{where}: export {path} is inside the artifact store {store}. The store is fmerge's cache "
                f"(`fmerge gc` prunes it), not a place for models to share; export to a path outside it "
                f"(e.g. out/{group}), then run again.")
        if _within(store, path):
            raise ExportError(
                f"{where}: export {path} holds the artifact store {store}; an export directory is replaced "
                f"as a whole, so the store must not live inside it. Export to a directory of its own "
                f"(e.g. out/{group}), or move the store elsewhere with --store or the recipe's 'store', "
                f"then run again.")
        check_export_path(recipe.resolve(str(export)), where, protected)
        for other, other_group, other_path, other_where in seen:
            if not (_within(path, other_path) or _within(other_path, path)):
                continue
            how = "both export to" if path == other_path else "export to nested paths:"
            paths = f"{path}" if path == other_path else f"{other_path} and {path}"
            raise ExportError(
                f"{other_where} and {where}: steps '{other_group}' and '{group}' {how} {paths}. Each export "
                f"replaces its whole target, so one would overwrite or swallow the other; give each step "
                f"its own export path, then run again.")
        seen.append((name, group, path, where))


def protected_paths(recipe) -> list[tuple[str, Path, bool]]:
    """(what, path, inside_too) of everything of the user's a recipe reads: the base and model
    directories (an export inside one is refused too), data files and directories, the recipe
    itself and the current directory (an export equal to or holding one is refused)."""
    found: list[tuple[str, Path, bool]] = []

    def add(what: str, path, inside: bool = False) -> None:
        try:
            if path is not None and os.path.lexists(path):
                found.append((what, _real(Path(path)), inside))
        except (OSError, ValueError):
            pass

    base = getattr(recipe, "base", None)
    if base is not None and getattr(base, "path", None):
        add("the base model's directory", recipe.resolve(base.path), True)
    for name, spec in (getattr(recipe, "models", None) or {}).items():
        if getattr(spec, "path", None):
            add(f"model '{name}''s directory", recipe.resolve(spec.path), True)
    for name, d in (getattr(recipe.spec, "data", None) or {}).items():
        if getattr(d, "path", None):
            add(f"data '{name}'", recipe.resolve(d.path))
        for split, file in (getattr(d, "splits", None) or {}).items():
            add(f"data '{name}' (split '{split}')", recipe.resolve(file))
    if getattr(recipe, "file", None) is not None:
        add("the recipe", recipe.file)
    try:
        add("the current directory", Path.cwd())
    except OSError:  # deleted under us: nothing there to protect
        pass
    return found


def check_export_path(path: Path, where: str, protected: list[tuple[str, Path, bool]] = ()) -> None:
    """Refuse, before anything is computed, an export path that cannot be written or would replace
    what is the user's. Creates nothing; an existing directory fmerge exported (or a fmerge file)
    passes, and the export itself decides whether it may be replaced."""
    text = str(path)
    if "\0" in text:
        raise ExportError(f"{where}: export path {quoted(text)} holds a NUL character, which no file name may "
                          f"hold; write the path without it, then run again.")
    path = Path(os.path.abspath(path))
    real = _real(path)
    for what, other, inside in protected:
        if real == other:
            how = "is"
        elif _within(other, real):
            how = "holds"
        elif inside and _within(real, other):
            how = "lies inside"
        else:
            continue
        extra = f" ({other})" if other != real else ""
        raise ExportError(
            f"{where}: export {path} {how} {what}{extra}. An export replaces its whole target directory, so "
            f"this would replace or swallow files of yours; fmerge never exports onto, around or into the "
            f"models and data it reads, the recipe or the current directory. Export to a directory of its "
            f"own (e.g. out/merged), then run again.")
    parts = path.parts
    current = Path(parts[0])
    for i, part in enumerate(parts[1:], 1):
        current = current / part
        last = i == len(parts) - 1
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break  # nothing further exists: the export creates the rest
        except OSError as exc:
            raise _path_error(where, path, current, exc) from None
        if stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(current)
            except FileNotFoundError:
                raise ExportError(
                    f"{where}: export {path} {'is' if last else 'lies under'} {current}, a symbolic link to "
                    f"{os.readlink(current)}, which does not exist; fmerge does not export through a broken "
                    f"link. Remove the link or export to another path, then run again.") from None
            except OSError as exc:
                raise _path_error(where, path, current, exc) from None
            if last:
                raise ExportError(
                    f"{where}: export {path} is a symbolic link (to {os.readlink(current)}); fmerge never "
                    f"replaces a link nor writes through one at the export target. Export to the real "
                    f"path ({_real(current)}) or another path, then run again.")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise ExportError(
                f"{where}: export {path} lies under {current}, which is a file, not a directory, so nothing "
                f"can be written there (and fmerge will not replace the file). Export to a path outside "
                f"{current}, then run again.")
        if last and not stat.S_ISDIR(st.st_mode) and path.suffix != ".safetensors":
            raise ExportError(
                f"{where}: export {path} exists and is a file, not a directory fmerge wrote; refusing to "
                f"replace it (a model is exported as a directory). Export to another path, then run again.")
    # Where the export will create its entries: the nearest existing directory above the target.
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(
            f"{where}: export {path} cannot be written: fmerge may not create entries in {parent} (permission "
            f"denied, or a read-only file system), where the export is built before it is moved into place. "
            f"Export to a directory you can write, or change its permissions, then run again.")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX") if os.path.isdir(parent) else 255
    except (OSError, ValueError):
        name_max = 255
    long = [n for n in path.parts if len(os.fsencode(n)) > name_max]
    if long or len(os.fsencode(str(path))) >= 4096:
        what = f"the name {quoted(long[0], 60)} is {len(os.fsencode(long[0]))} bytes" if long else "the path is"
        raise ExportError(f"{where}: export {quoted(str(path))} cannot be written: {what} longer than the file "
                          f"system allows ({name_max} bytes a name, 4096 a path). Choose a shorter path, then "
                          f"run again.")


def _path_error(where: str, path: Path, at: Path, exc: OSError) -> ExportError:
    if exc.errno == errno.ELOOP:
        why = f"{at} is a symbolic link loop (a link that leads back to itself)"
        fix = f"remove or fix the link {at}"
    elif exc.errno == errno.ENAMETOOLONG:
        why = "the path or one of its names is longer than the file system allows"
        fix = "choose a shorter path"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = f"{at} cannot be reached (permission denied)"
        fix = "export to a directory you can write"
    else:
        why = f"{at}: {exc.strerror or exc}"
        fix = "export to another path"
    return ExportError(f"{where}: export {quoted(str(path))} cannot be used: {why}. Nothing was written; {fix}, "
                       f"then run again.")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# ---------------------------------------------------------------------------------------------
# Records of what fmerge wrote


def _file_digest(path: Path, algorithm: str) -> str:
    h = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> dict:
    """What a file's stat must still say for its recorded digest to hold without reading it: any
    write, `touch -r` included, moves its ctime, which no user command can set back."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _record(path: Path, xxh3: str | None = None) -> dict:
    """The record of a file fmerge wrote: its stamp, taken before its digest is read, so that an
    edit after it never passes as fmerge's bytes. `xxh3`: the digest of the bytes as fmerge wrote
    them (not read again). A file that changes while it is read is refused."""
    before = path.lstat()
    if xxh3 is None:
        xxh3 = _file_digest(path, "xxh3_128")
        if _stamp(path.lstat()) != _stamp(before):
            raise ExportError(f"{path} changed while fmerge recorded it (something else writes there); nothing "
                              f"was published. Stop whatever writes into the export, then run again.")
    return {**_stamp(before), "xxh3_128": xxh3}


def _matches(path: Path, rec: dict | None) -> bool:
    """Whether `path` is still the regular file fmerge recorded (`rec` None: known by name only).
    An unchanged stamp (size, mtime, ctime, inode) decides; otherwise the content digest does (a
    copy keeps it, an edit not): xxh3-128, or SHA-256 in records an fmerge before 2026-11-30
    wrote. Records without a ctime (fmerge before 2026-12-07) are always read."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if rec is None:
        return True
    if st.st_size != rec.get("size"):
        return False
    if "ctime_ns" in rec and _stamp(st) == {k: rec.get(k) for k in ("size", "mtime_ns", "ctime_ns", "ino")}:
        return True
    algorithm = "xxh3_128" if "xxh3_128" in rec else "sha256"
    return _file_digest(path, algorithm) == rec.get(algorithm)


def _legacy_owned(rel: str) -> bool:
    """A file an export of fmerge < manifests wrote, known by its name."""
    parts = PurePosixPath(rel).parts
    if len(parts) == 1:
        return bool(_OWN_WEIGHTS.match(rel)) or rel in ("README.md", "model.safetensors.index.json", *SIDE_FILES)
    return len(parts) == 2 and parts[0] == "heads" and parts[1].endswith(".safetensors")


def read_manifest(dir: Path, where: str | None = None) -> dict | None:
    """The manifest of a directory fmerge exported; None if it has none."""
    marker = Path(dir) / MARKER
    if not os.path.lexists(marker):
        return None
    try:
        if marker.is_symlink():
            raise ValueError("a symbolic link")
        data = json.loads(marker.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
            raise ValueError("not an export record")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ExportError(
            f"{where or dir}: {marker} is not a readable export record ({exc}), so which files in {dir} fmerge "
            f"wrote is unknown and nothing there will be replaced. Move the files you want to keep out of "
            f"{dir} and remove it, or export elsewhere, then run again.")
    return data


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """(entries that are not directories, directories) under `root`, as relative POSIX paths;
    symbolic links are entries, never followed."""
    files, dirs, stack = [], [], [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    dirs.append(r)
                    stack.append(r)
                else:
                    files.append(r)
    return sorted(files), sorted(dirs)


def _ancestors(rel: str) -> list[str]:
    return [str(p) for p in PurePosixPath(rel).parents if str(p) != "."]


# ---------------------------------------------------------------------------------------------
# Model directories


def export_model_dir(
    store,
    out: Path,
    key: str,
    weights: TensorSource,
    *,
    step: str,
    where: str | None = None,
    readme: str,
    side_files_from: Path | None,
    finish: Callable[[Path], None] | None = None,
    max_shard_bytes: int = 5 * 2**30,
    weight_files: dict[str, tuple[Path, dict]] | None = None,
) -> str:
    """Export `weights` (the artifact `key` of step `step`) as a Hugging Face model directory at
    `out`; returns what was done. `finish(dir)` adds the caller's files (heads) to the new
    directory before it is recorded and swapped in. `store` gives the lock (None: no lock).

    `weight_files` ({name: (path, record with its xxh3_128)}): the artifact's own safetensors files
    (and index), already checked by the store; they are hard-linked into the export (reflinked,
    else copied, across file systems) instead of writing `weights` again, and read once more after
    the link (whose stamp it moved), so that the manifest's record vouches for these bytes only. A
    hard link is the store's file itself: editing the exported weights in place changes the
    artifact too. The store notices (the file's stamp moves, so the artifact is verified whole
    again, fails its checksum, is moved to quarantine and recomputed), the export's record no
    longer matches, and this export then refuses to replace the edited file, which is the user's now."""
    out = Path(out)
    where = where or str(out)
    with export_lock(store, out):
        if out.is_symlink() or (os.path.lexists(out) and not out.is_dir()):
            raise ExportError(f"{where}: {out} exists and is not a directory fmerge wrote (a file or a symbolic "
                              f"link); refusing to replace it. Export to another path, then run again.")
        _recover(out)
        manifest = read_manifest(out, where) if out.is_dir() else None
        if manifest is None and out.is_dir() and any(out.iterdir()):
            raise ExportError(f"{where}: {out} exists and was not written by fmerge; refusing to replace it (it has "
                              f"no {MARKER} naming the files fmerge wrote). Remove it or export elsewhere.")
        stale, fresh = _export_dir_check(out, key, manifest)
        if stale is None:
            if fresh:  # the same bytes, their stamps moved (a link made elsewhere): kept, so status need not read them
                _write_json(out / MARKER, {**manifest, "files": {**manifest["files"], **fresh}})
            return f"export {out} up to date"
        owned, user, dirs = _classify(out, manifest, where) if manifest is not None else ({}, [], [])
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            raise _export_error(out, exc) from exc
        try:
            (tmp / BUILDING).touch()
            linked: dict[str, dict] = {}  # the store's files, hard-linked: their records
            digests: dict[str, str] = {}
            if weight_files:
                for name, (src, record) in weight_files.items():
                    place_file(src, tmp / name)
                    # read once more, after the link moved its stamp: what the record trusts later
                    # is these bytes, never an edit made meanwhile to the store's file
                    linked[name] = _record(tmp / name)
                    if linked[name]["xxh3_128"] != record["xxh3_128"]:
                        raise ExportError(
                            f"{where}: the store's weight file {src} changed while it was exported (it no longer "
                            f"matches its checksum); nothing was published. Run again: the artifact is checked "
                            f"and recomputed.")
            else:
                layout = [(n, weights.dtype(n), weights.shape(n)) for n in weights.names()]
                digests = write_weight_files(tmp, layout, ((n, weights.get(n)) for n in weights.names()),
                                             {"format": "pt", "fmerge_key": key}, max_shard_bytes)
            notes: list[str] = []  # what the card must say about the side files (a tokenizer copied as is)
            if side_files_from is not None:
                copy_side_files(Path(side_files_from), tmp, notes)
            with open(tmp / "README.md", "x") as fh:
                fh.write(readme + "".join(notes))
            if finish is not None:
                finish(tmp)
            written, _ = _walk(tmp)
            records = {rel: linked.get(rel) or _record(tmp / rel, digests.get(rel)) for rel in written if rel != BUILDING}
            carried = _carry(out, tmp, user, dirs, owned, where)
            with open(tmp / MARKER, "x") as fh:
                json.dump({"format": FORMAT, "key": key, "step": step, "fmerge_version": __version__,
                           "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "files": records}, fh, indent=1)
            (tmp / BUILDING).unlink()
            old = _swap_into_place(tmp, out)
        except OSError as exc:
            _discard_build(tmp, out)
            raise _export_error(out, exc) from exc
        except BaseException:
            _discard_build(tmp, out)
            raise
    note = f"exported {out}"
    if carried:
        note += f" (kept {len(carried)} file(s) of yours: {few(carried, 3)})"
    if old is not None:
        try:
            left = _retire(old, out)
        except OSError as exc:
            left = [f"({exc.strerror or exc})"]
        if left:
            note += f"; {old} keeps {few(left, 3)}, which were not moved (a name taken in the new export)"
    return note


def export_dir_state(out: Path, key: str, manifest: dict | None | bool = False) -> str | None:
    """None when the directory `out` holds exactly the export of artifact `key` (every file the
    manifest records, each unchanged), else what an export would change there. Costs stat calls
    while the files' stamps match their records; a file whose stamp moved is read."""
    return _export_dir_check(out, key, manifest)[0]


def _export_dir_check(out: Path, key: str, manifest: dict | None | bool = False) -> tuple[str | None, dict]:
    """(export_dir_state, {file: fresh record} of the files whose stamp moved but whose bytes are
    still the recorded ones: a hard link made or removed elsewhere moves the ctime of the file)."""
    if manifest is False:
        try:
            manifest = read_manifest(out) if out.is_dir() and not out.is_symlink() else None
        except ExportError:
            return f"export {out} has an unreadable record {MARKER}", {}
    if manifest is None:
        return f"export {out} is missing", {}
    if manifest.get("key") != key:
        return f"export {out} holds another artifact", {}
    recorded = manifest.get("files") or {}
    if not recorded:
        return f"export {out} is of an fmerge without a record of its files", {}
    fresh = {}
    for rel, rec in recorded.items():
        path = out / rel
        try:
            st = path.lstat()
        except OSError:
            return f"{path} is missing", {}
        same_stamp = "ctime_ns" in rec and _stamp(st) == {k: rec.get(k) for k in ("size", "mtime_ns", "ctime_ns", "ino")}
        if same_stamp:
            continue
        if "xxh3_128" not in rec or not stat.S_ISREG(st.st_mode) or st.st_size != rec.get("size"):
            if _matches(path, rec):
                continue
            return f"{path} is changed", {}
        try:
            now = _record(path)
        except ExportError:
            return f"{path} is changed", {}
        if now["xxh3_128"] != rec["xxh3_128"]:
            return f"{path} is changed", {}
        fresh[rel] = now
    return None, fresh


def export_file_state(target: Path, key: str) -> str | None:
    """None when the single-file export `target` (a Fisher diagonal) is artifact `key`'s, as
    recorded in its sidecar and unchanged; else what an export would change."""
    record = _read_sidecar(sidecar_of(target))
    records = record["records"] if record else []
    if not os.path.lexists(target):
        return f"export {target} is missing"
    if not record or record.get("key") != key or not records:
        return f"export {target} holds another artifact"
    return None if _matches(target, records[0]) else f"{target} is changed"


def place_file(src: Path, dst: Path) -> str:
    """Put the bytes of `src` at the new path `dst`: a hard link where the file system allows it, a
    reflink (a copy-on-write clone) where not, else one copy. Returns which it was."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return "link"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        try:
            import fcntl

            fcntl.ioctl(fout.fileno(), 0x40049409, fin.fileno())  # FICLONE
            return "reflink"
        except (ImportError, OSError):
            shutil.copyfileobj(fin, fout, 1 << 22)
            return "copy"


def _export_error(out: Path, exc: OSError) -> ExportError:
    return ExportError(f"Exporting the model to {out} failed: {exc.strerror or exc}. The partial export was "
                       f"removed{' and the previous one kept' if out.exists() else ''}; free space or "
                       f"choose another export directory, then run again.")


def _discard_build(tmp: Path, out: Path) -> None:
    """Remove an unfinished build: fmerge's own files, and links to user files that still are in
    the export (never swapped: the swap is the build's last act)."""
    if os.path.lexists(tmp) and (os.path.lexists(tmp / BUILDING) or not os.path.lexists(tmp / MARKER)):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):  # complete but not swapped in: remove as any retired export
        try:
            _retire(tmp, out)
        except OSError:
            pass


def _classify(out: Path, manifest: dict, where: str) -> tuple[dict[str, dict | None], list[str], list[str]]:
    """({file fmerge wrote: its record}, the user's entries, directories) of an existing export;
    files fmerge wrote and that were changed since are refused."""
    files, dirs = _walk(out)
    records = manifest.get("files")
    owned: dict[str, dict | None] = {}
    user, changed = [], []
    for rel in files:
        if rel == MARKER:
            continue
        if records is None:  # an export of fmerge < manifests
            if _legacy_owned(rel) and _matches(out / rel, None):
                owned[rel] = None
            else:
                user.append(rel)
        elif rel in records:
            if _matches(out / rel, records[rel]):
                owned[rel] = records[rel]
            else:
                changed.append(rel)
        else:
            user.append(rel)
    if changed:
        raise ExportError(
            f"{where}: {few(changed, 5)} in {out} changed since fmerge wrote them (size or content differ from "
            f"the export's record {MARKER}), so they are yours now and fmerge will neither overwrite nor "
            f"delete them. Move them out of {out} (or restore them), then run again.")
    return owned, user, dirs


def _carry(out: Path, tmp: Path, user: list[str], dirs: list[str], owned: dict, where: str) -> list[str]:
    """Bring the user's entries of `out` into the new export `tmp` untouched; returns them."""
    fm_dirs = {a for rel in owned for a in _ancestors(rel)}
    user_dirs = {a for rel in user for a in _ancestors(rel)}
    keep_dirs = [d for d in dirs if d in user_dirs or d not in fm_dirs]

    def conflict(rel: str) -> ExportError:
        return ExportError(
            f"{where}: {out / rel} was not written by fmerge (the export's record {MARKER} does not list it), "
            f"and the new export writes a file of that name. fmerge never overwrites a file it did not write: "
            f"move or rename {out / rel}, then run again (your other files are kept).")

    def need_dir(rel: str) -> None:
        for d in [*reversed(_ancestors(rel)), rel]:
            if (tmp / d).is_symlink() or (os.path.lexists(tmp / d) and not (tmp / d).is_dir()):
                raise conflict(d)
            (tmp / d).mkdir(exist_ok=True)

    for d in keep_dirs:
        need_dir(d)
    for rel in user:
        src, dst = out / rel, tmp / rel
        parent = str(PurePosixPath(rel).parent)
        if parent != ".":
            need_dir(parent)
        if os.path.lexists(dst):
            raise conflict(rel)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            mode = os.lstat(src).st_mode
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISREG(mode):
                shutil.copy2(src, dst, follow_symlinks=False)
            else:
                raise ExportError(
                    f"{where}: {src} is not a regular file and this file system cannot link it into the new "
                    f"export; fmerge will not delete it with the old one. Move it out of {out}, then run again.")
    for d in reversed(keep_dirs):  # permissions last: a read-only directory was still filled
        shutil.copystat(out / d, tmp / d, follow_symlinks=False)
    return user


def _twin(a: Path, b: Path) -> bool:
    """Whether `b` holds what `a` holds: the same file (a hard link), the same link, the same bytes."""
    try:
        sa, sb = a.lstat(), b.lstat()
    except OSError:
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    if stat.S_ISLNK(sa.st_mode) and stat.S_ISLNK(sb.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode) and sa.st_size == sb.st_size:
        return filecmp.cmp(a, b, shallow=False)
    return False


def _retire(d: Path, out: Path) -> list[str]:
    """Remove a previous export (or a complete one never swapped in) at `d`, beside `out`: the
    files its record lists that still match it, and entries `out` now holds too. Anything else is
    moved into `out` if that name is free there, else left in `d`; returns what was left."""
    try:
        manifest = read_manifest(d)
    except FmergeError:
        manifest = None
    records = manifest.get("files") if manifest is not None else {}
    files, dirs = _walk(d)
    for rel in files:
        if rel == MARKER:
            continue
        p = d / rel
        if records is None:
            ours = _legacy_owned(rel) and _matches(p, None)
        else:
            ours = rel in records and _matches(p, records[rel])
        if ours or _twin(p, out / rel):
            p.unlink()
    left = []
    for rel in files:
        if rel == MARKER or not os.path.lexists(d / rel):
            continue
        target = out / rel
        try:
            if os.path.lexists(target):
                raise FileExistsError
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(d / rel, target)
        except OSError:
            left.append(rel)
    if not left:
        (d / MARKER).unlink(missing_ok=True)
    for rel in sorted(dirs, key=lambda r: -r.count("/")):
        try:
            (d / rel).rmdir()
        except OSError:
            pass
    try:
        d.rmdir()
    except OSError:
        pass
    return left


def _dead_leftovers(target: Path) -> list[tuple[Path, str]]:
    """(path, 'tmp' or 'old') beside `target` left by exports of processes no longer running."""
    if not target.parent.is_dir():
        return []
    found = []
    for p in target.parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and m["name"] == target.name and not pid_alive(int(m["pid"])):
            found.append((p, m["what"]))
    return found


def _recover(out: Path) -> None:
    """Tidy what exports killed midway left beside `out` (never a user's file)."""
    dead = [(p, what) for p, what in _dead_leftovers(out) if p.is_dir() and not p.is_symlink()]
    if not os.path.lexists(out):
        # killed between the two renames of a swap without RENAME_EXCHANGE: put an export back
        whole = [(p, what) for p, what in dead if (p / MARKER).is_file() and not os.path.lexists(p / BUILDING)]
        if whole:
            back = min(whole, key=lambda x: x[1] != "old")[0]  # the previous export first
            os.rename(back, out)
            dead = [(p, what) for p, what in dead if p != back]
    for p, _ in dead:
        if os.path.lexists(p / BUILDING) or not os.path.lexists(p / MARKER):
            shutil.rmtree(p, ignore_errors=True)  # an unfinished build (see _discard_build)
        else:
            _retire(p, out)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported here."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(tmp: Path, out: Path) -> Path | None:
    """Put the complete directory `tmp` at `out`; returns where the previous `out` now is."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return None
    if _rename_exchange(tmp, out):
        return tmp  # tmp now names the previous export
    old = out.parent / f".{out.name}.old-{os.getpid()}.{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    return old


# ---------------------------------------------------------------------------------------------
# Side files


def _allowed_roots(model_dir: Path) -> list[Path]:
    real = _real(model_dir)
    roots = [real]
    # a hub download: models--org--name/snapshots/<revision>/config.json -> ../../blobs/<sha256>
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(real.parent.parent)
    return roots


# Names of the files a tokenizer is read from: with none of them a model directory has no tokenizer
# (AutoTokenizer would otherwise build an empty one from config.json alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
# Side files that are not the tokenizer's: copied as they are even when the tokenizer is saved anew.
_CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")


def copy_side_files(model_dir: Path, dest: Path, notes: list[str] | None = None) -> list[str]:
    """Write the base model's config and tokenizer into `dest`; returns the names written.

    The tokenizer is loaded (local files only, never its own code) and written with
    `save_pretrained`, so a chat template and every file it needs come along; if it does not
    load, the files io.SIDE_FILES names are copied as they are and `notes` gets a paragraph for
    the model card saying so. Only regular files inside the model directory are read."""
    roots = _allowed_roots(model_dir)
    for name in SIDE_FILES:
        _side_source(model_dir / name, model_dir, roots)
    saved = _save_tokenizer(model_dir, dest, roots, notes)
    copied = []
    for name in SIDE_FILES:
        if saved and name not in _CONFIG_FILES:
            continue  # the tokenizer was written by save_pretrained
        real = _side_source(model_dir / name, model_dir, roots)
        if real is None:
            continue
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a fifo must not block us
        with os.fdopen(fd, "rb") as fh, open(dest / name, "xb") as target:
            shutil.copyfileobj(fh, target, 1 << 22)
        copied.append(name)
    return copied + saved


def _side_source(src: Path, model_dir: Path, roots: list[Path]) -> Path | None:
    """The real path of a side file to read, None if absent (or a dangling link); a link leading
    out of the model directory, a fifo, device or socket is refused."""
    if not os.path.lexists(src):
        return None
    real = _real(src)
    if not any(_within(real, r) for r in roots):
        raise ExportError(
            f"Base model file {src} is a symbolic link to {real}, outside the model directory {model_dir}. "
            f"fmerge copies the base's config and tokenizer files into the export, which is made to be "
            f"shared, and never follows a link out of the model directory (it could publish a private file). "
            f"Replace the link by a copy of the file it should be (cp --remove-destination {real} {src}), "
            f"or point 'base' at the directory holding the real files, then run again.")
    if not os.path.lexists(real):
        return None  # a dangling link: there is nothing to copy
    mode = os.stat(real).st_mode
    if not stat.S_ISREG(mode):
        what = ("a directory" if stat.S_ISDIR(mode) else "a fifo" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
        raise ExportError(
            f"Base model file {src} is {what}, not a regular file; fmerge copies only regular files "
            f"into an export. Replace it by the real file or remove it from {model_dir}, then run again.")
    return real


def _save_tokenizer(model_dir: Path, dest: Path, roots: list[Path], notes: list[str] | None) -> list[str]:
    """Load the tokenizer of `model_dir` and save it into `dest`; the names written, [] when the
    directory has no tokenizer or it does not load (then `notes` says why)."""
    if not any(os.path.lexists(model_dir / n) for n in TOKENIZER_FILES):
        return []
    # Whatever the loader may read (chat templates included) must be a regular file inside the
    # model directory, as the side files are: the export publishes it.
    extra = model_dir / "additional_chat_templates"
    entries = [*model_dir.iterdir(), *(extra.iterdir() if extra.is_dir() and not extra.is_symlink() else [])]
    for entry in entries:
        if entry.name.endswith(_WEIGHT_SUFFIXES) or (entry.is_dir() and any(_within(_real(entry), r) for r in roots)):
            continue  # weights are not the tokenizer's, nor is a directory read as a file
        _side_source(entry, model_dir, roots)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure to load falls back to copying, said in the card
        if notes is not None:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            notes.append(tokenizer_fallback_note(str(model_dir), why))
        return []
    scratch = dest / ".tokenizer"
    tokenizer.save_pretrained(scratch)
    names = sorted(p.name for p in scratch.iterdir())
    for n in names:
        os.rename(scratch / n, dest / n)
    scratch.rmdir()
    return names


# ---------------------------------------------------------------------------------------------
# Single files


def sidecar_of(target: Path) -> Path:
    return target.parent / f".{target.name}{SIDECAR_SUFFIX}"


def _read_sidecar(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("records"), list) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "x") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fmerge_header(path: Path) -> bool:
    """Whether a safetensors file's header names an fmerge artifact (`fmerge_key` metadata)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 * 2**20:
                return False
            meta = json.loads(fh.read(n)).get("__metadata__") or {}
        return isinstance(meta, dict) and "fmerge_key" in meta
    except (OSError, struct.error, ValueError, UnicodeDecodeError, AttributeError):
        return False


def export_tensor_file(store, target: Path, key: str, tensors: TensorSource, *, where: str | None = None,
                       metadata: dict[str, str] | None = None) -> str:
    """Export `tensors` (the artifact `key`) as one safetensors file `target`, recorded in its
    sidecar; returns what was done. A file fmerge did not write is never replaced."""
    target = Path(target)
    where = where or str(target)
    sidecar = sidecar_of(target)
    with export_lock(store, target):
        for p, _ in _dead_leftovers(target):
            if p.is_file() and not p.is_symlink():
                p.unlink()  # a partial write of a killed export
        if target.is_symlink() or (os.path.lexists(target) and not target.is_file()):
            raise ExportError(f"{where}: {target} exists and is not a file fmerge wrote (a directory or a link); "
                              f"refusing to replace it. Export to another path, then run again.")
        record = _read_sidecar(sidecar)
        keep: list[dict] = []
        if os.path.lexists(target):
            records = record["records"] if record else []
            if export_file_state(target, key) is None:
                return f"export {target} up to date"
            keep = [r for r in records if _matches(target, r)][:1]
            if not keep and record is None and _fmerge_header(target):
                keep = [_record(target)]  # written by an fmerge older than sidecars
            if not keep:
                why = ("it was changed since fmerge wrote it" if record else
                       f"it has no record {sidecar.name} beside it and no fmerge_key in its header")
                raise ExportError(f"{where}: {target} exists and was not written by fmerge ({why}); refusing to "
                                  f"replace it. Move or remove it, or export elsewhere, then run again.")
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            names = tensors.names()
            w = StreamingSafetensorsWriter(tmp, [(n, tensors.dtype(n), tensors.shape(n)) for n in names],
                                           {"format": "pt", "fmerge_key": key, **(metadata or {})})
            try:
                for n in names:
                    w.write(n, tensors.get(n))
            finally:
                w.fh.close()
            w.close()
            new = _record(tmp, w.digest)
            entry = {"format": FORMAT, "key": key, "file": target.name, "fmerge_version": __version__,
                     "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            _write_json(sidecar, {**entry, "records": [new, *keep]})  # both, until the new one is in place
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ExportError(f"{where}: writing {target} failed: {exc.strerror or exc}. "
                              f"{'The previous file was kept; ' if os.path.lexists(target) else ''}free space "
                              f"or choose another export path, then run again.") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _write_json(sidecar, {**entry, "records": [_renamed_stamp(target, new)]})
    return f"wrote {target}"


def _renamed_stamp(path: Path, rec: dict) -> dict:
    """`rec` of a file just renamed into place: the rename moved its ctime, nothing else may
    have moved (else the old stamp is kept, and the next check reads the file)."""
    st = _stamp(path.lstat())
    same = all(st[k] == rec[k] for k in ("size", "mtime_ns", "ino"))
    return {**rec, **st} if same else rec


# ---------------------------------------------------------------------------------------------
# Results files (an eval step's `output`, `fmerge eval --output`)

OUTPUT_RECORD = ".fmerge-output.json"  # in an output directory: the files fmerge wrote there


def _output_records(out: Path) -> dict[str, list[dict]]:
    """{file name: its acceptable records} of the results files fmerge wrote in `out`."""
    try:
        data = json.loads((out / OUTPUT_RECORD).read_text())
        files = data.get("files") if isinstance(data, dict) else None
        return {n: r for n, r in files.items() if isinstance(r, list)} if isinstance(files, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _output_record(path: Path, records: list[dict], expected: bytes | None) -> dict | bool | None:
    """The record `path` still matches (a file fmerge wrote, unchanged); None: there is nothing at
    `path`; False: it is the user's (unrecorded, or changed since) unless it holds exactly
    `expected`, what fmerge would write (as an fmerge before records wrote it): then its new record."""
    if not os.path.lexists(path):
        return None
    rec = next((r for r in records if _matches(path, r)), None)
    if rec is not None:
        return rec
    if expected is not None and path.is_file() and not path.is_symlink() and len(expected) == path.lstat().st_size:
        rec = _record(path)
        return rec if rec["xxh3_128"] == xxhash.xxh3_128_hexdigest(expected) else False
    return False


def read_output(out: Path, name: str) -> bytes | None:
    """The bytes of results file `name` in `out` if fmerge wrote it there, unchanged; else None."""
    path = Path(out) / name
    if any(_matches(path, r) for r in _output_records(Path(out)).get(name, [])):
        try:
            return path.read_bytes()
        except OSError:
            return None
    return None


def output_state(out: Path, files: dict[str, bytes], drawn: list[str]) -> str | None:
    """None when `out` holds each of `files` with exactly these bytes and each `drawn` file (a plot
    drawn from them) as fmerge wrote it; else what writing them would change. Stat calls while
    the recorded stamps match."""
    records = _output_records(out)
    for name in [*files, *drawn]:
        path, recs = out / name, records.get(name, [])
        data = files.get(name)
        if data is not None and not any(r.get("xxh3_128") == xxhash.xxh3_128_hexdigest(data) for r in recs):
            return f"{path} is {'missing' if not os.path.lexists(path) else 'not what the recipe writes'}"
        if not any(_matches(path, r) for r in recs):
            return f"{path} is {'missing' if not os.path.lexists(path) else 'changed'}"
    return None


def write_outputs(store, out: Path, files: dict[str, bytes], draw: dict[str, Callable[[Path], None]],
                  redraw: bool, where: str) -> list[str]:
    """Write each of `files` (bytes) and draw each of `draw` (name -> draw(path), all of them when
    `redraw` or missing) into `out`, recorded in `out/.fmerge-output.json`; returns the names
    written. A file is written only when its bytes change, so Make sees no newer file otherwise.
    A file fmerge did not write there, or one of its files changed since, is never overwritten:
    refused by name before anything is written."""
    out = Path(out)
    with export_lock(store, out):
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"{where}: cannot create the results directory {out}: {exc.strerror or exc}; choose "
                              f"another 'output', then run again.") from exc
        records = _output_records(out)
        owned = {name: _output_record(out / name, records.get(name, []), files.get(name)) for name in [*files, *draw]}
        if not os.path.lexists(out / OUTPUT_RECORD) and any(owned[n] for n in files):
            # results written by an fmerge before records (the same bytes): its plots are fmerge's too, drawn again
            owned.update({n: None for n in draw if owned[n] is False})
        theirs = [name for name, rec in owned.items() if rec is False]
        if theirs:
            raise ExportError(
                f"{where}: {few([str(out / n) for n in theirs], 4)} exist and were not written by fmerge (or were "
                f"changed since, by the record {out / OUTPUT_RECORD}); fmerge never overwrites a file it did not "
                f"write. Move them out of {out}, or choose another 'output' directory, then run again.")
        records.update({name: [rec] for name, rec in owned.items() if rec})
        todo: dict[str, Callable[[Path], None]] = {}
        for name, data in files.items():
            if not owned[name] or owned[name]["xxh3_128"] != xxhash.xxh3_128_hexdigest(data):
                todo[name] = lambda tmp, data=data: tmp.write_bytes(data)
        todo.update({name: fn for name, fn in draw.items() if redraw or not owned[name]})
        for name, fn in todo.items():
            path = out / name
            tmp = out / f".{name}.tmp-{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                fn(tmp)
                os.chmod(tmp, 0o644)
                new = _record(tmp)
                records[name] = [new, *records.get(name, [])[:1]]  # both, until the new one is in place
                _write_json(out / OUTPUT_RECORD, {"format": 1, "files": records})
                os.replace(tmp, path)
            except OSError as exc:
                raise ExportError(f"{where}: writing {path} failed: {exc.strerror or exc}; free space or choose "
                                  f"another 'output', then run again.") from exc
            finally:
                if os.path.lexists(tmp):
                    tmp.unlink()
            records[name] = [_renamed_stamp(path, new)]
        if todo or not os.path.lexists(out / OUTPUT_RECORD) or records != _output_records(out):
            _write_json(out / OUTPUT_RECORD, {"format": 1, "files": records})
    return list(todo)
