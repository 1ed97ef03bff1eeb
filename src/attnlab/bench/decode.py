"""Cost of one decoding step at a position: a recurrent state against a KV cache.

:func:`run_decode` times one decoding ``step`` at given positions (the positions
interleaved call by call), from a state built by decoding that many tokens, to show
that a recurrent state costs the same per token at any position (a KV cache does not).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

import attnlab

from .timing import Progress, median_ms


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
        got = median_ms(calls, repeats)  # positions alternate, so noise hits all alike
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
