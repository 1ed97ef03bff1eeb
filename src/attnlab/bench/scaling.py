"""Scaling of linear-time mechanisms against SDPA: crossover length and exponent.

:func:`run_scaling` times mechanisms and raw ``scaled_dot_product_attention`` side by
side (interleaved repeat by repeat; median, and the best repeat, which on a shared
machine estimates the uncontended cost) over a range of N, and reports where each
mechanism overtakes SDPA (CAB's "efficiency length") and the exponent
of a least-squares fit of log time (median) against log N.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import attnlab

from .timing import Progress, repeats_ms


def fit_exponent(ns: list[int], ms: list[float]) -> float | None:
    """Slope of the least-squares line of log(ms) against log(N); None for < 2 points."""
    if len(ns) < 2:
        return None
    xs, ys = [math.log(n) for n in ns], [math.log(t) for t in ms]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


@dataclass
class ScalingResult:
    """One mechanism's times over N, next to SDPA's where SDPA was run."""

    mechanism: str
    config: dict
    ns: list[int]
    ms: list[float]
    sdpa_ms: list[float | None]
    speedup: list[float | None]
    crossover_n: int | None
    crossover_note: str
    exponent: float | None
    exponent_range: list[int] = field(default_factory=list)
    best_ms: list[float] = field(default_factory=list)
    sdpa_best_ms: list[float | None] = field(default_factory=list)
    best_speedup: list[float | None] = field(default_factory=list)
    best_crossover_n: int | None = None


def _crossover(ns, speedup) -> tuple[int | None, str]:
    """The smallest measured N from which the mechanism beats SDPA at every larger measured N."""
    measured = [(n, s) for n, s in zip(ns, speedup, strict=True) if s is not None]
    if not measured:
        return None, "SDPA not measured"
    cross = None
    for n, s in reversed(measured):
        if s <= 1.0:
            break
        cross = n
    if cross is None:
        return None, f"slower than SDPA up to N={measured[-1][0]}"
    if cross == measured[0][0]:
        return cross, f"faster than SDPA from the smallest N measured ({cross})"
    return cross, f"faster than SDPA from N={cross}"


def run_scaling(
    mechanisms: Iterable[str],
    ns: Iterable[int],
    *,
    sdpa_max: int = 16384,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    configs: dict[str, dict] | None = None,
    fit_range: tuple[int, int] = (1024, 65536),
    progress: Progress = None,
) -> list[ScalingResult]:
    """Causal forward time of each mechanism over ``ns``, SDPA side by side up to ``sdpa_max``."""
    configs = configs or {}
    names = list(mechanisms)
    mods = {m: attnlab.get(m, **configs.get(m, {})).eval() for m in names}
    ns = list(ns)
    ms: dict[str, list[float]] = {m: [] for m in names}
    best: dict[str, list[float]] = {m: [] for m in names}
    sdpa: list[float | None] = []
    sdpa_best: list[float | None] = []
    for n in ns:
        if progress:
            progress(f"scaling N={n}")
        q = torch.randn(batch, heads, n, head_dim, dtype=dtype)
        k = torch.randn(batch, heads, n, head_dim, dtype=dtype)
        v = torch.randn(batch, heads, n, head_dim, dtype=dtype)
        calls: dict[str, Callable[[], object]] = {
            m: (lambda mod=mod, q=q, k=k, v=v: mod(q, k, v, causal=True)) for m, mod in mods.items()
        }
        if n <= sdpa_max:
            calls["sdpa"] = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True
            )
        got = repeats_ms(calls, repeats)
        sdpa.append(statistics.median(got["sdpa"]) if "sdpa" in got else None)
        sdpa_best.append(min(got["sdpa"]) if "sdpa" in got else None)
        for m in names:
            ms[m].append(statistics.median(got[m]))
            best[m].append(min(got[m]))
    results = []
    lo, hi = fit_range
    for m in names:
        speedup = [None if s is None else s / t for s, t in zip(sdpa, ms[m], strict=True)]
        cross, note = _crossover(ns, speedup)
        best_speedup = [
            None if s is None else s / t for s, t in zip(sdpa_best, best[m], strict=True)
        ]
        fit = [(n, t) for n, t in zip(ns, ms[m], strict=True) if lo <= n <= hi]
        results.append(
            ScalingResult(
                mechanism=m,
                config=configs.get(m, {}),
                ns=ns,
                ms=ms[m],
                sdpa_ms=sdpa,
                speedup=speedup,
                crossover_n=cross,
                crossover_note=note,
                exponent=fit_exponent([n for n, _ in fit], [t for _, t in fit]),
                exponent_range=[n for n, _ in fit],
                best_ms=best[m],
                sdpa_best_ms=sdpa_best,
                best_speedup=best_speedup,
                best_crossover_n=_crossover(ns, best_speedup)[0],
            )
        )
    return results
