"""docs/guide.md runs: every ```python block, in order, in one namespace.

The guide's examples load the embedded SmolLM2, so this test is marked ``slow``
like the other real-model tests; ``make test`` runs them all.
"""

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs the `models` extra")

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)

pytestmark = pytest.mark.slow


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return BLOCK.findall(text)


def test_python_blocks_are_found_and_shell_blocks_are_not():
    text = "a\n```python\nx = 1\n```\n```sh\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x\n"]


def test_guide_runs(tmp_path, monkeypatch):
    blocks = python_blocks(GUIDE.read_text(encoding="utf-8"))
    assert len(blocks) >= 10, f"docs/guide.md: expected its python examples, found {len(blocks)}"
    monkeypatch.chdir(tmp_path)  # anything an example writes stays out of the repository
    namespace: dict = {"__name__": "guide"}
    for number, code in enumerate(blocks, start=1):
        first = code.strip().splitlines()[0]
        try:
            exec(compile(code, f"docs/guide.md block {number}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(
                f"docs/guide.md python block {number} (starting {first!r}) failed: "
                f"{type(exc).__name__}: {exc}"
            )
