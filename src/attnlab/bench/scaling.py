"""Scaling of linear-time mechanisms against SDPA: crossover length, exponent, decode cost.

- :func:`run_scaling` times mechanisms and raw ``scaled_dot_product_attention``
  side by side (interleaved repeat by repeat; median, and the best repeat, which
  on a shared machine estimates the uncontended cost) over a range of N, and
  reports where each mechanism overtakes SDPA (CAB's "efficiency length") and
  the exponent of a least-squares fit of log time (median) against log N.
- :func:`run_decode` times one decoding ``step`` at given positions (the
  positions interleaved call by call), from a state built by decoding that many
  tokens, to show that a recurrent state costs the same per token at any
  position (a KV cache does not).
- :func:`run_chunks` measures the chunked kernel of :mod:`attnlab.core.scan` for
  several chunk sizes and feature dims: the table behind ``choose_chunk``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import attnlab
from attnlab.core import native
from attnlab.core.scan import causal_scan

from . import memory

Progress = Callable[[str], None] | None


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _repeats(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """ms of each call over ``repeats``, after one warm-up, interleaved repeat by repeat,
    with the allocator in its steady state (:func:`memory.reuse_freed_blocks`, as in
    ``bench speed``)."""
    memory.reuse_freed_blocks()
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                times[name].append(_timed(fn))
    return times


def _interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each call (see :func:`_repeats`)."""
    return {name: statistics.median(ts) for name, ts in _repeats(calls, repeats).items()}


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
        got = _repeats(calls, repeats)
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


@dataclass
class DecodeResult:
    """Cost of one decoding step at each position, and the state it carries there."""

    mechanism: str
    positions: list[int]
    step_ms: list[float]
    state_floats: list[int]
    ratio_last_first: float


def _prefill(mech, position, batch, heads, head_dim, dtype):
    """The decoding state after ``position`` tokens, built by ``step`` over those tokens."""
    state = mech.init_state(batch, heads, heads, head_dim, head_dim, dtype=dtype)
    block = 4096
    with torch.inference_mode():
        for start in range(0, position, block):
            t = min(block, position - start)
            x = torch.randn(batch, heads, t, head_dim, dtype=dtype)
            _, state = mech.step(x, x, x, state)
    return state


def run_decode(
    mechanisms: Iterable[str],
    positions: Iterable[int] = (1024, 16384),
    *,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    repeats: int = 30,
    threads: int = 1,
    progress: Progress = None,
) -> list[DecodeResult]:
    """Median time of one ``step`` (one new token) at each position, per mechanism.

    Runs on ``threads`` intra-op threads (1 by default: a one-token step is too
    small to split, and on a shared machine a descheduled worker thread would
    stall every small op).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _decode(
            list(mechanisms), list(positions), batch, heads, head_dim, dtype, repeats, progress
        )
    finally:
        torch.set_num_threads(before)


def _decode(mechanisms, positions, batch, heads, head_dim, dtype, repeats, progress):
    results = []
    for name in mechanisms:
        mech = attnlab.get(name).eval()
        if not mech.spec.decode:
            raise attnlab.AttnInputError(f"mechanisms: {name!r} has no decoding step")
        calls, sizes = {}, []
        x = torch.randn(batch, heads, 1, head_dim, dtype=dtype)
        for pos in positions:
            if progress:
                progress(f"decode {name}: state at {pos}")
            state = _prefill(mech, pos, batch, heads, head_dim, dtype)
            calls[pos] = lambda m=mech, s=state, x=x: m.step(x, x, x, s)
            sizes.append(
                mech.state_size(
                    pos, q_heads=heads, kv_heads=heads, head_dim=head_dim, value_dim=head_dim
                )
            )
        if progress:
            progress(f"decode {name}: timing")
        got = _interleaved(calls, repeats)  # positions alternate, so noise hits all alike
        step_ms = [got[pos] for pos in positions]
        results.append(
            DecodeResult(
                mechanism=name,
                positions=positions,
                step_ms=step_ms,
                state_floats=sizes,
                ratio_last_first=step_ms[-1] / step_ms[0],
            )
        )
    return results


def run_chunks(
    feature_dims: Iterable[int] = (16, 64, 153),
    chunks: Iterable[int] = (32, 64, 128, 256),
    *,
    n: int = 8192,
    heads: int = 8,
    value_dim: int = 64,
    repeats: int = 3,
    progress: Progress = None,
) -> list[dict]:
    """ms of the causal chunked scan for each (feature dim F, chunk C); the best C per F
    flagged, and which kernel ran ("compiled": csrc/scan.c, which takes F a multiple of 16,
    else "torch")."""
    rows = []
    for f in feature_dims:
        fq = torch.rand(1, heads, n, f)
        fk = torch.rand(1, heads, n, f)
        v = torch.randn(1, heads, n, value_dim)
        if progress:
            progress(f"chunks F={f}")
        calls = {
            c: (lambda c=c, fq=fq, fk=fk, v=v: causal_scan(fq, fk, v, chunk=c)) for c in chunks
        }
        got = _interleaved(calls, repeats)
        best = min(got, key=got.get)
        rows.extend(
            {
                "feature_dim": f,
                "chunk": c,
                "ms": t,
                "best": c == best,
                "kernel": "compiled"
                if native.scan_applies((fq, fk, v), feature="identity", chunk=c)
                else "torch",
            }
            for c, t in got.items()
        )
    return rows


def as_json(results: list) -> list[dict]:
    """Results as JSON-ready dicts."""
    return [r if isinstance(r, dict) else asdict(r) for r in results]
