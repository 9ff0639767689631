"""Every ```python block of the user docs runs: README.md and docs/*.md.

The blocks of one file run in order in one namespace (later blocks may use earlier
names), in a scratch working directory. A block right after a line
`<!-- doctest: skip -->` is left out (for code that needs a GPU, weights or a network).
A failure points at the Markdown file and the line inside it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted(path for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")] if path.is_file())
SKIP_MARKER = "<!-- doctest: skip -->"
PYTHON_FENCE = re.compile(r"^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """(first code line, code) of every ```python block not marked to skip."""
    blocks = []
    for match in PYTHON_FENCE.finditer(markdown):
        before = markdown[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() == SKIP_MARKER:
            continue
        first_line = markdown.count("\n", 0, match.start("code")) + 1
        blocks.append((first_line, match.group("code")))
    return blocks


def run_blocks(path: Path, blocks: list[tuple[int, str]]) -> dict:
    namespace: dict = {"__name__": f"doc:{path.name}"}
    for first_line, code in blocks:
        # Pad with newlines so tracebacks give the line number inside the Markdown file.
        exec(compile("\n" * (first_line - 1) + code, str(path), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(path.read_text())
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    run_blocks(path, blocks)


def test_compressors_guide_has_a_usage_example() -> None:
    assert python_blocks((ROOT / "docs" / "compressors.md").read_text())


def test_python_blocks_parser() -> None:
    markdown = (
        "# Title\n"
        "```python\nx = 1\n```\n"
        "```bash\necho no\n```\n"
        f"{SKIP_MARKER}\n"
        "```python\nraise RuntimeError\n```\n"
        "text\n"
        "```python\ny = x + 1\nassert y == 2\n```\n"
    )
    assert python_blocks(markdown) == [(3, "x = 1\n"), (14, "y = x + 1\nassert y == 2\n")]


def test_failures_point_at_the_markdown_line(tmp_path: Path) -> None:
    doc = tmp_path / "guide.md"
    doc.write_text("intro\n\n```python\nok = True\nassert not ok, 'boom'\n```\n")
    with pytest.raises(AssertionError, match="boom") as info:
        run_blocks(doc, python_blocks(doc.read_text()))
    assert info.traceback[-1].path == doc
    assert info.traceback[-1].lineno + 1 == 5  # pytest counts lines from 0
