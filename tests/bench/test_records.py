"""The envelope of every JSON attnlab writes, its CSV rows, and the kernels' state."""

import csv
import json
from dataclasses import dataclass

import pytest
import torch

import attnlab
from attnlab.core import native
from attnlab.report import records


@dataclass
class _Row:
    name: str
    ms: float | None
    sizes: list


def test_envelope_fields_in_order_then_rows():
    with records.command_line(["attnlab", "bench", "speed", "--n", "4k", "a b"]):
        record = records.envelope([_Row("x", 1.5, [1, 2])], bench="speed")
    assert list(record) == [
        "schema",
        "attnlab",
        "torch",
        "transformers",
        "native",
        "threads",
        "date",
        "command",
        "bench",
        "rows",
    ]
    assert record["schema"] == records.SCHEMA and record["attnlab"] == attnlab.__version__
    assert record["torch"] == torch.__version__ and record["threads"] == torch.get_num_threads()
    assert record["command"] == "attnlab bench speed --n 4k 'a b'"
    assert record["rows"] == [{"name": "x", "ms": 1.5, "sizes": [1, 2]}]
    assert record["date"].endswith("+00:00")
    with pytest.raises(ValueError, match="command"):
        records.envelope([], command="attnlab list")


def test_native_state_with_and_without_describe(monkeypatch):
    monkeypatch.delattr(native, "describe", raising=False)
    monkeypatch.delattr(native, "summary", raising=False)
    state = records.native_state()
    assert state == {"built": native.library() is not None, "enabled": native.enabled()}
    with native.disabled():
        off = records.native_summary()
    assert off.startswith("compiled kernels:") and ("off" in off or "not built" in off)
    monkeypatch.setattr(native, "describe", lambda: {"built": True, "isa": "x"}, raising=False)
    monkeypatch.setattr(native, "summary", lambda: "kernels: x", raising=False)
    assert records.native_state() == {"built": True, "isa": "x"}
    assert records.native_summary() == "kernels: x"


def test_json_and_csv_files(tmp_path):
    rows = [_Row("a", 1.0, [1]), _Row("b", None, [])]
    path = records.write_json(tmp_path / "deep" / "r.json", rows, bench="t")
    assert json.loads(path.read_text())["rows"][1] == {"name": "b", "ms": None, "sizes": []}
    path = records.write_csv(tmp_path / "r.csv", [*rows, {"name": "c", "extra": {"k": 1}}])
    with path.open() as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["name", "ms", "sizes", "extra"]
    assert got[0] == {"name": "a", "ms": "1.0", "sizes": "[1]", "extra": ""}
    assert got[1]["ms"] == "" and got[2]["extra"] == '{"k": 1}'
