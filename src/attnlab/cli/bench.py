"""``attnlab bench``: speed, scaling, decode, chunks, quality and capture.

Every bench checks its arguments before it measures anything, prints whether the
compiled kernels run, draws its table (:mod:`attnlab.report.table`) and writes its
rows in the common envelope (:mod:`attnlab.report.records`) with ``--out`` (JSON)
and ``--csv``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

import attnlab
from attnlab.core.errors import AttnInputError
from attnlab.report import records
from attnlab.report import table as tables

from . import options
from .common import CSV_HELP, OUT_HELP, command, console, new_app, say, write

app = new_app("Benchmarks: speed, memory, scaling, decoding, quality, capture.")

CAUSAL_CHOICES = ("both", "true", "false")


def _progress(title: str, run: Callable[[Callable[[str], None]], Any]) -> Any:
    """``run(progress)`` under a transient progress line that ``progress`` updates."""
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(title, total=None)
        return run(lambda what: bar.update(task, description=what))


def _causal(causal: str, both: tuple[bool, bool]) -> tuple[bool, ...]:
    """The causal modes ``--causal`` asks for; ``both`` in the order given."""
    chosen = options.choice("--causal", causal, CAUSAL_CHOICES)
    return both if chosen == "both" else (chosen == "true",)


@app.command("speed")
@command
def speed(
    mechanisms: str = typer.Option("softmax,chunked,online", help="Comma-separated names."),
    n: str = typer.Option("1024,4096,16384", help="Sequence lengths, e.g. 1k,4k,16k (k = 1024)."),
    causal: str = typer.Option("both", help="both, true or false."),
    batch: int = typer.Option(1, min=1, help="B"),
    heads: int = typer.Option(8, min=1, help="Hq"),
    kv_heads: int = typer.Option(0, min=0, help="Hkv (0: same as heads)."),
    head_dim: int = typer.Option(64, min=1, help="D"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or float64."),
    repeats: int = typer.Option(5, min=1, help="Timed repeats after the warm-up call."),
    config: list[str] = typer.Option([], help="Mechanism options, NAME:KEY=VALUE (repeatable)."),
    max_call_s: float = typer.Option(60.0, min=0.0, help="Skip larger N after a call this slow."),
    device: str = typer.Option("cpu", help="Where to run: cpu, cuda, cuda:1, ..."),
    grad: bool = typer.Option(
        False, help="Inputs that require grad: the path a mechanism takes for training."
    ),
    backward: bool = typer.Option(False, help="Time forward + backward (implies --grad)."),
    out: Path | None = typer.Option(None, help=OUT_HELP),
    csv: Path | None = typer.Option(None, help=CSV_HELP),
):
    """Time and peak memory of mechanisms against raw torch SDPA, side by side."""
    import torch

    from attnlab.bench import speed as bench

    names = options.mechanisms("--mechanisms", mechanisms)
    lengths = options.sizes("--n", n)
    modes = _causal(causal, both=(False, True))
    dtype = options.choice("--dtype", dtype, list(bench.DTYPES))
    if kv_heads and heads % kv_heads:
        raise AttnInputError(f"--kv-heads: expected a divisor of --heads {heads}, got {kv_heads}")
    configs = options.configs(config, names)
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise AttnInputError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from err
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise AttnInputError("--device: CUDA is not available on this machine; use cpu")
    say(records.native_summary())
    found = _progress(
        "bench speed",
        lambda progress: bench.run_speed(
            names,
            lengths,
            causal_modes=modes,
            batch=batch,
            heads=heads,
            kv_heads=kv_heads or None,
            head_dim=head_dim,
            dtype=dtype,
            repeats=repeats,
            configs=configs,
            max_call_s=max_call_s,
            device=device,
            grad=grad,
            backward=backward,
            progress=progress,
        ),
    )
    where = "" if device == "cpu" else f", {device} ({torch.cuda.get_device_name(torch_device)})"
    where += ", forward + backward" if backward else (", inputs require grad" if grad else "")
    title = f"bench speed: B{batch} H{heads} D{head_dim} {dtype}{where}, median of {repeats}"
    console.print(tables.speed_table(found, title))
    write(out, csv, found, bench="speed")


@app.command("scaling")
@command
def scaling(
    mechanisms: str = typer.Option("linear,lightning,based", help="Comma-separated names."),
    n: str = typer.Option("1k,2k,4k,8k,16k,32k,64k", help="Sequence lengths (k = 1024)."),
    sdpa_max: str = typer.Option("16k", help="Run SDPA side by side up to this N."),
    heads: int = typer.Option(8, min=1, help="H"),
    head_dim: int = typer.Option(64, min=1, help="D"),
    repeats: int = typer.Option(3, min=1, help="Timed repeats (median) after a warm-up."),
    config: list[str] = typer.Option([], help="Mechanism options, NAME:KEY=VALUE (repeatable)."),
    out: Path | None = typer.Option(None, help=OUT_HELP),
    csv: Path | None = typer.Option(None, help=CSV_HELP),
):
    """Causal time against N next to SDPA: crossover N and the fitted exponent of time vs N."""
    from attnlab.bench import scaling as bench

    names = options.mechanisms("--mechanisms", mechanisms)
    lengths = options.sizes("--n", n)
    largest_sdpa = options.size("--sdpa-max", sdpa_max, minimum=0)
    configs = options.configs(config, names)
    say(records.native_summary())
    results = _progress(
        "bench scaling",
        lambda progress: bench.run_scaling(
            names,
            lengths,
            sdpa_max=largest_sdpa,
            heads=heads,
            head_dim=head_dim,
            repeats=repeats,
            configs=configs,
            progress=progress,
        ),
    )
    title = f"bench scaling: causal, B1 H{heads} D{head_dim} float32, median ms"
    console.print(tables.scaling_table(results, title))
    for line in tables.scaling_lines(results):
        say(line)
    write(out, csv, results, bench="scaling")


@app.command("decode")
@command
def decode(
    mechanisms: str = typer.Option("linear,lightning,based,softmax", help="Comma-separated."),
    positions: str = typer.Option("1k,16k", help="Positions to time one step at (k = 1024)."),
    heads: int = typer.Option(8, min=1, help="H"),
    head_dim: int = typer.Option(64, min=1, help="D"),
    repeats: int = typer.Option(30, min=1, help="Timed steps (median) at each position."),
    threads: int = typer.Option(1, min=1, help="Intra-op threads while decoding."),
    out: Path | None = typer.Option(None, help=OUT_HELP),
    csv: Path | None = typer.Option(None, help=CSV_HELP),
):
    """Cost of one decoding step at each position (state built by decoding up to it)."""
    from attnlab.bench import decode as bench

    names = options.mechanisms("--mechanisms", mechanisms)
    no_step = [m for m in names if not attnlab.spec(m).decode]
    if no_step:
        raise AttnInputError(
            f"--mechanisms: {', '.join(no_step)} has no decoding step; those that do: "
            f"{', '.join(attnlab.mechanisms(decode=True))}"
        )
    pos = options.sizes("--positions", positions)
    say(records.native_summary())
    results = _progress(
        "bench decode",
        lambda progress: bench.run_decode(
            names,
            pos,
            heads=heads,
            head_dim=head_dim,
            repeats=repeats,
            threads=threads,
            progress=progress,
        ),
    )
    title = (
        f"bench decode: one step, B1 H{heads} D{head_dim} float32, {threads} thread(s), median ms"
    )
    console.print(tables.decode_table(results, pos, title))
    write(out, csv, results, bench="decode")


@app.command("chunks")
@command
def chunks(
    features: str = typer.Option("16,64,153", help="Feature dims F to measure."),
    chunk_sizes: str = typer.Option("32,64,128,256", "--chunks", help="Chunk sizes C to try."),
    n: str = typer.Option("8k", help="Sequence length (k = 1024)."),
    repeats: int = typer.Option(3, min=1, help="Timed repeats (median)."),
    out: Path | None = typer.Option(None, help=OUT_HELP),
    csv: Path | None = typer.Option(None, help=CSV_HELP),
):
    """Time of the chunked linear-attention scan per (F, C) at one N: the tables behind
    choose_chunk (which picks C by N, for the compiled kernel or the PyTorch scan)."""
    from attnlab.bench import chunks as bench
    from attnlab.core.scan import choose_chunk

    dims = options.sizes("--features", features)
    tried = options.sizes("--chunks", chunk_sizes)
    length = options.size("--n", n)
    say(records.native_summary())
    rows = bench.run_chunks(dims, tried, n=length, repeats=repeats, progress=say)
    chosen = {
        kernel: choose_chunk(length, compiled=kernel == "compiled") for kernel in bench.KERNELS
    }
    title = f"bench chunks: causal scan, B1 H8 Dv64 N={length} float32, median ms"
    console.print(tables.chunks_table(rows, chosen, title))
    write(out, csv, rows, bench="chunks")


@app.command("quality")
@command
def quality(
    mechanisms: str = typer.Option("", help="Comma-separated (default: every approximate one)."),
    qk: Path | None = typer.Option(None, help="safetensors of <prefix>.q/.k/.v [B,H,N,D]."),
    n: str = typer.Option("1024", help="N of the random inputs (without --qk; k = 1024)."),
    heads: int = typer.Option(8, min=1, help="H of the random inputs."),
    head_dim: int = typer.Option(64, min=1, help="D of the random inputs."),
    causal: str = typer.Option("both", help="both, true or false."),
    config: list[str] = typer.Option([], help="Mechanism options, NAME:KEY=VALUE (repeatable)."),
    out: Path | None = typer.Option(None, help=OUT_HELP),
    csv: Path | None = typer.Option(None, help=CSV_HELP),
):
    """Relative error of each approximate mechanism against exact softmax on the same q, k, v."""
    from attnlab.bench import quality as bench

    names = options.mechanisms("--mechanisms", mechanisms, required=False) or None
    modes = _causal(causal, both=(True, False))
    length = options.size("--n", n)
    configs = options.configs(config, names or attnlab.mechanisms(exact=False))
    if qk is not None and not qk.is_file():
        raise AttnInputError(f"--qk: expected a safetensors file, got {qk} (no such file)")
    inputs = (
        bench.load_qkv(qk)
        if qk is not None
        else bench.random_qkv(length, heads=heads, kv_heads=heads, head_dim=head_dim)
    )
    say(records.native_summary())
    found = _progress(
        "bench quality",
        lambda progress: bench.run_quality(
            inputs, names, causal_modes=modes, configs=configs, progress=progress
        ),
    )
    title = "bench quality: error against exact softmax (float64 reference)"
    console.print(tables.quality_table(found, title))
    write(out, csv, found, bench="quality")


@app.command("capture")
@command
def capture(
    model: str = typer.Option("smollm2", help="smollm2, minilm, a local folder or a hub id."),
    tokens: str = typer.Option("8k", help="Tokens (the shipped text repeats to reach them)."),
    block: int = typer.Option(0, min=0, help="Query rows per block (0: about 15M floats)."),
    probe: str = typer.Option(
        "entropy", help="Analysis during the capture: entropy, max, analyze (its defaults), none."
    ),
    threads: int = typer.Option(0, min=0, help="torch threads for both passes (0: default)."),
    out: Path | None = typer.Option(None, help=OUT_HELP),
    csv: Path | None = typer.Option(None, help=CSV_HELP),
):
    """Peak memory and time of a streaming capture next to the plain SDPA forward."""
    from attnlab.bench import capture as bench

    count = options.size("--tokens", tokens, minimum=2)
    probe = options.choice("--probe", probe, list(bench.PROBES))
    facts = options.model_facts(model)
    options.check_tokens(count, facts)
    say(records.native_summary())
    r = bench.run(model, count, block=block or None, probe=probe, threads=threads or None)
    note = f" (shipped text repeated {r['text_copies']}x)" if r["text_copies"] > 1 else ""
    title = f"bench capture: {model}, {r['tokens']} tokens{note}, {r['threads']} threads"
    console.print(tables.capture_table(r, probe, title))
    say(
        f"time ratio capture / SDPA: {r['time_ratio']:.2f}; model loaded: "
        f"{r['rss_loaded_mb']:.0f} MB RSS"
    )
    write(out, csv, [r], bench="capture")
