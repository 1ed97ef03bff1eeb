"""attnlab.bench.tasks: rows, JSON and plots of a tiny sweep; mechanism spellings."""

from __future__ import annotations

import json

import pytest

import attnlab
from attnlab.bench.tasks import bench_tasks, parse_mechanism


def test_parse_mechanism_spellings():
    assert parse_mechanism("linear") == "linear"
    assert parse_mechanism("softmax:1+linear:3") == [("softmax", 1), ("linear", 3)]
    assert parse_mechanism("based/window") == ["based", "window"]
    with pytest.raises(attnlab.AttnInputError, match="mechanism"):
        parse_mechanism("softmax+linear")


def test_tiny_sweep_writes_rows_json_and_plots(tmp_path):
    out = tmp_path / "tasks.json"
    rows = bench_tasks(
        ["softmax", "window", "softmax:1+linear:1", "linear/window", "agent"],
        [16, 32],
        task="mqar/tiny",
        quick=True,
        out=out,
        progress=False,
        steps=4,
        eval_every=2,
        eval_examples=16,
        batch_size=8,
    )
    assert [(r["mechanism"], r["width"]) for r in rows] == [
        (m, w)
        for m in ("softmax", "window", "softmax:1+linear:1", "linear/window", "agent")
        for w in (16, 32)
    ]
    by = {(r["mechanism"], r["width"]): r for r in rows}
    # agent has no causal form: its rows say why instead of stopping the sweep
    assert "causal" in by[("agent", 16)]["error"]
    # a KV cache over 32 tokens outgrows the window's rolling cache (window = 32 / 8)
    assert by[("softmax", 16)]["state_floats"] > by[("window", 16)]["state_floats"]
    assert by[("softmax", 32)]["state_floats"] > by[("softmax", 16)]["state_floats"]
    for r in rows:
        if "error" not in r:
            assert 0.0 <= r["best_accuracy"] <= 1.0 and r["tokens_per_second"] > 0
            assert r["steps"] == 4
    record = json.loads(out.read_text())
    assert record["bench"] == "tasks" and len(record["rows"]) == len(rows)
    assert record["mechanism_config"]["window"] == {"window": 4}
    for name in record["plots"]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
