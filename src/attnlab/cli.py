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
    family: str | None = typer.Option(None, help="Only this family (exact, linear, sparse, heads)."),
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
        t.add_row(r["name"], r["family"], yes[r["exact"]], r["modes"], yes[r["decode"]],
                  yes[r["backward"]], r["complexity"], r["paper"])
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


def main() -> None:  # pragma: no cover - console entry point
    app()
