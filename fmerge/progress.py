"""Progress bars for long work (rich), quiet when output is not a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def tensor_progress(console: Console, description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield an `advance()` callable; shows a bar on a terminal, nothing otherwise."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True,
                        disable=not console.is_terminal)
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda *_: progress.advance(task)
