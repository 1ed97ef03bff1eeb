"""Exact softmax attention through torch's fused ``scaled_dot_product_attention``.

Reference: torch's scaled_dot_product_attention itself, which this mechanism calls (no
separate authors' code was compared); attnlab adds only the bottom-right causal
alignment and zero rows for queries that see nothing.
"""

from __future__ import annotations

import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.masks import causal_mask
from attnlab.core.mechanism import KVCacheDecode


@register
class Softmax(KVCacheDecode, Mechanism):
    """softmax(q kᵀ · scale) v, "Attention Is All You Need" (Vaswani et al., 2017).

    Dispatches to ``torch.nn.functional.scaled_dot_product_attention`` (which picks
    a fused flash or memory-efficient kernel) with grouped-query heads passed
    natively; bottom-right causal alignment and zero rows for fully masked
    queries are added on top of it.
    """

    spec = Spec(
        name="softmax",
        family="exact",
        title="Scaled dot-product softmax attention (torch SDPA)",
        paper="arXiv:1706.03762",
        exact=True,
        decode=True,
        complexity="O(N²·D)",
    )

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        nq, nk = q.shape[2], k.shape[2]
        gqa = q.shape[1] != k.shape[1]
        if mask is None and (not causal or nq == nk):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa
            )
        allowed = causal_mask(nq, nk, q.device) if causal else None
        if mask is not None:
            allowed = mask if allowed is None else mask & allowed
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa
        )
        # a query with no key to attend to gives zeros, never NaN
        return out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
