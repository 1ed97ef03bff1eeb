"""The command line: list, info, bench speed."""

import json

import torch
from typer.testing import CliRunner

import attnlab
from attnlab.cli import app

runner = CliRunner()


def test_list_json_has_every_mechanism():
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == attnlab.mechanisms()
    assert all(r["paper"] for r in rows)


def test_list_table_and_family_filter():
    result = runner.invoke(app, ["list", "--family", "exact"])
    assert result.exit_code == 0
    assert "softmax" in result.output and "chunked" in result.output


def test_info_and_unknown_name():
    ok = runner.invoke(app, ["info", "chunked"])
    assert ok.exit_code == 0 and "arXiv:2112.05682" in ok.output and "query_chunk" in ok.output
    bad = runner.invoke(app, ["info", "nope"])
    assert bad.exit_code == 2 and "known:" in bad.output


def test_bench_speed_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "speed",
            "--mechanisms",
            "softmax,chunked",
            "--n",
            "32",
            "--repeats",
            "1",
            "--heads",
            "2",
            "--head-dim",
            "8",
            "--config",
            "chunked:query_chunk=8",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())["rows"]
    assert {r["mechanism"] for r in records} == {"sdpa", "softmax", "chunked"}
    assert all(r["config"] == {"query_chunk": 8} for r in records if r["mechanism"] == "chunked")


def test_bench_speed_rejects_bad_config():
    result = runner.invoke(app, ["bench", "speed", "--n", "32", "--config", "chunked"])
    assert result.exit_code != 0 and "NAME:KEY=VALUE" in result.output


def test_bench_speed_says_when_cuda_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["bench", "speed", "--n", "32", "--device", "cuda"])
    assert result.exit_code != 0
    assert "--device" in result.output and "CUDA is not available" in result.output
