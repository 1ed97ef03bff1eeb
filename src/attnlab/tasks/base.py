"""`Task`: a seeded generator of examples plus the metric that scores a model on them.

A task makes a :class:`Batch` of ``n`` examples from a seed: the same seed gives
the same tensors on every machine (a ``torch.Generator`` on the CPU). Token
tasks give integer ``inputs`` [B, N] and ``targets`` [B, N] holding the token
the model must predict at each position, :data:`IGNORE` (-100) where nothing
is scored, as in Zoology (arXiv:2312.04927). Vector tasks (in-context
regression) give float ``inputs`` [B, N, input_dim], float ``targets``
[B, N, output_dim] and a bool ``scored`` [B, N].

Tasks register by name like mechanisms: ``attnlab.tasks.get_task("mqar",
num_kv_pairs=8)``; named settings (``setting="zoology-256-16"``) fill in a
paper's configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from attnlab.core.errors import AttnInputError

IGNORE = -100

_TASKS: dict[str, type[Task]] = {}


@dataclass
class Batch:
    """Examples of a task: ``inputs``, ``targets`` and, for vector tasks, ``scored``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device), self.scored.to(device))

    def select(self, index: torch.Tensor) -> Batch:
        """The examples at ``index`` (a 1-d index tensor)."""
        return Batch(self.inputs[index], self.targets[index], self.scored[index])


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the one source of randomness of a task."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise AttnInputError(f"seed: expected an integer >= 0, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttnInputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def distinct(n: int, count: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """[n, count] integers from [low, high), distinct within each row, uniformly."""
    return torch.rand(n, high - low, generator=gen).argsort(dim=1)[:, :count] + low


class Task:
    """A synthetic task: ``generate(n, seed)`` and ``metric(outputs, batch)``.

    Subclasses set ``name``, ``title``, ``paper``, a ``Config`` dataclass and
    ``settings`` (named Configs), and implement :meth:`generate`. Token tasks
    define ``vocab``; vector tasks set ``kind = "vectors"`` and define
    ``input_dim`` and ``output_dim``.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]
    kind: ClassVar[str] = "tokens"
    metric_name: ClassVar[str] = "accuracy"
    settings: ClassVar[dict[str, dict[str, Any]]] = {}

    @dataclass
    class Config:
        pass

    def __init__(self, setting: str | None = None, **config: Any) -> None:
        base: dict[str, Any] = {}
        if setting is not None:
            if setting not in self.settings:
                raise AttnInputError(
                    f"setting: task {self.name!r} has settings "
                    f"{', '.join(self.settings) or 'none'}, got {setting!r}"
                )
            base = dict(self.settings[setting])
        fields = [f.name for f in dataclasses.fields(self.Config)]
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise AttnInputError(
                f"config: task {self.name!r} has no option {', '.join(unknown)}; "
                f"its options are: {', '.join(fields)}"
            )
        self.setting = setting
        self.config = self.Config(**{**base, **config})

    # --- what subclasses give --------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        """Positions per example (the model's input length)."""
        raise NotImplementedError

    def generate(self, n: int, seed: int) -> Batch:
        """``n`` examples drawn from ``seed`` alone."""
        raise NotImplementedError

    # --- scoring ---------------------------------------------------------------------------

    def model_kwargs(self) -> dict[str, Any]:
        """The arguments of :class:`attnlab.nn.TinyLM` that fit this task's inputs."""
        if self.kind == "vectors":
            return {"vocab": None, "input_dim": self.input_dim, "output_dim": self.output_dim}
        return {"vocab": self.vocab, "max_len": self.seq_len}

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Cross-entropy over the scored positions (token tasks)."""
        return F.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]).float(),
            batch.targets.reshape(-1),
            ignore_index=IGNORE,
        )

    def metric(self, outputs: torch.Tensor, batch: Batch) -> float:
        """Accuracy at the scored positions: the share of targets that the model's most
        likely token (``outputs`` logits [B, N, V]) or prediction (ids [B, N]) matches."""
        predictions = outputs.argmax(-1) if outputs.is_floating_point() else outputs
        if predictions.shape != batch.targets.shape:
            raise AttnInputError(
                f"outputs: expected logits [B, N, V] or ids {tuple(batch.targets.shape)}, "
                f"got {tuple(outputs.shape)}"
            )
        scored = batch.targets != IGNORE
        return (predictions[scored] == batch.targets[scored]).float().mean().item()

    def chance(self) -> float:
        """The metric of predictions drawn uniformly from the vocabulary."""
        return 1.0 / self.vocab

    def describe(self) -> dict[str, Any]:
        """Name, setting and Config as JSON-ready values."""
        return {
            "task": self.name,
            "setting": self.setting,
            "seq_len": self.seq_len,
            **dataclasses.asdict(self.config),
        }


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task to the registry under ``cls.name``."""
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is registered twice")
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """The registered task names."""
    return sorted(_TASKS)


def get_task(name: str, **config: Any) -> Task:
    """The task ``name`` with its options; ``"mqar/zoology-64"`` is ``name/setting``."""
    if not isinstance(name, str):
        raise AttnInputError(f"task: expected a name, got {name!r}")
    if "/" in name:
        name, setting = name.split("/", 1)
        config = {"setting": setting, **config}
    if name not in _TASKS:
        raise AttnInputError(f"task: unknown name {name!r}; known: {', '.join(task_names())}")
    return _TASKS[name](**config)
