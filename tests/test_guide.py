"""docs/guide.md runs: every ```python block, in order, in one namespace.

The guide's examples load the embedded SmolLM2, so running them is marked
``slow`` like the other real-model tests; ``make test`` runs them all.
"""

import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return BLOCK.findall(text)


def run_blocks(blocks: list[str], source: str = "docs/guide.md") -> dict:
    """Execute ``blocks`` in order in one namespace; on an error, fail naming the block's
    number (from 1) and its first line."""
    namespace: dict = {"__name__": "guide"}
    for number, code in enumerate(blocks, start=1):
        first = code.strip().splitlines()[0] if code.strip() else ""
        try:
            exec(compile(code, f"{source} block {number}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(
                f"{source} python block {number} (starting {first!r}) failed: "
                f"{type(exc).__name__}: {exc}"
            )
    return namespace


def test_python_blocks_are_found_and_shell_blocks_are_not():
    text = "a\n```python\nx = 1\n```\n```sh\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x\n"]


def test_blocks_share_one_namespace_and_a_failure_names_its_block():
    assert run_blocks(["x = 2\n", "y = x * 3\n"])["y"] == 6
    with pytest.raises(pytest.fail.Exception, match=r"block 2 \(starting '# second'\).*boom"):
        run_blocks(["x = 1\n", "# second\nraise ValueError('boom')\n"])


@pytest.mark.slow
def test_guide_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="needs the `models` extra")
    blocks = python_blocks(GUIDE.read_text(encoding="utf-8"))
    assert len(blocks) >= 10, f"docs/guide.md: expected its python examples, found {len(blocks)}"
    monkeypatch.chdir(tmp_path)  # anything an example writes stays out of the repository
    run_blocks(blocks)
