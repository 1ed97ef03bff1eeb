"""docs/mechanisms.md is generated from the registry and must not go stale."""

import dataclasses
from pathlib import Path

import attnlab
from attnlab.core import mechanism_class
from attnlab.report import mechanisms_doc

PAGE = Path(__file__).resolve().parents[2] / "docs" / "mechanisms.md"


def test_mechanisms_page_matches_registry():
    assert PAGE.read_text(encoding="utf-8") == mechanisms_doc.mechanisms_markdown(), (
        f"docs/mechanisms.md is stale: run `{mechanisms_doc.REGENERATE}`"
    )


def test_page_has_every_mechanism_with_its_spec_config_and_definition():
    page = mechanisms_doc.mechanisms_markdown()
    for name in attnlab.mechanisms():
        cls = mechanism_class(name)
        section = mechanisms_doc.mechanism_section(name)
        assert f"\n### {name}\n" in page
        assert section in page
        assert cls.spec.paper.split(":")[-1] in section
        assert f"| cost | {cls.spec.complexity.replace('|', chr(92) + '|')} |" in section
        for field in dataclasses.fields(cls.Config):
            assert f"| `{field.name}` |" in section
        first_line = cls.__doc__.strip().splitlines()[0]
        assert first_line in section


def test_config_rows_give_type_and_default():
    rows = dict(
        (name, (kind, default)) for name, kind, default in mechanisms_doc.config_rows("window")
    )
    assert rows["window"] == ("int", "256")
    assert rows["backend"] == ("str", "'auto'")


def test_output_is_deterministic():
    assert mechanisms_doc.mechanisms_markdown() == mechanisms_doc.mechanisms_markdown()


def test_main_writes_then_reports_up_to_date(tmp_path, capsys):
    path = tmp_path / "mechanisms.md"
    assert mechanisms_doc.main([str(path)]) == 0
    assert path.read_text(encoding="utf-8") == mechanisms_doc.mechanisms_markdown()
    assert mechanisms_doc.main([str(path)]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert mechanisms_doc.main([]) == 2
