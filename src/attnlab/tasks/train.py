"""`run_training`: build a TinyLM for a task, train it, report. The function behind
``attnlab train``."""

from __future__ import annotations

from typing import Any

import torch

from attnlab.core.errors import AttnInputError
from attnlab.nn import TinyLM

from .base import Task, get_task
from .trainer import TrainConfig, train


def build_model(
    task: Task,
    *,
    mechanism: Any = "softmax",
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    conv: int = 0,
    mlp_ratio: float = 4,
    mechanism_config: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
) -> TinyLM:
    """A TinyLM whose inputs and outputs fit ``task``, its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return TinyLM(
        dim=dim,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        mechanism=mechanism,
        mlp_ratio=mlp_ratio,
        conv=conv,
        mechanism_config=mechanism_config,
        **task.model_kwargs(),
    )


def run_training(
    task: str | Task = "mqar",
    mechanism: Any = "softmax",
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    *,
    conv: int = 0,
    mlp_ratio: float = 4,
    task_config: dict[str, Any] | None = None,
    mechanism_config: dict[str, dict[str, Any]] | None = None,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup: int = 50,
    clip: float = 1.0,
    eval_every: int = 100,
    eval_examples: int = 256,
    train_examples: int | None = None,
    target: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    checkpoint: str | None = None,
    save: str | None = None,
) -> dict[str, Any]:
    """Train a TinyLM with ``mechanism`` (a name, a per-head mix, or one per layer) on
    ``task`` and return a JSON-ready record: the task and model settings, the model's
    parameter count and decode state (floats per sequence at the task's length), and the
    :class:`~attnlab.tasks.trainer.TrainResult`.

    ``task`` is a registered name (``"mqar"``, ``"mqar/zoology-64"``) or a Task;
    ``task_config`` its options. ``threads`` sets torch's intra-op threads for the run;
    ``save`` writes the final model as safetensors, ``checkpoint`` the best one so far.
    """
    if isinstance(task, str):
        task = get_task(task, **(task_config or {}))
    elif task_config:
        raise AttnInputError("task_config: pass options with a task name, not with a Task")
    if threads is not None:
        torch.set_num_threads(threads)
    model = build_model(
        task,
        mechanism=mechanism,
        dim=dim,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        conv=conv,
        mlp_ratio=mlp_ratio,
        mechanism_config=mechanism_config,
        seed=seed,
    )
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        clip=clip,
        eval_every=eval_every,
        eval_examples=eval_examples,
        train_examples=train_examples,
        target=target,
        seed=seed,
        progress=progress,
        checkpoint=checkpoint,
    )
    label = f"{task.name} {describe_mechanism(mechanism)} d={dim}"
    result = train(model, task, config, label=label)
    if save is not None:
        model.save(save, extra={"task": task.name, result.metric_name: repr(result.metric)})
    return {
        "task": task.describe(),
        "model": {**model.config, "parameters": sum(p.numel() for p in model.parameters())},
        "state_floats": model.state_size(task.seq_len),
        "train": {k: v for k, v in vars(config).items() if k not in ("progress",)},
        "result": result.to_dict(),
    }


def describe_mechanism(mechanism: Any) -> str:
    """A short label: ``softmax``, ``softmax2+linear6``, ``based/window``."""
    if isinstance(mechanism, str):
        return mechanism
    entries = list(mechanism)
    if entries and not isinstance(entries[0], str) and isinstance(entries[0][1], int):
        return "+".join(f"{e[0]}{e[1]}" for e in entries)
    return "/".join(describe_mechanism(m) for m in entries)
