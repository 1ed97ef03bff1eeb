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
):
    """Measure a real model's attention head by head and write a self-contained report."""
    from attnlab.report import analyze as run

    if text is not None and needle:
        raise typer.BadParameter("--text and --needle: give one input, not both")
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
    out: Path | None = typer.Option(None, help="Write the records as JSON here."),
):
    """Time and peak memory of mechanisms against raw torch SDPA, side by side."""
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
            progress=lambda what: bar.update(task, description=what),
        )
    t = Table(title=f"bench speed: B{batch} H{heads} D{head_dim} {dtype}, median of {repeats}")
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
