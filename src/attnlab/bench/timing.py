"""Interleaved timing shared by the benches: every call once untimed, then the timed
repeats of all calls alternating, so that noise on a shared machine hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from . import memory

Progress = Callable[[str], None] | None


def timed_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``, in ms."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def repeats_ms(calls: dict, repeats: int) -> dict:
    """ms of each call over ``repeats``, after one warm-up, interleaved repeat by repeat,
    under inference mode, with the allocator in its steady state
    (:func:`memory.reuse_freed_blocks`, as in ``bench speed``)."""
    memory.reuse_freed_blocks()
    times: dict = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                times[name].append(timed_ms(fn))
    return times


def median_ms(calls: dict, repeats: int) -> dict:
    """Median ms of each call (see :func:`repeats_ms`)."""
    return {name: statistics.median(ts) for name, ts in repeats_ms(calls, repeats).items()}
