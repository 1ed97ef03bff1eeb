"""The model commands: eval ppl, capture-qk, bench capture (short inputs)."""

import json

import torch
from typer.testing import CliRunner

from attnlab.cli import app
from attnlab.models import load_qk
from attnlab.models.perplexity import compare, perplexity
from attnlab.models.text import shipped_text, text_ids

runner = CliRunner()


def test_shipped_text_and_repetition(smollm2):
    _, tok = smollm2
    assert "truth universally acknowledged" in shipped_text()
    ids, copies = text_ids(tok)
    assert copies == 1 and ids.shape[1] > 4000
    long, copies = text_ids(tok, ids.shape[1] + 10)
    assert copies == 2 and long.shape[1] == ids.shape[1] + 10


def test_perplexity_exact_mechanism_equals_own(smollm2):
    model, tok = smollm2
    ids, _ = text_ids(tok, 96)
    own = perplexity(model, ids)
    assert 1 < own < 100
    rows = compare(model, ids, ["chunked"])
    assert abs(rows[1]["ppl"] - own) / own < 1e-4 and rows[0]["ratio"] == 1.0
    assert rows[1]["note"] is None  # token-causal: nothing to flag


def test_leak_note_flags_routing_that_reads_later_tokens():
    from attnlab.models.perplexity import leak_note

    assert leak_note("window") is None
    assert "per block" in leak_note("sparge") and "optimistic" in leak_note("mosa")


def test_eval_ppl_command(tmp_path):
    out = tmp_path / "ppl.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "ppl",
            "--mechanism",
            "online,window",
            "--config",
            "online:block_q=16",
            "--config",
            "window:window=16",
            "--tokens",
            "64",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["mechanism"] == "online" and abs(rows[1]["ratio"] - 1) < 1e-4
    assert rows[1]["config"] == {"block_q": 16} and rows[2]["config"] == {"window": 16}
    assert rows[2]["error"] is None and rows[2]["ratio"] > 1  # a 16-token window loses context
    bad = runner.invoke(app, ["eval", "ppl", "--mechanism", "nosuch", "--tokens", "8"])
    assert bad.exit_code == 2 and "unknown name" in bad.output


def test_eval_ppl_user_text(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The cat sat on the mat. " * 10)
    result = runner.invoke(
        app, ["eval", "ppl", "--mechanism", "chunked", "--text", str(f), "--tokens", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "on 32 tokens" in result.output and "1.0000" in result.output


def test_capture_qk_command(tmp_path):
    out = tmp_path / "qk.safetensors"
    result = runner.invoke(
        app,
        ["capture-qk", "--layers", "0,15", "--heads", "1,5", "--tokens", "40", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    kept = load_qk(out)
    assert sorted(kept) == [0, 15]
    q, k, v = kept[15]
    assert q.shape == k.shape == v.shape == (1, 2, 40, 64) and torch.isfinite(q).all()


def test_bench_capture_command(tmp_path):
    out = tmp_path / "cap.json"
    result = runner.invoke(app, ["bench", "capture", "--tokens", "128", "--out", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())["rows"][0]
    assert r["tokens"] == 128 and r["probe_rows"] == 270 and r["capture_peak_mb"] > 0
    assert "time ratio" in result.output
