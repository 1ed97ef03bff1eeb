"""The README's mechanism table is generated from the registry and must not go stale."""

from pathlib import Path

import attnlab
from attnlab.report import table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_table_matches_registry():
    text = README.read_text()
    assert table.markdown() in text, (
        "README.md's mechanism table is stale: run `attnlab list --update-readme README.md`"
    )


def test_table_has_every_mechanism_and_its_paper():
    md = table.markdown()
    for name in attnlab.mechanisms():
        assert f"| `{name}` |" in md
        assert attnlab.spec(name).paper.split(":")[-1] in md


def test_readme_python_example_runs():
    text = README.read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (1, 8, 1024, 64)
