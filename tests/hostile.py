"""Harness for the hostile-input corpus: run the real CLI in this process (no interpreter start per
case), and check that a refusal is one clear paragraph with exit status 2 that changed nothing.

    result = hostile.run(["validate", str(recipe)], cwd=tmp_path)
    hostile.assert_refused(result, "recipe.yaml:3", "steps.ta")
    before = hostile.snapshot(tmp_path); ...; assert hostile.snapshot(tmp_path) == before
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

MAX_MESSAGE = 1500  # characters: an error quotes values cut short, never a whole file


@dataclass
class Result:
    code: int
    out: str
    err: str


@contextmanager
def _cwd(path: Path | None):
    old = os.getcwd()
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run(args: list, cwd: Path | None = None, env: dict | None = None) -> Result:
    """`fmerge ARGS` through `fmerge.cli.main`, in process; exceptions other than the CLI's own
    exits propagate (a raw traceback is a failure of the case)."""
    from fmerge import cli

    out, err = io.StringIO(), io.StringIO()
    saved = (cli.out, cli.err, sys.argv, dict(os.environ))
    cli.out = Console(file=out, width=200, force_terminal=False, color_system=None)
    cli.err = Console(file=err, width=200, force_terminal=False, color_system=None)
    sys.argv = ["fmerge", *map(str, args)]
    os.environ.update({"COLUMNS": "200", **(env or {})})
    code = 0
    try:
        with _cwd(cwd):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        cli.out, cli.err, sys.argv = saved[0], saved[1], saved[2]
        os.environ.clear()
        os.environ.update(saved[3])
    return Result(code, out.getvalue(), err.getvalue())


def assert_refused(result: Result, *mentions: str) -> str:
    """Exit 2, one paragraph on stderr starting 'error:', no traceback, bounded length, naming
    every string in `mentions`. Returns the message."""
    text = result.err.strip()
    assert result.code == 2, f"exit {result.code}, stderr:\n{result.err}\nstdout:\n{result.out}"
    assert text.startswith("error:"), text
    assert "Traceback" not in result.err and "Traceback" not in result.out, text
    assert "\n\n" not in text, f"more than one paragraph:\n{text}"
    assert len(text) <= MAX_MESSAGE, f"{len(text)} characters:\n{text[:400]}..."
    flat = " ".join(text.split())
    for m in mentions:
        assert m in flat, f"message does not mention {m!r}:\n{text}"
    return text


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and link under `roots` with its size, mtime and mode: compare before and after
    a refused command to show it changed nothing."""
    state = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            state[str(root)] = None
            continue
        for p in [root, *sorted(root.rglob("*"))]:
            st = p.lstat()
            state[str(p)] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns if not p.is_dir() else 0, st.st_mode)
    return state
