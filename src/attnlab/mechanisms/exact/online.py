"""Exact attention by the tiled online-softmax kernel, in plain PyTorch.

Compared with Dao-AILab/flash-attention (_fwd_kernel of
flash_attn/flash_attn_triton.py): the same tile loop, running maximum, rescaled
accumulator and saved log-sum-exp, and future tiles skipped; attnlab aligns causal
queries bottom-right when Nq != Nk (as flash-attn 2.1 and later do; that Triton kernel
aligns top-left) and returns zeros for a row that sees nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attnlab.core import Mechanism, Spec, register
from attnlab.core.mechanism import KVCacheDecode
from attnlab.core.tiled import tiled_attention


@register
class Online(KVCacheDecode, Mechanism):
    """Flash-style tiled attention: online softmax over query and key tiles.

    FlashAttention's algorithm (Dao et al., arXiv:2205.14135) written with
    PyTorch tensor ops: a running maximum and normaliser per query row, causal
    tiles in the future skipped. It is the kernel that the softmax
    alternatives (``sigmoid``, ``softplus``, ``affine``, ``alibi``,
    ``lowrank-bias``) share through score modifiers and normalisers.
    """

    spec = Spec(
        name="online",
        family="exact",
        title="Tiled online-softmax attention (flash-style, plain PyTorch)",
        paper="arXiv:2205.14135",
        exact=True,
        decode=True,
        complexity="O(N²·D), O(N) memory without gradients",
    )
    tiny_config: ClassVar[dict] = {"block_q": 7, "block_k": 5}

    @dataclass
    class Config:
        block_q: int = 256
        block_k: int = 1024

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        return tiled_attention(
            q,
            k,
            v,
            scale=scale,
            causal=causal,
            mask=mask,
            block_q=self.config.block_q,
            block_k=self.config.block_k,
        )
