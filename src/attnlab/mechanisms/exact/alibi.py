"""Attention with Linear Biases (ALiBi; Press, Smith & Lewis, arXiv:2108.12409).

Compared with ofirpress/attention_with_linear_biases (get_slopes and the biased future
mask in its fairseq transformer): the same slopes for any head count and the same causal
bias (the authors add m_h·j and rely on softmax's invariance to a per-row shift, which
equals -m_h·(i-j)); the symmetric -m_h·|i-j| of the non-causal form is attnlab's
extension, the authors' code being causal only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.mechanism import KVCacheDecode
from attnlab.core.tiled import tiled_attention

from ._rows import dense_scores, masked_softmax


def alibi_slopes(heads: int) -> list[float]:
    """The per-head slopes m_h of ALiBi (arXiv:2108.12409, Sec. 3).

    For H a power of two, the geometric sequence starting at ``2^(-8/H)`` with
    that same ratio (H=8: 1/2, 1/4, ..., 1/256). Otherwise, the slopes of the
    largest power of two P < H, followed by every other slope of the sequence for
    2P (the odd terms ``2^(-4(2i-1)/P)``) until there are H, as in the authors'
    code.
    """
    check_positive_int("heads", heads)
    p = 2 ** math.floor(math.log2(heads))
    slopes = [2.0 ** (-8.0 * (i + 1) / p) for i in range(p)]
    if p < heads:
        slopes += [2.0 ** (-4.0 * (2 * i + 1) / p) for i in range(heads - p)]
    return slopes


def _distance(q_slice: slice, k_slice: slice, offset: int, device) -> torch.Tensor:
    """|position of query - position of key| for a tile, queries aligned bottom-right."""
    rows = torch.arange(q_slice.start, q_slice.stop, device=device) + offset
    cols = torch.arange(k_slice.start, k_slice.stop, device=device)
    return (rows[:, None] - cols[None, :]).abs()


@register
class ALiBi(KVCacheDecode, Mechanism):
    """softmax(q kᵀ · scale - m_h · |i - j|) v: "Train Short, Test Long" (ALiBi).

    Press, Smith & Lewis (arXiv:2108.12409), Sec. 3: no position embeddings;
    each head h adds the static, non-learned bias ``-m_h · (i - j)`` to the
    score of query i and key j <= i, with the geometric head slopes of
    :func:`alibi_slopes` (computed for the call's Hq query heads). Query i sits
    at position ``i + Nk - Nq`` (bottom-right, as the causal convention of
    attnlab), so a cached decode step sees the same distances as the parallel
    pass. Without the causal mask the bias is the symmetric ``-m_h · |i - j|``
    (the usual bidirectional extension; the paper treats causal LMs).
    Computed on the shared tiled kernel: the bias is added tile by tile, never
    materialised as an N x N matrix.
    """

    spec = Spec(
        name="alibi",
        family="exact",
        title="ALiBi: attention with linear biases (Press et al.)",
        paper="arXiv:2108.12409",
        exact=False,
        decode=True,
        complexity="O(N²·D)",
    )
    tiny_config: ClassVar[dict] = {"block_q": 7, "block_k": 5}

    @dataclass
    class Config:
        block_q: int = 512
        block_k: int = 1024

    @staticmethod
    def slopes(heads: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
        """The slopes as a [H, 1, 1] tensor, ready to scale a [B, H, tq, tk] tile."""
        return torch.tensor(alibi_slopes(heads), dtype=dtype, device=device)[:, None, None]

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        offset = k.shape[2] - q.shape[2]
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        m = self.slopes(q.shape[1], dtype=acc, device=q.device)

        def score_mod(s, qs, ks):
            return s - m * _distance(qs, ks, offset, q.device).to(s.dtype)

        return tiled_attention(
            q,
            k,
            v,
            scale=scale,
            causal=causal,
            mask=mask,
            score_mod=score_mod,
            block_q=self.config.block_q,
            block_k=self.config.block_k,
        )

    def reference(self, q, k, v, *, causal, mask, scale):
        """The definition, densely: softmax of the biased scores over allowed keys, times v."""
        scores, allowed, v = dense_scores(q, k, v, causal=causal, mask=mask, scale=scale)
        nq, nk = q.shape[2], k.shape[2]
        dist = _distance(slice(0, nq), slice(0, nk), nk - nq, q.device).to(scores.dtype)
        m = self.slopes(q.shape[1], dtype=scores.dtype, device=q.device)
        return masked_softmax(scores - m * dist, allowed) @ v
