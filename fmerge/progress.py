"""Progress and log lines for long work.

On a terminal: a rich progress bar (gone when done). Off a terminal (CI, Slurm, `| tee`): plain
lines with a timestamp, at the start, every 10% (at most one such line per `min_seconds`, so a
quick task says only start and done) or every `every_seconds` while it advances, and when done,
with the elapsed time. The command line's global options set `SETTINGS`:
`-q` silences progress and info lines, `-v` adds debug lines, `--log FILE` also appends every
plain line (progress, info; debug with `-v`) to FILE, even under `-q`. Warnings and errors are
printed by their callers and never silenced.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from rich.console import Console

QUIET, NORMAL, VERBOSE = -1, 0, 1


@dataclass
class Settings:
    verbosity: int = NORMAL
    log_file: Path | None = None
    every_seconds: float = 30.0  # off a terminal: a progress line at least this often while advancing
    min_seconds: float = 1.0  # ... and a 10% line only this long after the previous line


SETTINGS = Settings()


def configure(verbosity: int = NORMAL, log_file: Path | None = None, every_seconds: float = 30.0,
              min_seconds: float = 1.0) -> None:
    """Set the run's verbosity and log file (the CLI does, once per command)."""
    SETTINGS.verbosity, SETTINGS.log_file = verbosity, log_file
    SETTINGS.every_seconds, SETTINGS.min_seconds = every_seconds, min_seconds


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _plain(text: str) -> str:
    """Rich markup removed: what a log file holds."""
    from rich.text import Text

    try:
        return Text.from_markup(text).plain
    except Exception:  # not valid markup: the text as it is
        return text


def _to_log(text: str) -> None:
    if SETTINGS.log_file is not None:
        with open(SETTINGS.log_file, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp()} {_plain(text)}\n")


def emit(console: "Console", text: str, level: int = NORMAL) -> None:
    """An info (`level` NORMAL) or debug (VERBOSE) line (rich markup) on `console`: timestamped
    off a terminal, left out under `-q` (info) or without `-v` (debug); also to the log file."""
    if SETTINGS.verbosity >= level:
        console.print(text if console.is_terminal else f"{stamp()} {text}", highlight=False, soft_wrap=True)
    if level <= max(SETTINGS.verbosity, NORMAL):
        _to_log(text)


def info(console: "Console", text: str) -> None:
    emit(console, text, NORMAL)


def debug(console: "Console", text: str) -> None:
    emit(console, text, VERBOSE)


def _elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m{s:02d}s"


class _Lines:
    """The plain progress lines of one task, to the console (off a terminal) and the log file."""

    def __init__(self, console: "Console", description: str, total: int, to_console: bool):
        self.console, self.description, self.total, self.to_console = console, description, total, to_console
        self.done, self.start = 0, time.monotonic()
        self.last, self.next_tenth = self.start, 1

    def line(self, text: str) -> None:
        text = f"{self.description}: {text}"
        if self.to_console:
            self.console.print(f"{stamp()} {text}", markup=False, highlight=False, soft_wrap=True)
        _to_log(text)

    def count(self) -> str:
        return f"{self.done}/{self.total}" if self.total > 0 else str(self.done)

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        tenth = self.done * 10 // self.total if self.total > 0 else 0
        if self.total > 0 and self.done >= self.total:
            return  # the done line says it
        since = now - self.last
        if (tenth >= self.next_tenth and since >= SETTINGS.min_seconds) or since >= SETTINGS.every_seconds:
            pct = f" ({100 * self.done // self.total}%)" if self.total > 0 else ""
            self.line(f"{self.count()}{pct}, {_elapsed(now - self.start)}")
            self.last, self.next_tenth = now, max(self.next_tenth, tenth + 1)


@contextmanager
def tensor_progress(console: "Console", description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield an `advance(*ignored)` callable (one unit of `total` done): a bar on a terminal,
    timestamped lines elsewhere (see the module's docstring), nothing on the console under `-q`."""
    show = SETTINGS.verbosity > QUIET
    lines = _Lines(console, description, total, to_console=show and not console.is_terminal)
    if not lines.to_console and SETTINGS.log_file is None and not (show and console.is_terminal):
        yield lambda *_: None
        return
    lines.line(f"started, {total} to do")
    ok = False
    if show and console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        with progress:
            task = progress.add_task(description, total=total)

            def advance(*_):
                progress.advance(task)
                lines.advance()

            try:
                yield advance
                ok = True
            finally:
                lines.to_console = False  # on a terminal the bar said it; the log still gets the end
                _end(lines, ok)
        return
    try:
        yield lambda *_: lines.advance()
        ok = True
    finally:
        _end(lines, ok)


def _end(lines: _Lines, ok: bool) -> None:
    elapsed = _elapsed(time.monotonic() - lines.start)
    lines.line(f"done, {lines.count()} in {elapsed}" if ok else f"stopped at {lines.count()} after {elapsed}")
