"""Content fingerprints of data files: what a cache key may say about data, never a name or a path.

A file's hash is remembered by its stat stamp (device, inode, size, mtime_ns, ctime_ns), so an
unchanged file is read once; a renamed data entry or a moved directory hashes to the same
fingerprint. The ctime is in the stamp because no user command sets it back: an edit followed by
`touch -r` (the mtime restored) is still seen.

Every file whose hash a `FileHashes` hands out is recorded in `files`: what entered the run's keys
(`Runtime.key_files`), so a test can check that a step reads nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CHUNK = 1 << 22


def file_stamp(path: Path) -> str:
    """What identifies a file's content without reading it: device, inode, size, mtime_ns, ctime_ns."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class FileHashes:
    """Content hashes of files and directory trees, cached in a JSON file by stat stamp (only
    read, never written, when `write` is false)."""

    def __init__(self, cache_file: Path | None, write: bool = True):
        self.cache_file, self.write = cache_file, write
        self._memo: dict[str, str] | None = None
        self._trees: dict[Path, tuple[str, list[Path]]] = {}  # this process's tree hashes and their files
        self.files: set[Path] = set()  # every file whose hash was handed out (resolved)
        self._dirty = False

    def _cache(self) -> dict[str, str]:
        if self._memo is None:
            try:
                self._memo = json.loads(self.cache_file.read_text()) if self.cache_file else {}
            except (OSError, ValueError):
                self._memo = {}
        return self._memo

    def file(self, path: Path) -> str:
        self.files.add(Path(path).resolve())
        stamp = file_stamp(path)
        cache = self._cache()
        if stamp not in cache:
            cache[stamp] = hash_file(path)
            self._dirty = True
        return cache[stamp]

    def tree(self, path: Path) -> str:
        """A file's hash, or for a directory the hash of its files' relative names and hashes."""
        path = Path(path)
        if path not in self._trees:
            if path.is_file():
                self._trees[path] = self.file(path), [path.resolve()]
            else:
                h = hashlib.blake2b(digest_size=16)
                files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
                for f in files:
                    h.update(f"{f.relative_to(path).as_posix()}|{self.file(f)}\n".encode())
                self._trees[path] = h.hexdigest(), [f.resolve() for f in files]
        digest, files = self._trees[path]
        self.files.update(files)  # recorded again when remembered: a later step's ledger needs them too
        return digest

    def named_files(self, directory: Path, names) -> dict[str, str]:
        """{name: hash} of those of `names` that are files in `directory` (side files of a model:
        config, tokenizer); a file that is absent is absent from the dict, so adding one changes it."""
        return {n: self.file(directory / n) for n in names if (directory / n).is_file()}

    def save(self) -> None:
        """Merge this process's new hashes into the cache file (best effort: a read-only store
        only hashes again next time)."""
        if not self._dirty or self.cache_file is None or not self.write:
            return
        from filelock import FileLock  # only a run that hashed something new takes this lock

        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.cache_file) + ".lock"):
                try:
                    on_disk = json.loads(self.cache_file.read_text())
                except (OSError, ValueError):
                    on_disk = {}
                on_disk.update(self._cache())
                tmp = self.cache_file.with_name(f"{self.cache_file.name}.tmp{os.getpid()}")
                tmp.write_text(json.dumps(on_disk))
                os.replace(tmp, self.cache_file)
            self._dirty = False
        except OSError:
            pass
