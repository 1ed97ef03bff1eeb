"""The ``attnlab`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import attnlab
from attnlab.report import table as mechanism_table

app = typer.Typer(help="attnlab: the laboratory of the attention literature.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: speed, memory, quality.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
# piped output (CI logs, files) gets a wide table instead of rich's 80 columns
console = Console(width=None if sys.stdout.isatty() else 160)


@app.command("list")
def list_mechanisms(
    family: str | None = typer.Option(
        None, help="Only this family (exact, linear, sparse, heads)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the Specs as JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the README table."),
    update_readme: Path | None = typer.Option(
        None, help="Rewrite the generated mechanism table inside this README file."
    ),
):
    """List the registered mechanisms with what each supports and costs."""
    rows = [r for r in mechanism_table.rows() if family is None or r["family"] == family]
    if update_readme is not None:
        changed = mechanism_table.update_readme(update_readme)
        console.print(f"{update_readme}: {'updated' if changed else 'already up to date'}")
        return
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if markdown:
        typer.echo(mechanism_table.markdown())
        return
    yes = {True: "✓", False: "·"}
    t = Table(title=f"attnlab mechanisms ({len(rows)})")
    for col in ("name", "family", "exact", "modes", "decode", "backward", "complexity", "paper"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["name"],
            r["family"],
            yes[r["exact"]],
            r["modes"],
            yes[r["decode"]],
            yes[r["backward"]],
            r["complexity"],
            r["paper"],
        )
    console.print(t)


@app.command()
def info(name: str = typer.Argument(..., help="A mechanism name from `attnlab list`.")):
    """Show one mechanism: its Spec, its Config options and its docstring."""
    import dataclasses

    try:
        cls = attnlab.core.mechanism_class(name)
    except attnlab.AttnInputError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    console.print(f"[bold]{cls.spec.name}[/bold]: {cls.spec.title}")
    for key, value in cls.spec.to_dict().items():
        console.print(f"  {key}: {value}")
    options = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    console.print(f"  options: {options or 'none'}")
    console.print(cls.__doc__ or "")


@app.command()
def analyze(
    model: str = typer.Option("smollm2", help="smollm2, minilm, a local folder or a hub id."),
    text: Path | None = typer.Option(None, help="Analyse this text file (default: shipped text)."),
    needle: bool = typer.Option(False, "--needle", help="Analyse a needle-in-a-haystack prompt."),
    tokens: int = typer.Option(512, help="Tokens of input (of context with --needle)."),
    analyses: list[str] = typer.Option(
        ["sinks,entropy,distance,fai,patterns"],
        help="Comma-separated: sinks, entropy, distance, fai, patterns, retrieval, importance, "
        "rollout, flow, or all.",
    ),
    out: Path = typer.Option(Path("attnlab-out"), help="Folder for JSON, PNGs, report.html."),
    trials: int = typer.Option(3, help="Needles for the retrieval score."),
    importance: str = typer.Option(
        "gradient",
        help="Head importance (Michel et al.): gradient (first-order proxy, one backward "
        "pass) or mask (mask each head in turn and measure the change in loss).",
    ),
):
    """Measure a real model's attention head by head and write a self-contained report."""
    from attnlab.report import analyze as run

    if text is not None and needle:
        raise typer.BadParameter("--text and --needle: give one input, not both")
    if importance not in ("gradient", "mask"):
        raise typer.BadParameter(f"--importance: expected gradient or mask, got {importance!r}")
    try:
        names = run.check_analyses(analyses)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    run.analyze(
        model,
        text=text,
        needle=needle,
        tokens=tokens,
        analyses=names,
        out=out,
        trials=trials,
        importance=importance,
        log=console.print,
    )


def main() -> None:  # pragma: no cover - console entry point
    app()


def _parse_configs(items: list[str]) -> dict[str, dict]:
    """``["chunked:query_chunk=512", "window:window=1024"]`` -> per-mechanism Config options."""
    import ast

    configs: dict[str, dict] = {}
    for item in items:
        name, sep, assignment = item.partition(":")
        key, eq, raw = assignment.partition("=")
        if not sep or not eq or not name or not key:
            raise typer.BadParameter(f"--config: expected NAME:KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        configs.setdefault(name, {})[key] = value
    return configs


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x.replace("k", "000").replace("K", "000")) for x in text.split(",") if x]
    except ValueError as exc:
        raise typer.BadParameter(f"{option}: expected integers like 1024,4k, got {text!r}") from exc


@bench_app.command("speed")
def bench_speed(
    mechanisms: str = typer.Option("softmax,chunked,online", help="Comma-separated names."),
    n: str = typer.Option("1024,4096,16384", help="Sequence lengths, e.g. 1k,4k,16k."),
    causal: str = typer.Option("both", help="both, true or false."),
    batch: int = typer.Option(1, help="B"),
    heads: int = typer.Option(8, help="Hq"),
    kv_heads: int = typer.Option(0, help="Hkv (0: same as heads)."),
    head_dim: int = typer.Option(64, help="D"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or float64."),
    repeats: int = typer.Option(5, help="Timed repeats after the warm-up call."),
    config: list[str] = typer.Option([], help="Mechanism options, NAME:KEY=VALUE (repeatable)."),
    max_call_s: float = typer.Option(60.0, help="Skip larger N after a call this slow."),
    device: str = typer.Option("cpu", help="Where to run: cpu, cuda, cuda:1, ..."),
    grad: bool = typer.Option(
        False, help="Inputs that require grad: the path a mechanism takes for training."
    ),
    backward: bool = typer.Option(False, help="Time forward + backward (implies --grad)."),
    out: Path | None = typer.Option(None, help="Write the records as JSON here."),
):
    """Time and peak memory of mechanisms against raw torch SDPA, side by side."""
    import torch
    from rich.progress import Progress

    from attnlab.bench import speed

    names = [m for m in mechanisms.split(",") if m]
    for name in names:
        attnlab.core.mechanism_class(name)
    modes = {"both": (False, True), "true": (True,), "false": (False,)}
    if causal not in modes:
        raise typer.BadParameter(f"--causal: expected both, true or false, got {causal!r}")
    if dtype not in speed.DTYPES:
        raise typer.BadParameter(
            f"--dtype: expected one of {', '.join(speed.DTYPES)}, got {dtype!r}"
        )
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise typer.BadParameter(f"--device: {err}") from err
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device: CUDA is not available on this machine; use cpu")
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("bench speed", total=None)
        records = speed.run_speed(
            names,
            _int_list(n, "--n"),
            causal_modes=modes[causal],
            batch=batch,
            heads=heads,
            kv_heads=kv_heads or None,
            head_dim=head_dim,
            dtype=dtype,
            repeats=repeats,
            configs=_parse_configs(config),
            max_call_s=max_call_s,
            device=device,
            grad=grad,
            backward=backward,
            progress=lambda what: bar.update(task, description=what),
        )
    where = "" if device == "cpu" else f", {device} ({torch.cuda.get_device_name(torch_device)})"
    where += ", forward + backward" if backward else (", inputs require grad" if grad else "")
    t = Table(
        title=f"bench speed: B{batch} H{heads} D{head_dim} {dtype}{where}, median of {repeats}"
    )
    for col in (
        "mechanism",
        "N",
        "mode",
        "ms",
        "× SDPA speed",
        "peak MiB",
        "peak / N×N",
        "density",
        "FLOP-bound",
        "achieved",
    ):
        t.add_column(col, justify="right" if col not in ("mechanism", "mode") else "left")

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for r in records:
        if r.skipped:
            t.add_row(
                r.mechanism,
                str(r.n),
                "causal" if r.causal else "full",
                "skipped",
                r.skipped,
                "",
                "",
                "",
                "",
                "",
            )
            continue
        t.add_row(
            r.mechanism,
            str(r.n),
            "causal" if r.causal else "full",
            fmt(r.ms, ".1f"),
            fmt(r.speedup, ".3f"),
            fmt(r.peak_mib, ".1f"),
            fmt(None if r.peak_mib is None else r.peak_mib / r.scores_mib, ".3f"),
            fmt(r.density, ".4f"),
            fmt(r.flop_bound_speedup, ".2f"),
            fmt(r.achieved, ".0%"),
        )
    console.print(t)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(speed.as_json(records), indent=2))
        console.print(f"wrote {out}")


# --- real models: eval ppl, capture-qk, bench capture (attnlab.models) ---
eval_app = typer.Typer(
    help="Evaluate a real model with mechanisms swapped in.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")


def _key_values(items: list[str]) -> dict:
    """``["window=128", "form=chunked"]`` -> ``{"window": 128, "form": "chunked"}``."""
    import ast

    options: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise typer.BadParameter(f"--config: expected KEY=VALUE, got {item!r}")
        try:
            options[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key] = raw
    return options


@eval_app.command("ppl")
def eval_ppl(
    model: str = typer.Option("smollm2", help="smollm2, a local folder or a hub id."),
    mechanism: str = typer.Option(..., help="Mechanism name(s), comma-separated."),
    config: list[str] = typer.Option([], help="Mechanism option KEY=VALUE (repeatable)."),
    text: Path | None = typer.Option(None, help="A UTF-8 text file (default: shipped text)."),
    tokens: int = typer.Option(1024, help="Tokens to score (the text repeats if shorter)."),
    out: Path | None = typer.Option(None, help="Write the rows as JSON here."),
):
    """Perplexity with a mechanism in place of the model's attention, next to the model's own."""
    from attnlab.models import load
    from attnlab.models.perplexity import compare
    from attnlab.models.text import read_text, text_ids

    try:
        names = [m for m in mechanism.split(",") if m]
        for name in names:
            attnlab.core.mechanism_class(name)
        lm, tok = load(model)
        ids, copies = text_ids(tok, tokens, read_text(text))
        with console.status(f"perplexity on {ids.shape[1]} tokens"):
            rows = compare(lm, ids, names, _key_values(config))
    except attnlab.AttnInputError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    source = text or "shipped text (Pride and Prejudice, ch. 1-3)"
    note = f", repeated {copies}x" if copies > 1 else ""
    t = Table(title=f"perplexity of {model} on {ids.shape[1]} tokens of {source}{note}")
    for col in ("mechanism", "ppl", "× own", "seconds", "note"):
        t.add_column(col, justify="left" if col in ("mechanism", "note") else "right")
    for r in rows:
        if r["error"]:
            t.add_row(r["mechanism"], "-", "-", "-", r["error"])
        else:
            t.add_row(
                r["mechanism"],
                f"{r['ppl']:.3f}",
                f"{r['ratio']:.4f}",
                f"{r['seconds']:.1f}",
                r["note"] or "",
            )
    console.print(t)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "model": model,
            "tokens": int(ids.shape[1]),
            "text": str(source),
            "copies": copies,
            "config": _key_values(config),
            "rows": rows,
        }
        out.write_text(json.dumps(record, indent=2))
        console.print(f"wrote {out}")


@app.command("capture-qk")
def capture_qk(
    model: str = typer.Option("smollm2", help="smollm2, minilm, a local folder or a hub id."),
    layers: str = typer.Option("0,15", help="Layers to keep, comma-separated."),
    heads: str = typer.Option("", help="Query heads to keep (default: all), comma-separated."),
    tokens: int = typer.Option(1024, help="Tokens of input (the text repeats if shorter)."),
    text: Path | None = typer.Option(None, help="A UTF-8 text file (default: shipped text)."),
    out: Path = typer.Option(Path("qk.safetensors"), help="The safetensors file to write."),
):
    """Keep a real model's post-rotary q, k, v (``layer{L}.q|k|v``, [B, H, N, D]) for benchmarks."""
    from attnlab.models import capture, load
    from attnlab.models.text import read_text, text_ids

    try:
        chosen = [int(h) for h in heads.split(",") if h] or None
        keep = {layer: chosen for layer in _int_list(layers, "--layers")}
        lm, tok = load(model)
        ids, copies = text_ids(tok, tokens, read_text(text))
        result = capture(lm, ids, [], keep_qk=keep)
        path = result.save_qk(
            out,
            model=model,
            tokens=ids.shape[1],
            text=text or "shipped",
            copies=copies,
            heads=heads or "all",
        )
    except attnlab.AttnInputError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    for name, tensor in result.qkv.items():
        console.print(f"  {name}: {tuple(tensor.shape)}")
    console.print(f"wrote {path}")


@bench_app.command("capture")
def bench_capture(
    model: str = typer.Option("smollm2", help="smollm2, minilm, a local folder or a hub id."),
    tokens: int = typer.Option(8192, help="Tokens (the shipped text repeats to reach them)."),
    block: int = typer.Option(0, help="Query rows per block (0: about 15M floats a block)."),
    probe: str = typer.Option(
        "entropy", help="Analysis during the capture: entropy, max, analyze (its defaults), none."
    ),
    threads: int = typer.Option(0, help="torch threads for both passes (0: torch's default)."),
    out: Path | None = typer.Option(None, help="Write the record as JSON here."),
):
    """Peak memory and time of a streaming capture next to the plain SDPA forward."""
    from attnlab.bench import capture as bench

    try:
        r = bench.run(model, tokens, block=block or None, probe=probe, threads=threads or None)
    except attnlab.AttnInputError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    note = f" (shipped text repeated {r['text_copies']}x)" if r["text_copies"] > 1 else ""
    t = Table(title=f"bench capture: {model}, {r['tokens']} tokens{note}, {r['threads']} threads")
    for col in ("pass", "seconds", "peak RSS MB"):
        t.add_column(col, justify="left" if col == "pass" else "right")
    t.add_row("plain SDPA forward", f"{r['sdpa_seconds']:.1f}", f"{r['sdpa_peak_mb']:.0f}")
    t.add_row(
        f"capture + probe {probe}", f"{r['capture_seconds']:.1f}", f"{r['capture_peak_mb']:.0f}"
    )
    console.print(t)
    console.print(
        f"time ratio capture / SDPA: {r['time_ratio']:.2f}; model loaded: "
        f"{r['rss_loaded_mb']:.0f} MB RSS"
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2))
        console.print(f"wrote {out}")


# --- linear family: scaling, decode, chunks, quality (bench/scaling.py, bench/quality.py) ---


def _write_json(out: Path | None, data) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2))
        console.print(f"wrote {out}")


@bench_app.command("scaling")
def bench_scaling(
    mechanisms: str = typer.Option("linear,lightning,based", help="Comma-separated names."),
    n: str = typer.Option("1024,2048,4096,8192,16384,32768,65536", help="Sequence lengths."),
    sdpa_max: int = typer.Option(16384, help="Run SDPA side by side up to this N."),
    heads: int = typer.Option(8, help="H"),
    head_dim: int = typer.Option(64, help="D"),
    repeats: int = typer.Option(3, help="Timed repeats (median) after a warm-up."),
    config: list[str] = typer.Option([], help="Mechanism options, NAME:KEY=VALUE (repeatable)."),
    out: Path | None = typer.Option(None, help="Write the results as JSON here."),
):
    """Causal time against N next to SDPA: crossover N and the fitted exponent of time vs N."""
    from rich.progress import Progress

    from attnlab.bench import scaling

    names = [m for m in mechanisms.split(",") if m]
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("bench scaling", total=None)
        results = scaling.run_scaling(
            names,
            _int_list(n, "--n"),
            sdpa_max=sdpa_max,
            heads=heads,
            head_dim=head_dim,
            repeats=repeats,
            configs=_parse_configs(config),
            progress=lambda what: bar.update(task, description=what),
        )
    t = Table(title=f"bench scaling: causal, B1 H{heads} D{head_dim} float32, median ms")
    t.add_column("N", justify="right")
    t.add_column("sdpa", justify="right")
    for r in results:
        t.add_column(r.mechanism, justify="right")
        t.add_column("× SDPA", justify="right")
    for i, size in enumerate(results[0].ns):
        sdpa_ms = results[0].sdpa_ms[i]
        row = [str(size), "-" if sdpa_ms is None else f"{sdpa_ms:.1f}"]
        for r in results:
            s = r.speedup[i]
            row += [f"{r.ms[i]:.1f}", "-" if s is None else f"{s:.1f}"]
        t.add_row(*row)
    console.print(t)
    for r in results:
        exp = "-" if r.exponent is None else f"{r.exponent:.2f}"
        best = ", ".join("-" if s is None else f"{s:.1f}" for s in r.best_speedup)
        console.print(
            f"{r.mechanism}: crossover N = {r.crossover_n} ({r.crossover_note}); "
            f"fitted exponent of time vs N over {r.exponent_range[:1]}..{r.exponent_range[-1:]}"
            f": {exp}; best-repeat × SDPA: {best} (crossover {r.best_crossover_n})"
        )
    _write_json(out, scaling.as_json(results))


@bench_app.command("decode")
def bench_decode(
    mechanisms: str = typer.Option("linear,lightning,based,softmax", help="Comma-separated."),
    positions: str = typer.Option("1024,16384", help="Positions to time one step at."),
    heads: int = typer.Option(8, help="H"),
    head_dim: int = typer.Option(64, help="D"),
    repeats: int = typer.Option(30, help="Timed steps (median) at each position."),
    threads: int = typer.Option(1, help="Intra-op threads while decoding."),
    out: Path | None = typer.Option(None, help="Write the results as JSON here."),
):
    """Cost of one decoding step at each position (state built by decoding up to it)."""
    from rich.progress import Progress

    from attnlab.bench import scaling

    pos = _int_list(positions, "--positions")
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("bench decode", total=None)
        try:
            results = scaling.run_decode(
                [m for m in mechanisms.split(",") if m],
                pos,
                heads=heads,
                head_dim=head_dim,
                repeats=repeats,
                threads=threads,
                progress=lambda what: bar.update(task, description=what),
            )
        except attnlab.AttnInputError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from exc
    t = Table(
        title=f"bench decode: one step, B1 H{heads} D{head_dim} float32, {threads} thread(s), "
        "median ms"
    )
    t.add_column("mechanism")
    for p in pos:
        t.add_column(f"ms @ {p}", justify="right")
        t.add_column(f"state @ {p}", justify="right")
    t.add_column(f"ms @ {pos[-1]} / ms @ {pos[0]}", justify="right")
    for r in results:
        row = [r.mechanism]
        for ms, size in zip(r.step_ms, r.state_floats, strict=True):
            row += [f"{ms:.3f}", f"{size:,}"]
        t.add_row(*row, f"{r.ratio_last_first:.2f}")
    console.print(t)
    _write_json(out, scaling.as_json(results))


@bench_app.command("chunks")
def bench_chunks(
    features: str = typer.Option("16,64,153", help="Feature dims F to measure."),
    chunks: str = typer.Option("32,64,128,256", help="Chunk sizes C to try."),
    n: int = typer.Option(8192, help="Sequence length."),
    repeats: int = typer.Option(3, help="Timed repeats (median)."),
    out: Path | None = typer.Option(None, help="Write the rows as JSON here."),
):
    """Time of the chunked linear-attention scan per (F, C) at one N: the tables behind
    choose_chunk (which picks C by N, for the compiled kernel or the PyTorch scan)."""
    from attnlab.bench import scaling
    from attnlab.core.scan import choose_chunk

    size = n
    rows = scaling.run_chunks(
        _int_list(features, "--features"),
        _int_list(chunks, "--chunks"),
        n=size,
        repeats=repeats,
        progress=console.print,
    )
    t = Table(title=f"bench chunks: causal scan, B1 H8 Dv64 N={size} float32, median ms")
    for col in ("F", "C", "ms", "fastest", "kernel", "choose_chunk"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["feature_dim"]),
            str(r["chunk"]),
            f"{r['ms']:.1f}",
            "✓" if r["best"] else "",
            r["kernel"],
            str(choose_chunk(size, compiled=r["kernel"] == "compiled")),
        )
    console.print(t)
    _write_json(out, rows)


@bench_app.command("quality")
def bench_quality(
    mechanisms: str = typer.Option("", help="Comma-separated (default: every approximate one)."),
    qk: Path | None = typer.Option(None, help="safetensors of <prefix>.q/.k/.v [B,H,N,D]."),
    n: int = typer.Option(1024, help="N of the random inputs (without --qk)."),
    heads: int = typer.Option(8, help="H of the random inputs."),
    head_dim: int = typer.Option(64, help="D of the random inputs."),
    causal: str = typer.Option("both", help="both, true or false."),
    config: list[str] = typer.Option([], help="Mechanism options, NAME:KEY=VALUE (repeatable)."),
    out: Path | None = typer.Option(None, help="Write the records as JSON here."),
):
    """Relative error of each approximate mechanism against exact softmax on the same q, k, v."""
    from rich.progress import Progress

    from attnlab.bench import quality

    modes = {"both": (True, False), "true": (True,), "false": (False,)}
    if causal not in modes:
        raise typer.BadParameter(f"--causal: expected both, true or false, got {causal!r}")
    try:
        inputs = (
            quality.load_qkv(qk)
            if qk is not None
            else quality.random_qkv(n, heads=heads, kv_heads=heads, head_dim=head_dim)
        )
        names = [m for m in mechanisms.split(",") if m] or None
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("bench quality", total=None)
            records = quality.run_quality(
                inputs,
                names,
                causal_modes=modes[causal],
                configs=_parse_configs(config),
                progress=lambda what: bar.update(task, description=what),
            )
    except attnlab.AttnInputError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    t = Table(title="bench quality: error against exact softmax (float64 reference)")
    columns = ("mechanism", "family", "input", "mode", "rel. error", "cosine", "state", "KV cache")
    for col in columns:
        t.add_column(col, justify="left" if col in ("mechanism", "family", "input") else "right")
    for r in records:
        mode = "causal" if r.causal else "full"
        if r.skipped:
            t.add_row(r.mechanism, r.family, r.source, mode, "skipped", r.skipped[:60], "", "")
            continue
        state = "-" if r.state_floats is None else f"{r.state_floats:,}"
        t.add_row(
            r.mechanism,
            r.family,
            r.source,
            mode,
            f"{r.rel_error:.4f}",
            f"{r.cosine:.4f}",
            state,
            f"{r.kv_cache_floats:,}",
        )
    console.print(t)
    _write_json(out, quality.as_json(records))
