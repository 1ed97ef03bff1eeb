"""The full attention maps of a few chosen heads, for plotting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Analysis, CaptureInfo


class HeadMaps(Analysis):
    """Keeps the attention map [N, N] of each chosen (layer, head), first sequence only.

    Not a statistic: a picture. Only the heads asked for are kept (N x N floats
    each), so the rest of the model still streams in bounded memory.
    :attr:`maps` maps ``(layer, head)`` to a float [N, N] tensor; ``finish``
    returns no rows.
    """

    name = "maps"

    def __init__(self, heads: Sequence[tuple[int, int]], max_tokens: int = 256):
        self.heads = [(int(layer), int(h)) for layer, h in heads]
        self.max_tokens = max_tokens

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        n = min(info.seq_len, self.max_tokens)
        self.maps = {lh: torch.zeros(n, n) for lh in self.heads}

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        start = 0 if rows.start is None else rows.start
        for (lay, h), m in self.maps.items():
            if lay != layer:
                continue
            n = m.shape[0]
            stop = min(n, start + probs.shape[-2])
            if stop > start:
                k = min(n, probs.shape[-1])  # causal blocks leave out their zero columns
                m[start:stop, :k] = probs[0, h, : stop - start, :k].float().cpu()

    def finish(self) -> list[dict[str, Any]]:
        return []
