"""Run streaming analyses on attention maps already in memory.

The capture engine (``attnlab.models.capture``) feeds analyses from inside a
model's attention calls; this module feeds the same analyses from a list of
per-layer maps (eager ``output_attentions``, a toy model, synthetic patterns),
block by block exactly as the capture does, so both paths give the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Analysis, CaptureInfo


def analyze_maps(
    maps: Sequence[torch.Tensor],
    analyses: Sequence[Analysis],
    *,
    input_ids: torch.Tensor | None = None,
    tokens: list[str] | None = None,
    causal: bool = True,
    block: int | None = None,
    hidden_states: tuple[torch.Tensor, ...] | None = None,
    n_kv_heads: int | None = None,
) -> list[dict[str, Any]]:
    """Feed per-layer attention maps ``maps[l]`` (float [B, H, N, N]) to ``analyses``.

    Rows are handed over ``block`` query rows at a time (all at once when None);
    when ``causal``, each block stops at the last key its rows can see (K <= Nk),
    as in the capture protocol.
    ``input_ids`` defaults to ``arange(N)`` per sequence (every token distinct).
    Returns the concatenated tidy rows of every analysis.
    """
    if not maps:
        raise ValueError("maps: expected at least one layer's attention map, got none")
    b, h, n, nk = maps[0].shape
    if input_ids is None:
        input_ids = torch.arange(n).expand(b, n)
    info = CaptureInfo(
        n_layers=len(maps),
        n_heads=h,
        n_kv_heads=n_kv_heads or h,
        seq_len=n,
        input_ids=input_ids,
        tokens=tokens or [str(int(t)) for t in input_ids[0]],
        causal=causal,
    )
    for a in analyses:
        a.begin(info)
    step = block or n
    for layer, m in enumerate(maps):
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            # like the capture, a causal block leaves out the keys none of its rows sees
            keys = min(nk, rows.stop + nk - n) if causal else nk
            block_probs = m[:, :, rows, :keys].float()
            for a in analyses:
                a.update(layer, block_probs, rows)
    info.hidden_states = hidden_states
    out: list[dict[str, Any]] = []
    for a in analyses:
        out.extend(a.finish())
    return out
