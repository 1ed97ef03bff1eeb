"""What every ``attnlab`` command shares: the console, the group that turns any usage
error into one line, and the :func:`command` decorator that does the same for bad
input found while a command runs (``AttnInputError``), with exit code 2."""

from __future__ import annotations

import difflib
import functools
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperGroup

from attnlab.core.errors import AttnInputError
from attnlab.report import records

# the click that typer runs on: its own copy (typer._click) in recent releases, click
# itself in older ones; found from the class TyperGroup extends, so both work
_click = importlib.import_module(TyperGroup.__mro__[1].__module__.rpartition(".")[0])
UsageError = _click.exceptions.UsageError
ClickException = _click.exceptions.ClickException
NoArgsIsHelpError = getattr(_click.exceptions, "NoArgsIsHelpError", ())
get_current_context = _click.globals.get_current_context

# piped output (CI logs, files) gets a wide table instead of rich's 80 columns
console = Console(width=None if sys.stdout.isatty() else 160)

USAGE_EXIT = 2
_ARGV = "attnlab.argv"
OUT_HELP = "Write the rows as JSON (with what produced them) here."
CSV_HELP = "Write the rows as CSV here."


def say(text: str) -> None:
    """Print ``text`` as it is (no rich markup: paths and shapes keep their brackets)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def write(out: Path | None, csv: Path | None, rows: Sequence[Any], **fields: Any) -> None:
    """``rows`` as an enveloped JSON at ``out`` and as CSV at ``csv``, where given."""
    if out is not None:
        say(f"wrote {records.write_json(out, rows, **fields)}")
    if csv is not None:
        say(f"wrote {records.write_csv(csv, rows)}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str, ctx: typer.Context | None = None) -> NoReturn:
    """Print ``command: error: message`` as one line on stderr and exit with code 2."""
    ctx = ctx or get_current_context(silent=True)
    where = ctx.command_path if ctx is not None else "attnlab"
    typer.echo(f"{where}: error: {_one_line(message)}", err=True)
    raise typer.Exit(USAGE_EXIT)


class Group(TyperGroup):
    """A command group that remembers its command line (for the records it writes) and
    prints usage errors (a bad option value, an unknown command) as one line, exit 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv = ["attnlab", *args]  # copied first: parsing consumes ``args``
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        if parent is None:  # the root sees the whole command line
            ctx.meta[_ARGV] = argv
        return ctx

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name is not None and name not in self.list_commands(ctx) and not name.startswith("-"):
            hint = suggest(name, self.list_commands(ctx))
            raise UsageError(
                f"no such command {name!r}{hint}; commands: {', '.join(self.list_commands(ctx))}",
                ctx,
            )
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name or "attnlab", complete_var, False, **extra)
        except NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help())
            sys.exit(exc.exit_code)
        except UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "attnlab"
            message = _one_line(exc.format_message()).rstrip(".")
            typer.echo(f"{where}: error: {message}. See `{where} --help`.", err=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:
            typer.echo(f"attnlab: error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def suggest(name: str, choices) -> str:
    """``"; did you mean X?"`` for the choice closest to ``name`` (difflib, any case), or
    ``""`` when none is close."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=1)
    if not close:
        return ""
    match = next(c for c in choices if c.lower() == close[0])
    return f"; did you mean {match}?"


def new_app(help: str, name: str | None = None) -> typer.Typer:
    """A command group of ``attnlab`` (``name``: for the root, its program name)."""
    return typer.Typer(
        cls=Group, name=name, help=help, no_args_is_help=True, pretty_exceptions_enable=False
    )


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command with its command line recorded (:func:`records.command_line`) and
    bad input (``AttnInputError``, an unreadable or unwritable file) answered by one line
    on stderr with exit code 2, never a traceback."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = get_current_context()
        argv = ctx.find_root().meta.get(_ARGV) or ["attnlab", *sys.argv[1:]]
        try:
            with records.command_line(argv):
                return fn(*args, **kwargs)
        except AttnInputError as exc:
            fail(str(exc), ctx)
        except OSError as exc:
            what = f"{exc.filename}: " if exc.filename else ""
            fail(f"{what}{exc.strerror or exc}", ctx)

    return run
