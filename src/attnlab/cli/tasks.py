"""``attnlab train`` and ``attnlab bench tasks``: a TinyLM trained on a synthetic task
(:mod:`attnlab.tasks`), and the comparison of mechanisms by what they learn
(:mod:`attnlab.bench.tasks`: accuracy against decode state and throughput, after
Zoology's figure 2 and BASED's figure 1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from attnlab.core.errors import AttnInputError
from attnlab.report import records

from . import options
from .common import OUT_HELP, command, say

MECHANISM_HELP = "A mechanism, a per-head mix (softmax:1+linear:3) or one per layer (based/window)."


def _task_options(items: list[str]) -> dict[str, Any]:
    """``--task-config KEY=VALUE`` items as a dict; each value read as a Python literal
    where it is one (numbers, booleans), else kept as text."""
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise AttnInputError(f"--task-config: expected KEY=VALUE such as pairs=8, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


def _task(name: str) -> str:
    """The task name (``NAME`` or ``NAME/SETTING``), its NAME checked against the registry."""
    from attnlab.tasks import task_names

    base, sep, setting = name.partition("/")
    return options.choice("--task", base, task_names()) + sep + setting


@command
def train(
    task: str = typer.Option("mqar", help="A task of attnlab.tasks, NAME or NAME/SETTING."),
    task_config: list[str] = typer.Option([], help="Task options, KEY=VALUE (repeatable)."),
    mechanism: str = typer.Option("softmax", help=MECHANISM_HELP),
    config: list[str] = typer.Option([], help="Mechanism options, NAME:KEY=VALUE (repeatable)."),
    dim: int = typer.Option(64, min=1, help="Model width."),
    layers: int = typer.Option(2, min=1, help="Blocks of attention + MLP."),
    heads: int = typer.Option(4, min=1, help="Query heads per layer."),
    conv: int = typer.Option(0, min=0, help="Short causal convolution before attention."),
    steps: int = typer.Option(1000, min=1, help="Optimiser steps at most."),
    batch_size: int = typer.Option(64, min=1, help="Examples per step."),
    lr: float = typer.Option(3e-3, min=0.0, help="Peak learning rate (AdamW)."),
    target: float | None = typer.Option(None, help="Stop early at this held-out accuracy."),
    seed: int = typer.Option(0, help="Seed of the data and the model."),
    save: Path | None = typer.Option(None, help="Write the trained TinyLM (safetensors)."),
    out: Path | None = typer.Option(None, help=OUT_HELP),
):
    """Train a TinyLM with a mechanism on a synthetic task and report held-out accuracy."""
    from attnlab.bench.tasks import parse_mechanism
    from attnlab.tasks.train import run_training

    name = _task(task)
    model_mechanism = parse_mechanism(mechanism)
    record = run_training(
        name,
        model_mechanism,
        dim,
        layers,
        heads,
        conv=conv,
        task_config=_task_options(task_config),
        mechanism_config=options.configs(config, None),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        target=target,
        seed=seed,
        save=None if save is None else str(save),
    )
    result = record["result"]
    say(
        f"{name} with {mechanism}: {result['metric_name']} {result['metric']:.4f} "
        f"(best {result['best_metric']:.4f}) after {result['steps']} steps"
    )
    if out is not None:
        records.write_json(out, [result], **{k: v for k, v in record.items() if k != "result"})


@command
def bench_tasks(
    mechanisms: str = typer.Option(
        "", help="Comma-separated mechanisms or hybrids (default: the preset's)."
    ),
    widths: str = typer.Option("", help="Model widths, e.g. 32,64 (default: the preset's)."),
    task: str = typer.Option("", help="Task, NAME or NAME/SETTING (default: the preset's MQAR)."),
    quick: bool = typer.Option(
        True, "--quick/--full", help="The minutes-long preset or the sweep."
    ),
    steps: int | None = typer.Option(None, min=1, help="Override the preset's steps."),
    seed: int = typer.Option(0, help="Seed of the data and the models."),
    out: Path = typer.Option(
        Path("attnlab-out/bench-tasks.json"), help="JSON; the two plots go beside it."
    ),
):
    """Train each mechanism at several widths on a task: accuracy against decode state
    and training throughput, as JSON and two PNG plots."""
    from attnlab.bench.tasks import bench_tasks as run

    names = [m.strip() for m in mechanisms.split(",") if m.strip()] or None
    sizes = options.sizes("--widths", widths) if widths.strip() else None
    overrides = {} if steps is None else {"steps": steps}
    rows = run(names, sizes, _task(task) if task else None, quick, out, seed=seed, **overrides)
    # the bench writes its record; the command puts it in the common envelope
    record = json.loads(Path(out).read_text())
    records.write_json(out, record.pop("rows"), **record)
    for row in rows:
        if "error" in row:
            say(f"{row['mechanism']} at width {row['width']}: {row['error']}")
        else:
            say(
                f"{row['mechanism']:>24} width {row['width']:>4}: accuracy {row['accuracy']:.3f}"
                f", state {row['state_floats']:.0f} floats, {row['tokens_per_second']:.0f} tok/s"
            )
    say(f"wrote {out} and its plots")
