"""The shared trainer: AdamW, warm-up and cosine decay, clipping, evaluation, early stop.

Training is deterministic for a seed: the model's initial weights come from
``torch.manual_seed(seed)`` where the caller builds it (:func:`run_training`),
the training examples from the task's generator at seeds derived from
``seed`` and the step, and the held-out examples from a seed no training step
uses.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnlab.core.errors import AttnInputError

from .base import Batch, Task

# training batch s draws from seed · TRAIN_STRIDE + s; the held-out set from EVAL_SEED_OFFSET
TRAIN_STRIDE = 1_000_003
EVAL_SEED_OFFSET = 2**40


@dataclass
class TrainConfig:
    """Options of :func:`train`.

    ``warmup``: steps of linear warm-up from 0 to ``lr``, after which the rate
    follows a cosine from ``lr`` down to ``lr · min_lr_ratio`` at ``steps``
    (Loshchilov & Hutter, SGDR, arXiv:1608.03983; AdamW, arXiv:1711.05101).
    ``clip``: the largest gradient norm (0: no clipping). ``train_examples``:
    a fixed pool of that many examples visited in seeded epochs (Zoology
    trains on a fixed set), or None for fresh examples at every step.
    ``target``: stop once the held-out metric reaches it. ``checkpoint``: a
    path where the model is saved (safetensors) after each evaluation that
    improves the metric.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 50
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    eval_every: int = 100
    eval_examples: int = 256
    train_examples: int | None = None
    target: float | None = None
    seed: int = 0
    progress: bool = True
    checkpoint: str | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttnInputError(f"{name}: expected an integer >= 1, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise AttnInputError(f"warmup: expected an integer >= 0 of steps, got {self.warmup!r}")
        if not self.lr > 0:
            raise AttnInputError(f"lr: expected a positive learning rate, got {self.lr}")
        if self.clip < 0:
            raise AttnInputError(f"clip: expected a norm >= 0 (0: off), got {self.clip}")
        if self.train_examples is not None and self.train_examples < self.batch_size:
            raise AttnInputError(
                f"train_examples: expected None or at least batch_size={self.batch_size}, "
                f"got {self.train_examples}"
            )


@dataclass
class TrainResult:
    """What a run did: the steps taken, the last training loss, the held-out metric (last
    and best), whether it stopped at the target, timings and the evaluation history."""

    steps: int
    loss: float
    metric: float
    best_metric: float
    metric_name: str
    stopped_early: bool
    train_seconds: float
    tokens_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch: Batch, batch_size: int = 256) -> tuple:
    """(loss, metric) of ``model`` on ``batch``, in eval mode, in pieces of ``batch_size``."""
    was_training = model.training
    model.eval()
    outputs = torch.cat(
        [model(batch.inputs[i : i + batch_size]) for i in range(0, len(batch), batch_size)]
    )
    loss = task.loss(outputs, batch).item()
    metric = task.metric(outputs, batch)
    model.train(was_training)
    return loss, metric


class _Bar:
    """A rich progress bar with loss and metric, or nothing when ``enabled`` is False."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.progress = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(label, total=total, status="")

    def update(self, step: int, status: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _batches(task: Task, config: TrainConfig):
    """Training batches: fresh examples per step, or epochs over a fixed pool."""
    if config.train_examples is None:
        for step in range(config.steps):
            yield task.generate(config.batch_size, config.seed * TRAIN_STRIDE + step)
        return
    pool = task.generate(config.train_examples, config.seed * TRAIN_STRIDE)
    order_gen = torch.Generator().manual_seed(config.seed)
    step = 0
    while True:
        order = torch.randperm(len(pool), generator=order_gen)
        for i in range(0, len(pool) - config.batch_size + 1, config.batch_size):
            if step == config.steps:
                return
            yield pool.select(order[i : i + config.batch_size])
            step += 1


def train(
    model: nn.Module, task: Task, config: TrainConfig | None = None, *, label: str = "train"
) -> TrainResult:
    """Train ``model`` on ``task`` with AdamW (arXiv:1711.05101), warm-up and cosine decay,
    gradient clipping, evaluation every ``eval_every`` steps on held-out examples, and an
    early stop once the metric reaches ``target``. Returns a :class:`TrainResult`."""
    config = config or TrainConfig()
    held_out = task.generate(config.eval_examples, EVAL_SEED_OFFSET + config.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": keep, "weight_decay": 0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, config.steps, config.warmup, config.min_lr_ratio),
    )
    bar = _Bar(config.progress, config.steps, label)
    history: list[dict[str, float]] = []
    loss_value, metric, best = float("nan"), float("-inf"), float("-inf")
    stopped, step, train_seconds, tokens = False, 0, 0.0, 0
    model.train()
    try:
        for step, batch in enumerate(_batches(task, config), start=1):
            start = time.perf_counter()
            outputs = model(batch.inputs)
            loss = task.loss(outputs, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            schedule.step()
            train_seconds += time.perf_counter() - start
            tokens += batch.inputs.shape[0] * batch.inputs.shape[1]
            loss_value = loss.item()
            if step % config.eval_every == 0 or step == config.steps:
                eval_loss, metric = evaluate(model, task, held_out)
                history.append(
                    {"step": step, "loss": loss_value, "eval_loss": eval_loss, "metric": metric}
                )
                if metric > best:
                    best = metric
                    if config.checkpoint is not None:
                        _save(model, config.checkpoint, step, metric, task)
                if config.target is not None and metric >= config.target:
                    stopped = True
            train_metric = task.metric(outputs.detach(), batch)
            status = f"loss {loss_value:.3f}  {task.metric_name} {train_metric:.3f}"
            if history:
                status += f"  held-out {metric:.3f}"
            bar.update(step, status)
            if stopped:
                break
    finally:
        bar.close()
    return TrainResult(
        steps=step,
        loss=loss_value,
        metric=metric,
        best_metric=best,
        metric_name=task.metric_name,
        stopped_early=stopped,
        train_seconds=train_seconds,
        tokens_per_second=tokens / train_seconds if train_seconds > 0 else 0.0,
        history=history,
    )


def _save(model: nn.Module, path: str, step: int, metric: float, task: Task) -> None:
    save = getattr(model, "save", None)
    if save is None:
        raise AttnInputError(
            f"checkpoint: the model ({type(model).__name__}) has no save(path); "
            f"use attnlab.nn.TinyLM or pass checkpoint=None"
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save(path, extra={"step": str(step), task.metric_name: repr(metric), "task": task.name})
