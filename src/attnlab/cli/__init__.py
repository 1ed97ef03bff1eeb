"""The ``attnlab`` command line (entry point ``attnlab = "attnlab.cli:app"``).

One module per command group: :mod:`.mechanisms` (list, info), :mod:`.bench` (the
benches), :mod:`.tasks` (train, bench tasks), :mod:`.models` (eval ppl, capture-qk),
:mod:`.analyze`. :mod:`.common` holds what all share (one-line errors, exit code 2);
:mod:`.options` parses what several take.
"""

from __future__ import annotations

import typer

import attnlab

from . import analyze, bench, mechanisms, models, tasks
from .common import new_app

app = new_app("attnlab: the laboratory of the attention literature.", name="attnlab")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attnlab {attnlab.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """attnlab: the laboratory of the attention literature."""


app.command("list")(mechanisms.list_mechanisms)
app.command("info")(mechanisms.info)
app.command("analyze")(analyze.analyze)
app.command("capture-qk")(models.capture_qk)
app.command("train")(tasks.train)
bench.app.command("tasks")(tasks.bench_tasks)
app.add_typer(bench.app, name="bench")
app.add_typer(models.eval_app, name="eval")

__all__ = ["app"]
