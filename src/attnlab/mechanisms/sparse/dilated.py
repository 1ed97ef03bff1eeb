"""Dilated sliding-window attention (Longformer, arXiv:2004.05150).

Compared with allenai/longformer (diagonaled_mm_tvm with attention_dilation): the same
keys p + t·dilation, |t| <= attention_window (= window - 1 here), one-sided when
autoregressive; the authors set a dilation per head, attnlab one per mechanism, and
their global tokens are left out as in window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from attnlab.core import Spec, register
from attnlab.core.blocks import StaticBlockSparse, check_backend
from attnlab.core.checks import check_positive_int

from .window import band_candidates


@register
class Dilated(StaticBlockSparse):
    """Dilated sliding window: ``window`` keys spaced ``dilation`` apart around each query.

    Longformer (Beltagy et al., arXiv:2004.05150), "dilated sliding window":
    query at absolute position p (bottom-right aligned) attends keys
    j = p - t·dilation for |t| < ``window`` (t >= 0 only with causal=True), so
    the receptive field is (window - 1)·dilation on each side at the cost of
    ``window`` keys. dilation=1 is the plain sliding window.
    """

    spec = Spec(
        name="dilated",
        family="sparse",
        title="Dilated sliding-window attention (Longformer)",
        paper="arXiv:2004.05150",
        exact=False,
        cross=True,
        decode=True,
        complexity="O(N·W·D)",
    )
    tiny_config: ClassVar[dict] = {"window": 3, "dilation": 2, "block": 4}

    @dataclass
    class Config:
        window: int = 256
        dilation: int = 2
        block: int = 128
        backend: str = "auto"

        def __post_init__(self):
            check_positive_int("window", self.window)
            check_positive_int("dilation", self.dilation)
            check_positive_int("block", self.block)
            check_backend(self.backend)

    def rule(self, nq, nk, causal, heads, device=None):
        w, dil, offset = self.config.window, self.config.dilation, nk - nq

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + offset - kv_idx
            ok = (d % dil == 0) & (d < w * dil) & (d > -w * dil)
            return ok & (d >= 0) if causal else ok

        return mask_mod

    def candidates(self, nq, nk, causal, heads):
        reach = (self.config.window - 1) * self.config.dilation
        return band_candidates(nq, nk, self.config.block, reach, 0 if causal else reach)

    def limit(self, n):
        return dataclasses.replace(self.config, window=n, dilation=1)

    def step(self, q, k, v, state, *, scale=None):
        """A decoding step that keeps only the keys the next queries can reach."""
        out, state = super().step(q, k, v, state, scale=scale)
        keep = (self.config.window - 1) * self.config.dilation
        return out, {name: t[:, :, max(0, t.shape[2] - keep) :] for name, t in state.items()}

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: a rolling cache of (window - 1)·dilation keys and values."""
        keep = (self.config.window - 1) * self.config.dilation
        return max(1, min(n, keep)) * kv_heads * (head_dim + value_dim)
