"""``attnlab bench speed``: time and peak memory of mechanisms against torch SDPA.

Every candidate runs in the same process on the same inputs, interleaved
repeat by repeat with raw ``scaled_dot_product_attention``, so that ratios
hold on a noisy machine. Time is the median of the repeats after a warm-up
call; memory is the peak resident memory a call adds (see ``bench.memory``),
or on a CUDA device the peak of the caching allocator above what was allocated
before the call (each timed call is synchronised).
For sparse mechanisms that report their ``density``, the bench also prints the
FLOP-bound speedup (the density of full attention in the same mode over the
mechanism's density) and the fraction of it achieved. With ``grad=True`` the
inputs require gradients, so each mechanism takes the path it takes for training
(autograd recording), for SDPA and the mechanisms alike; ``backward=True`` adds the
backward pass of the output's sum to every timed call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attnlab

from . import memory

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
BASELINE = "sdpa"


@dataclass
class SpeedRecord:
    """One (mechanism, N, mode) measurement."""

    mechanism: str
    config: dict
    n: int
    causal: bool
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    device: str
    grad: bool
    backward: bool
    ms: float | None
    ms_repeats: list[float]
    peak_mib: float | None
    scores_mib: float
    speedup: float | None = None
    density: float | None = None
    flop_bound_speedup: float | None = None
    achieved: float | None = None
    skipped: str | None = None


def full_density(n: int, causal: bool) -> float:
    """Fraction of (query, key) pairs that full attention computes: 1, or (N+1)/2N causal."""
    return (n + 1) / (2 * n) if causal else 1.0


def _with_backward(fn: Callable[[], torch.Tensor], inputs) -> Callable[[], torch.Tensor]:
    """A call that runs ``fn`` and the backward pass of its output's sum into ``inputs``."""

    def call() -> torch.Tensor:
        for t in inputs:
            t.grad = None
        out = fn()
        out.sum().backward()
        return out.detach()

    return call


def _mode(grad: bool):
    """Inference mode for forward timings; autograd on for the trainable path."""
    return torch.enable_grad() if grad else torch.inference_mode()


def _time_once(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _peak_extra_bytes(fn: Callable[[], torch.Tensor], device: torch.device):
    """(result, peak bytes the call adds): resident memory on CPU, the allocator on CUDA."""
    if device.type != "cuda":
        return memory.peak_extra_bytes(fn)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def run_speed(
    mechanisms: Iterable[str],
    ns: Iterable[int],
    *,
    causal_modes: Iterable[bool] = (False, True),
    batch: int = 1,
    heads: int = 8,
    kv_heads: int | None = None,
    head_dim: int = 64,
    dtype: str = "float32",
    repeats: int = 5,
    configs: dict[str, dict] | None = None,
    max_call_s: float = 60.0,
    device: str = "cpu",
    grad: bool = False,
    backward: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[SpeedRecord]:
    """Measure each mechanism and raw SDPA side by side at each N and mode.

    Returns one record per (mechanism, N, mode), the SDPA baseline included
    under the name ``"sdpa"``. A mechanism whose single call exceeds
    ``max_call_s`` is not repeated and is skipped at larger N. ``device``: where the
    inputs and mechanisms live ("cpu", "cuda", ...). ``grad``: inputs that require gradients
    (the path a mechanism takes for training); ``backward`` (implies ``grad``): each timed
    call is forward + backward.
    """
    grad = grad or backward
    configs = configs or {}
    dev = torch.device(device)
    kv_heads = kv_heads or heads
    torch_dtype = DTYPES[dtype]
    names = [BASELINE, *[m for m in mechanisms if m != BASELINE]]
    modules = {
        m: attnlab.get(m, **configs.get(m, {})).eval().to(dev) for m in names if m != BASELINE
    }
    too_slow: dict[str, int] = {}
    records: list[SpeedRecord] = []
    for n in ns:
        q = torch.randn(batch, heads, n, head_dim, dtype=torch_dtype, device=dev)
        k = torch.randn(batch, kv_heads, n, head_dim, dtype=torch_dtype, device=dev)
        v = torch.randn(batch, kv_heads, n, head_dim, dtype=torch_dtype, device=dev)
        for t in (q, k, v):
            t.requires_grad_(grad)
        scores_mib = batch * heads * n * n * torch_dtype.itemsize / 2**20
        for causal in causal_modes:
            calls: dict[str, Callable[[], torch.Tensor]] = {
                BASELINE: lambda c=causal, q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q, k, v, is_causal=c, enable_gqa=kv_heads != heads
                )
            }
            for m, mod in modules.items():
                calls[m] = lambda mod=mod, c=causal, q=q, k=k, v=v: mod(q, k, v, causal=c)
            if backward:
                calls = {m: _with_backward(fn, (q, k, v)) for m, fn in calls.items()}
            active = {}
            peak: dict[str, int | None] = {}
            times: dict[str, list[float]] = {}
            for m, fn in calls.items():
                if m in too_slow and too_slow[m] < n:
                    records.append(
                        _skipped(
                            m,
                            configs,
                            n,
                            causal,
                            batch,
                            heads,
                            kv_heads,
                            head_dim,
                            dtype,
                            device,
                            (grad, backward),
                            scores_mib,
                            f"a call took over {max_call_s:.0f} s at N={too_slow[m]}",
                        )
                    )
                    continue
                if progress:
                    progress(f"{m} N={n} {'causal' if causal else 'full'}")
                with _mode(grad):
                    start = time.perf_counter()
                    _, peak[m] = _peak_extra_bytes(fn, dev)  # warm-up call measures memory
                    first = time.perf_counter() - start
                times[m] = []
                if first > max_call_s:
                    too_slow[m] = n
                    times[m].append(first * 1e3)
                else:
                    active[m] = fn
            with _mode(grad):
                for _ in range(repeats):
                    for m, fn in active.items():
                        times[m].append(_time_once(fn, dev))
            base_ms = statistics.median(times[BASELINE])
            for m in times:
                ms = statistics.median(times[m])
                rec = SpeedRecord(
                    mechanism=m,
                    config=configs.get(m, {}),
                    n=n,
                    causal=causal,
                    batch=batch,
                    heads=heads,
                    kv_heads=kv_heads,
                    head_dim=head_dim,
                    dtype=dtype,
                    device=device,
                    grad=grad,
                    backward=backward,
                    ms=ms,
                    ms_repeats=times[m],
                    peak_mib=None if peak[m] is None else peak[m] / 2**20,
                    scores_mib=scores_mib,
                    speedup=base_ms / ms,
                )
                density = getattr(modules.get(m), "density", None)
                if callable(density):
                    rec.density = float(density(n, n, causal))
                    rec.flop_bound_speedup = full_density(n, causal) / rec.density
                    rec.achieved = rec.speedup / rec.flop_bound_speedup
                records.append(rec)
    return records


def _skipped(
    m, configs, n, causal, batch, heads, kv_heads, head_dim, dtype, device, modes, scores_mib, why
):
    return SpeedRecord(
        mechanism=m,
        config=configs.get(m, {}),
        n=n,
        causal=causal,
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
        grad=modes[0],
        backward=modes[1],
        ms=None,
        ms_repeats=[],
        peak_mib=None,
        scores_mib=scores_mib,
        skipped=why,
    )
