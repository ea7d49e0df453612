"""docs/api.md's examples run as written: every ```python block, in order, in one namespace, in an
empty directory (the first block builds the tiny models the others use); and the page documents
every function that `fmerge` exports."""

from __future__ import annotations

import re
from pathlib import Path

import fmerge

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def test_the_block_reader_finds_python_blocks_only():
    text = "a\n```python\nx = 1\n```\n```\nnot python\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def test_every_example_runs(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_md"}
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"docs/api.md, python block {number}", "exec")  # tracebacks name the block
        exec(code, namespace)


def test_every_exported_function_is_documented():
    """Each function `fmerge` exports has a section of its own (load_recipe: a mention)."""
    text = DOC.read_text()
    headings = "\n".join(line for line in text.splitlines() if line.startswith("## "))
    from fmerge import api

    functions = [n for n in fmerge.API_NAMES if callable(getattr(api, n, None)) and not n[0].isupper()]
    assert {"merge", "fisher", "fisher_many", "evaluate", "run", "status"} <= set(functions)
    missing = [n for n in functions if (f"fmerge.{n}(" not in text if n == "load_recipe" else
                                        f"`fmerge.{n}`" not in headings)]
    assert not missing, f"docs/api.md does not document {missing}"
