"""`attnlab analyze` end to end on the small MiniLM encoder: files land in --out only."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_analyze_minilm_writes_json_pngs_and_report_into_out_only(tmp_path, monkeypatch, minilm):
    from typer.testing import CliRunner

    from attnlab.cli import app

    text = tmp_path / "input.txt"
    text.write_text("The <script>alert(1)</script> cat sat on the mat. " * 4)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "analyze",
            "--model",
            "minilm",
            "--text",
            str(text),
            "--tokens",
            "20",
            "--analyses",
            "sinks,entropy,patterns,rollout,flow",
            "--out",
            "out",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt", "out"]
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "results.json",
        "report.html",
        "rollout.png",
        "flow.png",
        "heatmap_first_token_attention.png",
        "sink_positions.png",
    } <= files
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["meta"]["tokens"] == 20 and data["meta"]["model"] == "minilm"
    assert {r["analysis"] for r in data["rows"]} >= {
        "sinks",
        "entropy",
        "patterns",
        "rollout",
        "flow",
    }
    html = (tmp_path / "out" / "report.html").read_text()
    # WordPiece splits the tag into "<", "script", ">": each is escaped
    assert "<script" not in html and "&lt;" in html


def test_analyze_rejects_unknown_analyses_and_two_inputs(tmp_path):
    from typer.testing import CliRunner

    from attnlab.cli import app

    r = CliRunner().invoke(app, ["analyze", "--analyses", "sinks,bogus", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "bogus" in r.output
    r = CliRunner().invoke(app, ["analyze", "--needle", "--text", "x.txt", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "--needle" in r.output


def test_analyze_importance_method_reaches_head_importance(tmp_path, monkeypatch, smollm2):
    from typer.testing import CliRunner

    import attnlab.report.analyze as run
    from attnlab.cli import app

    asked = []

    def fake(model, ids, *, method, progress):
        asked.append(method)
        return [
            {
                "analysis": "importance",
                "layer": 0,
                "head": 0,
                "metric": "head_importance",
                "value": 0.5,
                "method": method,
            }
        ]

    monkeypatch.setattr(run, "head_importance", fake)
    args = ["analyze", "--tokens", "12", "--analyses", "importance", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, [*args, "--importance", "mask"])
    assert r.exit_code == 0, r.output
    assert asked == ["mask"]
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["importance"] == "mask"
    r = CliRunner().invoke(app, [*args, "--importance", "bogus"])
    assert r.exit_code != 0 and "--importance" in r.output
