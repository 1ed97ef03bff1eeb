"""The command line: list, info, the benches, and how every command answers bad input."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import attnlab
from attnlab.cli import app
from attnlab.core import native

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


# --- bad input: one line naming what is wrong and what to do, exit code 2 ---


def one_line_error(result, *needles: str) -> str:
    """Assert that ``result`` is a usage error: exit code 2, one line, no traceback, every
    needle in it; return the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("bench", ["speed", "scaling", "decode", "quality"])
def test_every_bench_names_a_misspelt_mechanism_in_one_line(bench):
    result = runner.invoke(app, ["bench", bench, "--mechanisms", "softmax,softmx"])
    one_line_error(result, "--mechanisms", "'softmx'", "did you mean softmax?")


def test_names_are_case_insensitive_and_sizes_count_in_1024(monkeypatch):
    from attnlab.bench import speed

    asked = {}

    def fake(names, ns, **kwargs):
        asked.update(names=names, ns=ns, configs=kwargs["configs"])
        return []

    monkeypatch.setattr(speed, "run_speed", fake)
    args = ["bench", "speed", "--mechanisms", "SoftMax,Chunked", "--n", "1k,4K,16k,100"]
    result = runner.invoke(app, [*args, "--config", "CHUNKED:query_chunk=2k"])
    assert result.exit_code == 0, result.output
    assert asked["names"] == ["softmax", "chunked"]
    assert asked["ns"] == [1024, 4096, 16384, 100]
    assert asked["configs"] == {"chunked": {"query_chunk": 2048}}
    assert native.summary() in result.output
    assert runner.invoke(app, ["info", "CHUNKED"]).exit_code == 0


def test_config_values_are_typed_by_the_mechanism_config(monkeypatch):
    from attnlab.bench import speed

    seen = {}
    monkeypatch.setattr(speed, "run_speed", lambda names, ns, **kw: seen.update(kw) or [])
    base = ["bench", "speed", "--mechanisms", "radial", "--n", "32", "--config"]
    assert runner.invoke(app, [*base, "radial:sink=False"]).exit_code == 0
    assert seen["configs"] == {"radial": {"sink": False}}  # a bool, not the string "False"
    one_line_error(runner.invoke(app, [*base, "radial:sink=maybe"]), "true or false", "sink")
    one_line_error(runner.invoke(app, [*base, "radial:block=1.5"]), "integer", "block")
    one_line_error(runner.invoke(app, [*base, "radial:is_causal=true"]), "causal")
    one_line_error(runner.invoke(app, [*base, "radial:blokc=4"]), "did you mean block?")
    # one syntax: NAME:KEY=VALUE, and only for a mechanism the command runs
    one_line_error(runner.invoke(app, [*base, "block=4"]), "NAME:KEY=VALUE")
    one_line_error(runner.invoke(app, [*base, "window:window=4"]), "window", "radial")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["bench", "speed", "--n", "4x"], ["--n", "4k"]),
        (["bench", "speed", "--n", "-5"], ["--n", "from 1 to"]),
        (["bench", "speed", "--n", "9999999k"], ["--n", "to 2147483647"]),
        (["bench", "speed", "--repeats", "x"], ["--repeats", "--help"]),
        (["bench", "speed", "--repeats", "0"], ["--repeats"]),
        (["bench", "speed", "--heads", "8", "--kv-heads", "3"], ["--kv-heads", "divisor"]),
        (["bench", "speed", "--dtype", "float33"], ["--dtype", "float32"]),
        (["bench", "speed", "--causal", "yes"], ["--causal", "both"]),
        (["bench", "decode", "--mechanisms", "agent"], ["agent", "no decoding step"]),
        (["bench", "quality", "--qk", "nowhere.safetensors"], ["--qk", "no such file"]),
        (["bench", "chunks", "--chunks", "a"], ["--chunks"]),
        (["bench", "capture", "--probe", "entrpy"], ["--probe", "did you mean entropy?"]),
        (["bench", "spede"], ["did you mean speed?"]),
        (["info", "softmx"], ["did you mean softmax?"]),
        (["list", "--family", "exct"], ["did you mean exact?"]),
        (["list", "--update-readme", "nowhere.md"], ["nowhere.md"]),
        (["bench", "speed", "--bogus"], ["--bogus"]),
    ],
)
def test_bad_arguments_get_one_line(args, needles):
    one_line_error(runner.invoke(app, args), *needles)


def test_version_and_python_dash_m():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"attnlab {attnlab.__version__}"
    src = Path(attnlab.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, "-m", "attnlab", "--version"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stdout.strip() == f"attnlab {attnlab.__version__}"


def test_bench_json_envelope_and_csv(tmp_path):
    out, csv_path = tmp_path / "speed.json", tmp_path / "speed.csv"
    args = ["bench", "speed", "--mechanisms", "online", "--n", "16", "--causal", "true"]
    args += ["--repeats", "1", "--heads", "1", "--head-dim", "4"]
    result = runner.invoke(app, [*args, "--out", str(out), "--csv", str(csv_path)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    head = ["schema", "attnlab", "torch", "transformers", "native", "threads", "date", "command"]
    assert list(record)[: len(head)] == head and list(record)[-1] == "rows"
    assert record["attnlab"] == attnlab.__version__ and record["torch"] == torch.__version__
    assert record["command"].startswith("attnlab bench speed --mechanisms online --n 16")
    assert record["native"]["enabled"] in (True, False) and record["threads"] >= 1
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["mechanism"] for r in rows] == [r["mechanism"] for r in record["rows"]]
    assert float(rows[0]["ms"]) == pytest.approx(record["rows"][0]["ms"])


# --- the model commands check every argument before a model loads ---


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command gets as far as loading a model or running an analysis."""
    import attnlab.bench.capture
    import attnlab.models
    import attnlab.report.analyze

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(attnlab.models, "load", loaded)
    monkeypatch.setattr(attnlab.report.analyze, "analyze", loaded)
    monkeypatch.setattr(attnlab.bench.capture, "run", loaded)


def _files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "binary": b"\x7fELF\x02\x01\x01\x00\x00\x00",
        "latin1": "café au lait".encode("latin-1"),
        "latin1-end": "café".encode("latin-1"),  # the bad byte is the file's last
        "empty": b"",
        "blank": b"  \n\t \n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in [*files, "missing"]} | {"folder": tmp_path}


TEXT_CASES = [
    ("missing", ["no such file"]),
    ("folder", ["folder"]),
    ("binary", ["binary", "NUL byte at offset 7"]),
    ("latin1", ["UTF-8", "0xe9 at offset 3", "iconv"]),
    ("latin1-end", ["UTF-8", "0xe9 at offset 3"]),
    ("empty", ["is empty"]),
    ("blank", ["only whitespace"]),
]
MODEL_CASES = [
    (["analyze", "--tokens", "-5"], ["--tokens", "from 2", "'-5'"]),
    (["analyze", "--tokens", "0"], ["--tokens", "from 2"]),
    (["analyze", "--model", "minilm", "--tokens", "600"], ["512 positions", "--tokens 512"]),
    (["analyze", "--model", "MiniLM", "--tokens", "513"], ["512 positions"]),
    (["analyze", "--model", "minilmm"], ["--model", "did you mean minilm?"]),
    (["analyze", "--analyses", "sinks,sinkz"], ["--analyses", "did you mean sinks?"]),
    (["analyze", "--importance", "gradiant"], ["--importance", "did you mean gradient?"]),
    (["analyze", "--trials", "0"], ["--trials"]),
    (["analyze", "--needle", "--text", "x.txt"], ["--needle", "one input"]),
    (["eval", "ppl", "--model", "minilm", "--mechanism", "window"], ["causal LM", "encoder"]),
    (["eval", "ppl", "--mechanism", "window", "--tokens", "1"], ["--tokens", "from 2"]),
    (["eval", "ppl", "--mechanism", "windw"], ["did you mean window?"]),
    (["eval", "ppl", "--mechanism", "window", "--config", "window=4"], ["NAME:KEY=VALUE"]),
    (["capture-qk", "--model", "minilm", "--tokens", "64"], ["minilm has 6 layers", "got 15"]),
    (["capture-qk", "--model", "minilm", "--tokens", "600"], ["512 positions"]),
    (
        ["capture-qk", "--model", "minilm", "--tokens", "64", "--layers", "0", "--heads", "12"],
        ["12 query heads"],
    ),
    (["capture-qk", "--layers", "a"], ["--layers", "indices"]),
    (["bench", "capture", "--model", "minilm", "--tokens", "1k"], ["512 positions"]),
]


@pytest.mark.parametrize(("args", "needles"), MODEL_CASES)
def test_model_commands_check_arguments_before_loading(no_model_loads, args, needles):
    one_line_error(runner.invoke(app, args), *needles)


@pytest.mark.parametrize(("which", "needles"), TEXT_CASES)
@pytest.mark.parametrize(
    "command",
    [
        ["analyze", "--model", "minilm"],
        ["eval", "ppl", "--mechanism", "window"],
        ["capture-qk", "--model", "minilm", "--layers", "0"],
    ],
)
def test_text_files_are_checked_before_loading(no_model_loads, tmp_path, command, which, needles):
    text = _files(tmp_path)[which]
    one_line_error(runner.invoke(app, [*command, "--text", str(text)]), "text", *needles)


def test_tokens_beyond_the_model_context_are_refused_before_loading(no_model_loads):
    """`eval ppl --tokens 1000000000` ran for ever; smollm2 reads 8192 positions."""
    result = runner.invoke(app, ["eval", "ppl", "--mechanism", "window", "--tokens", "1000000000"])
    one_line_error(result, "--tokens", "smollm2 reads at most 8192 positions", "8192 or less")
    result = runner.invoke(app, ["analyze", "--needle", "--tokens", "8192"])
    one_line_error(result, "prompt around the text", "--tokens 8128")


def test_analyze_answers_an_error_found_while_it_runs_in_one_line(monkeypatch):
    """`analyze` never caught AttnInputError: a bad input found after loading (here: as
    the analysis runs) was a traceback."""
    import attnlab.report.analyze

    def refuse(*args, **kwargs):
        raise attnlab.AttnInputError("text: tokenises to nothing")

    monkeypatch.setattr(attnlab.report.analyze, "analyze", refuse)
    result = runner.invoke(app, ["analyze", "--model", "minilm", "--tokens", "32"])
    one_line_error(result, "attnlab analyze: error: text: tokenises to nothing")


def test_list_says_whether_the_kernels_run():
    from attnlab.report import records

    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and records.native_summary() in result.output


def test_train_command_writes_the_enveloped_record(tmp_path):
    """`attnlab train` trains a TinyLM on a tiny task and writes its result in the envelope;
    a misspelt task gets a suggestion and exit 2."""
    out = tmp_path / "train.json"
    args = ["train", "--task", "associative-recall", "--dim", "16", "--layers", "1"]
    result = runner.invoke(app, [*args, "--heads", "1", "--steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["schema"] and record["rows"][0]["steps"] == 3
    bad = runner.invoke(app, ["train", "--task", "mqr"])
    assert bad.exit_code == 2 and "did you mean mqar" in bad.output
