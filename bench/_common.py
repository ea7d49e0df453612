"""Helpers the bench scripts share."""

from __future__ import annotations

import os
from pathlib import Path


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (only ours: other jobs' caches stay)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
