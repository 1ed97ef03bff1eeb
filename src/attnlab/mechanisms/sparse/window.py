"""Sliding-window attention (Longformer, arXiv:2004.05150).

Compared with allenai/longformer (LongformerSelfAttention, sliding_chunks_matmul_qk):
the same band, each query seeing its attention_window keys on each side and itself, so
attnlab's window is the authors' attention_window + 1; Longformer's global tokens
(queries and keys that attend and are attended everywhere, with their own projections)
belong to the layer and are left out, and its causal (autoregressive) form is the TVM
kernel's one-sided band, as here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Spec, register
from attnlab.core.blocks import StaticBlockSparse, check_backend, ranges_to_candidates
from attnlab.core.checks import check_positive_int


def band_candidates(nq: int, nk: int, block: int, back: int, ahead: int) -> torch.Tensor:
    """Key blocks [1, 1, Nq/block, C] holding keys p - back <= j <= p + ahead.

    ``p = i + Nk - Nq`` is the absolute (bottom-right aligned) position of query i.
    """
    nqb = -(-nq // block)
    start = torch.arange(nqb) * block + (nk - nq)
    stop = torch.clamp(start + block - 1, max=nk - 1)
    lo = torch.clamp(start - back, min=0)
    hi = torch.clamp(stop + ahead, max=nk - 1)
    lo_b, hi_b = lo // block, torch.where(hi >= lo, hi // block + 1, lo // block)
    return ranges_to_candidates(lo_b, hi_b)[None, None]


@register
class Window(StaticBlockSparse):
    """Sliding-window attention: each query sees the keys near its own position.

    Longformer (Beltagy et al., arXiv:2004.05150), "sliding window": query at
    absolute position p (bottom-right aligned, p = i + Nk - Nq) attends keys j
    with |p - j| < ``window`` (a symmetric window of 2·window - 1 keys, the
    paper's w = 2·(window - 1)); with causal=True only j <= p, i.e. the
    ``window`` most recent keys, itself included. Softmax runs over the
    window. Computed block-sparsely (core.blocks), O(N·window·D).
    """

    spec = Spec(
        name="window",
        family="sparse",
        title="Sliding-window attention (Longformer)",
        paper="arXiv:2004.05150",
        exact=False,
        cross=True,
        decode=True,
        complexity="O(N·W·D)",
    )
    tiny_config: ClassVar[dict] = {"window": 5, "block": 4}

    @dataclass
    class Config:
        window: int = 256
        block: int = 128
        backend: str = "auto"

        def __post_init__(self):
            check_positive_int("window", self.window)
            check_positive_int("block", self.block)
            check_backend(self.backend)

    def rule(self, nq, nk, causal, heads, device=None):
        w, offset = self.config.window, nk - nq

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + offset - kv_idx
            ok = (d < w) & (d > -w)
            return ok & (d >= 0) if causal else ok

        return mask_mod

    def candidates(self, nq, nk, causal, heads):
        w = self.config.window
        return band_candidates(nq, nk, self.config.block, w - 1, 0 if causal else w - 1)

    def limit(self, n):
        return dataclasses.replace(self.config, window=n)

    def step(self, q, k, v, state, *, scale=None):
        """A decoding step that keeps only the last ``window - 1`` keys after attending."""
        out, state = super().step(q, k, v, state, scale=scale)
        keep = self.config.window - 1
        return out, {name: t[:, :, max(0, t.shape[2] - keep) :] for name, t in state.items()}

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: a rolling cache of at most ``window - 1`` keys and values."""
        return min(n, self.config.window - 1) * kv_heads * (head_dim + value_dim)
