"""``attnlab list`` and ``attnlab info``: the registry as a table, one mechanism in full."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

import attnlab
from attnlab.core.errors import AttnInputError
from attnlab.report import records
from attnlab.report import table as tables

from . import options
from .common import command, console, say


@command
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
    rows = tables.rows()
    if family is not None:
        family = options.choice("--family", family, sorted({r["family"] for r in rows}))
        rows = [r for r in rows if r["family"] == family]
    if update_readme is not None:
        try:
            changed = tables.update_readme(update_readme)
        except ValueError as exc:  # the file has no table markers
            raise AttnInputError(f"--update-readme: {exc}") from exc
        say(f"{update_readme}: {'updated' if changed else 'already up to date'}")
        return
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if markdown:
        typer.echo(tables.markdown())
        return
    say(records.native_summary())
    console.print(tables.mechanisms_table(rows))


@command
def info(name: str = typer.Argument(..., help="A mechanism name from `attnlab list`.")):
    """Show one mechanism: its Spec, its Config options and its docstring."""
    cls = attnlab.core.mechanism_class(options.mechanism("NAME", name))
    say(f"{cls.spec.name}: {cls.spec.title}")
    for key, value in cls.spec.to_dict().items():
        say(f"  {key}: {value}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    say(f"  options: {defaults or 'none'}")
    say(cls.__doc__ or "")
