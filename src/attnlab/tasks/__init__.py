"""Synthetic tasks that tell attention mechanisms apart, and the trainer.

Each task is a seeded generator plus a metric (:class:`Task`), registered by
name: ``mqar`` (Zoology), ``associative-recall``, ``selective-copy``,
``induction``, ``in-context-regression`` and ``needle``.
"""

from . import copying, recall, regression
from .base import IGNORE, Batch, Task, get_task, register_task, task_names

__all__ = [
    "IGNORE",
    "Batch",
    "Task",
    "copying",
    "get_task",
    "recall",
    "register_task",
    "regression",
    "task_names",
]
