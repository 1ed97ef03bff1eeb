"""Top-k attention: each query keeps only its k highest-scoring keys.

Compared with ag1988/top_k_attention (_AttentionNoCache in
nocache_attention/nocache_attention.py): attnlab agrees, softmax over each query's top_k
scores (query chunks there, key blocks with a running top-k here), gradients through the
kept scores only; the authors fill masked scores with the most negative float, so a row
with fewer than top_k visible keys keeps masked ones at weight ~0 and a row that sees
nothing averages its masked keys, where attnlab never keeps a hidden key and gives such
a row zeros.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv, slice_mask
from attnlab.core.mechanism import KVCacheDecode

from ._routed import NEG_INF, acc_dtype, softmax_rows


def topk_keys(q, k, *, top_k: int, scale: float, causal: bool, mask, q0: int, nq: int, block: int):
    """The visible keys of highest score for a tile of queries starting at row ``q0``.

    Returns long [B, H, tq, k'] key indices and a bool mask of the slots that
    hold a visible key (k' = min(top_k, Nk)). Keys are scanned in blocks of
    ``block`` keeping a running top-k, so no [tq, Nk] score matrix is held.
    Causal alignment is bottom-right (Nq = ``nq``).
    """
    b, h, tq, _ = q.shape
    nk = k.shape[2]
    kk = min(top_k, nk)
    with torch.no_grad():
        vals = q.new_full((b, h, tq, kk), NEG_INF, dtype=acc_dtype(q.dtype))
        idx = torch.zeros(b, h, tq, kk, dtype=torch.long, device=q.device)
        rows = torch.arange(q0, q0 + tq, device=q.device)[:, None] + (nk - nq)
        for k0 in range(0, nk, block):
            k1 = min(k0 + block, nk)
            s = (q @ k[:, :, k0:k1].transpose(-1, -2)).to(vals.dtype) * scale
            cols = torch.arange(k0, k1, device=q.device)[None, :]
            allowed = slice_mask(mask, slice(q0, q0 + tq), slice(k0, k1))
            if causal:
                allowed = cols <= rows if allowed is None else allowed & (cols <= rows)
            if allowed is not None:
                s = s.masked_fill(~allowed, NEG_INF)
            vals, pick = torch.cat([vals, s], dim=-1).topk(kk, dim=-1)
            idx = torch.cat([idx, cols.expand(b, h, tq, -1)], dim=-1).gather(-1, pick)
    return idx, ~torch.isinf(vals)


@register
class TopK(KVCacheDecode, Mechanism):
    """Top-k attention: each query attends only to its ``top_k`` highest-scoring keys.

    The scores q·k are computed block by block with a running top-k (no
    Nq x Nk matrix for large N); the softmax is then taken over the kept keys
    only, as in "Memory-efficient Transformers via Top-k Attention" (Gupta et
    al., arXiv:2106.06899). Keys hidden by the causal rule or the mask are
    never kept. The choice itself is not differentiated; gradients flow
    through the scores and values of the kept keys.
    """

    spec = Spec(
        name="topk",
        family="sparse",
        title="Top-k attention (each query keeps its k best keys)",
        paper="arXiv:2106.06899",
        exact=False,
        decode=True,
        complexity="O(N²·D) scores, O(N·k·D) attention",
    )
    tiny_config: ClassVar[dict] = {"top_k": 5, "block": 7}

    @dataclass
    class Config:
        top_k: int = 64
        block: int = 1024

        def __post_init__(self):
            check_positive_int("top_k", self.top_k)
            check_positive_int("block", self.block)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        b, h, nq, d = q.shape
        groups = h // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        acc = acc_dtype(q.dtype)
        block = self.config.block
        outs = []
        for q0 in range(0, nq, block):
            qt = q[:, :, q0 : q0 + block]
            tq = qt.shape[2]
            idx, valid = topk_keys(
                qt,
                k,
                top_k=self.config.top_k,
                scale=scale,
                causal=causal,
                mask=mask,
                q0=q0,
                nq=nq,
                block=block,
            )
            kk = idx.shape[-1]
            flat = idx.reshape(b, h, tq * kk, 1)
            ks = k.gather(2, flat.expand(-1, -1, -1, d)).view(b, h, tq, kk, d)
            vs = v.gather(2, flat.expand(-1, -1, -1, v.shape[-1])).view(b, h, tq, kk, -1)
            s = torch.einsum("bhqd,bhqkd->bhqk", qt, ks).to(acc) * scale
            p = softmax_rows(s.masked_fill(~valid, NEG_INF))
            outs.append(torch.einsum("bhqk,bhqkd->bhqd", p, vs.to(acc)))
        return torch.cat(outs, dim=2).to(q.dtype)

    def limit(self, n):
        """Every key kept: ``top_k`` = N."""
        return dataclasses.replace(self.config, top_k=n)

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """Fraction of the Nq x Nk pairs attended: min(k, visible keys) per query."""
        vis = torch.full((nq,), float(nk), dtype=torch.float64)
        if causal:
            vis = (torch.arange(nq, dtype=torch.float64) + (nk - nq) + 1).clamp(0, nk)
        return float(vis.clamp(max=self.config.top_k).sum()) / (nq * nk)
