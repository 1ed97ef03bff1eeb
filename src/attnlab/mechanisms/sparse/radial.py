"""Radial attention: a static mask whose spatial window shrinks with temporal distance.

The comparison with mit-han-lab/radial-attention is in the class docstring: attnlab
keeps the token-level rule of the paper and its optional first-frame sink, and leaves
out the kernel's block rounding and model-specific bands on purpose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Spec, register
from attnlab.core.blocks import StaticBlockSparse, check_backend, ranges_to_candidates
from attnlab.core.checks import check_positive_int


@register
class Radial(StaticBlockSparse):
    """Radial attention: dense near the query's frame, exponentially sparser further away.

    "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long
    Video Generation" (Li et al., arXiv:2506.19852). Tokens form frames of
    ``frame`` tokens (s); query token k of frame i and key token l of frame j,
    at temporal distance d = |i - j|, lie in band r = floor(log2 max(d, 1)).
    The key is attended when the spatial window of that band still holds a
    token, (|k - l| + 1)·2^r <= s, or else, once 2^r > s, when k = l and d is
    a multiple of ceil(2^r / s). Each band doubles its temporal width and
    halves its spatial width, so every query attends O(s log(N/s)) keys.
    Queries are aligned bottom-right; causal=True keeps only keys j <= p.

    Checked (session 3) against the authors' code (mit-han-lab/radial-attention,
    ``radial_attn/attn_mask.py``), which confirms the structure of this rule:
    band r = bit_length(d) - 1 = floor(log2 d), spatial width s/2^r (s a power
    of two), and, once that width is below the granularity, only frame pairs
    whose distance is a multiple of the period are kept. The code realises it
    per 128 x 128 block for video diffusion models and adds, beyond the
    token-level equation, a first frame that every query sees in full (an
    attention sink), a spatial window one token wider (|k - l| <= s/2^r)
    that never narrows below one block, far frame pairs kept or dropped
    whole, and model-specific first bands (Wan: half a frame at d = 1); those
    are left out here, except the sink: ``sink=True`` lets every query see
    the whole first frame (keys 0..s-1, within the causal rule when causal).
    ``tests/mechanisms/test_sparse_causal_routed.py`` checks this rule
    against rows worked out by hand from the equation.
    """

    spec = Spec(
        name="radial",
        family="sparse",
        title="Radial attention (static energy-decay mask)",
        paper="arXiv:2506.19852",
        exact=False,
        cross=True,
        decode=True,
        complexity="O(N·log N·D)",
    )
    tiny_config: ClassVar[dict] = {"frame": 4, "block": 4}

    @dataclass
    class Config:
        frame: int = 1024
        block: int = 128
        sink: bool = False
        backend: str = "auto"

        def __post_init__(self):
            check_positive_int("frame", self.frame)
            check_positive_int("block", self.block)
            if not isinstance(self.sink, bool):
                raise AttnInputError(f"sink: expected True or False, got {self.sink!r}")
            check_backend(self.backend)

    def rule(self, nq, nk, causal, heads, device=None):
        s, offset, sink = self.config.frame, nk - nq, self.config.sink
        frames = -(-max(nq, nk) // s) + 1
        bits = max(1, frames.bit_length())

        def mask_mod(b, h, q_idx, kv_idx):
            p = q_idx + offset
            d = (p // s - kv_idx // s).abs()
            k, l = p % s, kv_idx % s
            # 2^r: the largest power of two <= max(d, 1), exactly, without logarithms
            power = torch.ones_like(d)
            for e in range(1, bits + 1):
                power = torch.where(d >= 2**e, 2**e, power)
            spatial = ((k - l).abs() + 1) * power <= s
            period = (power + s - 1) // s
            diagonal = (power > s) & (k == l) & (d % period == 0)
            ok = spatial | diagonal
            if sink:  # the authors' code: the first frame is seen whole by every query
                ok = ok | (kv_idx < s)
            return ok & (kv_idx <= p) if causal else ok

        return mask_mod

    def candidates(self, nq, nk, causal, heads):
        """Every key block (up to the query block's last position when causal)."""
        bs = self.config.block
        nqb, nkb = -(-nq // bs), -(-nk // bs)
        last = torch.clamp(torch.arange(1, nqb + 1) * bs - 1, max=nq - 1) + (nk - nq)
        hi = last // bs + 1 if causal else torch.full((nqb,), nkb)
        hi = hi.clamp(min=0, max=nkb)
        return ranges_to_candidates(torch.zeros_like(hi), hi)[None, None]

    def limit(self, n):
        return dataclasses.replace(self.config, frame=n)
