"""benchmarks/ at the repository root: every JSON record is listed in its README with
the command that regenerates it, and holds rows (issue 13: figures out of the source)."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
RECORDS = sorted(BENCH.glob("*.json"))


def test_records_exist():
    assert (BENCH / "README.md").is_file()
    assert {"speed-cpu.json", "chunks-cpu.json"} <= {p.name for p in RECORDS}


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_each_record_is_named_with_its_command(path):
    readme = (BENCH / "README.md").read_text()
    commands = re.findall(r"`(attnlab bench [^`]+)`", readme)
    writers = [c for c in commands if c.endswith(f"--out benchmarks/{path.name}")]
    assert len(writers) == 1, f"{path.name}: no single command in benchmarks/README.md"
    rows = json.loads(path.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert rows and all(r.get("skipped") or (r.get("ms") or 0) > 0 for r in rows)
