"""The model commands: eval ppl, capture-qk, bench capture (short inputs)."""

import json

import pytest
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


class _CharTokenizer:
    """A stand-in tokenizer: one token per character, remembering the lengths it read."""

    def __init__(self):
        self.read: list[int] = []

    def __call__(self, text, add_special_tokens=True):
        self.read.append(len(text))
        return {"input_ids": [ord(c) for c in text]}


def test_text_repeats_in_linear_time():
    """The copies were appended one by one to a growing list (quadratic: 400k tokens of
    a 3-character text took minutes); now they are joined once."""
    import time

    tok = _CharTokenizer()
    start = time.perf_counter()
    ids, copies = text_ids(tok, 400_000, "abc")
    assert time.perf_counter() - start < 2.0
    assert ids.shape == (1, 400_000) and copies == 80_001  # "abc" + 80_000 x "\n\nabc"
    assert ids[0, :8].tolist() == [ord(c) for c in "abc\n\nabc"]


def test_a_long_file_is_read_only_as_far_as_the_tokens_need(tmp_path):
    from attnlab.models.text import file_ids

    big = tmp_path / "big.txt"
    big.write_text("word " * 1_000_000)  # 5 MB
    tok = _CharTokenizer()
    ids, copies = file_ids(tok, 64, big)
    assert ids.shape == (1, 64) and copies == 1
    assert max(tok.read) <= 1 << 16  # the first 64 KiB, not 5 MB
    short = tmp_path / "short.txt"
    short.write_text("abc")
    ids, copies = file_ids(tok, 10, short)
    assert copies == 3 and ids[0].tolist() == [ord(c) for c in "abc\n\nabc\n\n"]


def test_perplexity_needs_a_causal_lm_within_its_context():
    from attnlab.core.errors import AttnInputError
    from attnlab.models.perplexity import check_causal_lm, max_positions

    class BertModel(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(AttnInputError, match="causal LM"):
        check_causal_lm(BertModel())
    assert max_positions({"max_position_embeddings": 512}) == 512
    assert max_positions({"n_positions": 1024}) == 1024 and max_positions({}) is None


def test_perplexity_refuses_more_tokens_than_positions(smollm2):
    from attnlab.core.errors import AttnInputError

    model, _ = smollm2
    with pytest.raises(AttnInputError, match="at most 8192 positions"):
        perplexity(model, torch.zeros(1, 8193, dtype=torch.long))
