"""NSA: Native Sparse Attention (Yuan et al., arXiv:2502.11089), as used in VideoNSA."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv
from attnlab.core.mechanism import KVCacheDecode

from ._isolation import attend_isolated
from ._routed import (
    NEG_INF,
    acc_dtype,
    band_attention,
    pool_blocks,
    softmax_rows,
    token_block_attention,
)
from .moba import own_blocks


def compressed_branch(q, k, v, *, block, scale, causal, mask):
    """NSA's compressed branch: attention over mean-pooled key/value blocks.

    Returns the output [B, H, Nq, Dv] and the attention probabilities over the
    compressed blocks [B, H, Nq, nkb] (the selection scores). A compressed
    block is visible to a query when all its keys are: under the causal rule
    (so only complete blocks) and under the user's mask, so that no key
    hidden from a query reaches it through a block mean.
    """
    h, nq = q.shape[1], q.shape[2]
    nk = k.shape[2]
    nkb = -(-nk // block)
    acc = acc_dtype(q.dtype)
    groups = h // k.shape[1]
    kc = repeat_kv(pool_blocks(k, block), groups)
    vc = repeat_kv(pool_blocks(v, block), groups)
    s = (q @ kc.transpose(-1, -2)).to(acc) * scale  # [B, H, Nq, nkb]
    allowed = None
    if causal:
        # only complete blocks are compressed: a block is seen once its last key is
        ends = (torch.arange(nkb, device=q.device) + 1) * block - 1
        pos = torch.arange(nq, device=q.device)[:, None] + (nk - nq)
        allowed = ends[None, :] <= pos
    if mask is not None:
        m = mask
        if mask.shape[-1] > 1:
            m = mask.new_ones(*mask.shape[:-1], nkb * block)
            m[..., :nk] = mask
            m = m.unflatten(-1, (nkb, block)).all(dim=-1)
        allowed = m if allowed is None else allowed & m
    if allowed is not None:
        s = s.masked_fill(~allowed, NEG_INF)
    p = softmax_rows(s)
    return p @ vc.to(acc), p


def forced_blocks(own: torch.Tensor, top_n: int) -> torch.Tensor:
    """Long [Nq, min(top_n, 3)]: the blocks NSA always selects, -1 for none.

    The paper's n selected blocks include 1 initial and 2 local blocks
    (arXiv:2502.11089, Sec. 4.1): here the query's own block, the initial
    block 0 and the block before the own one, in that order of priority when
    ``top_n`` < 3, each listed once.
    """
    none = torch.full_like(own, -1)
    initial = torch.where(own > 0, 0, none)
    previous = torch.where(own > 1, own - 1, none)
    return torch.stack([own, initial, previous], dim=-1)[:, :top_n]


def select_blocks(p_cmp: torch.Tensor, own: torch.Tensor, top_n: int, causal: bool):
    """Long [B, H, Nq, S]: NSA's selected key blocks per query, -1 for an empty slot.

    The :func:`forced_blocks`, then the blocks with the highest compressed
    probability ``p_cmp`` [B, H, Nq, nkb] among the others (causal: only
    blocks wholly before the own one) until there are ``top_n``. A block the
    compressed branch does not show (probability 0: some of its keys are
    masked) ranks last but may still be chosen, for the keys of it that the
    query does see; so with ``top_n`` = the number of blocks every visible
    key is attended.
    """
    b, h, nq, nkb = p_cmp.shape
    forced = forced_blocks(own, top_n)  # [Nq, F]
    sel = forced.view(1, 1, nq, -1).expand(b, h, nq, forced.shape[1])
    n_other = min(top_n - 1, nkb - 1)
    if n_other <= 0:
        return sel
    with torch.no_grad():
        cols = torch.arange(nkb, device=p_cmp.device)
        taken = (cols[None, :, None] == forced[:, None, :]).any(dim=-1)  # [Nq, nkb]
        if causal:
            taken = taken | (cols >= own[:, None])
        score = p_cmp.detach().masked_fill(taken, -1.0)
        val, idx = score.topk(n_other, dim=-1)  # best first
        free = top_n - (forced >= 0).sum(dim=-1)  # [Nq]: slots left per query
        rank = torch.arange(n_other, device=p_cmp.device)
        keep = (val >= 0) & (rank < free[:, None])
        idx = torch.where(keep, idx, -1)
    return torch.cat([sel, idx], dim=-1)


@register
class NSA(KVCacheDecode, Mechanism):
    """Native Sparse Attention, after "Native Sparse Attention: Hardware-Aligned and
    Natively Trainable Sparse Attention" (Yuan et al., arXiv:2502.11089), in the
    form "VideoNSA" (arXiv:2510.02295) applies to video tokens.

    Three branches over the same queries, each a softmax attention:

    - compressed: keys and values mean-pooled over blocks of ``block`` (the
      paper's learned compression MLP reduced to its mean; blocks do not
      overlap), a compressed block visible once all its keys are;
    - selected: ``top_n`` blocks attended token by token: the initial block
      and the two local blocks (the query's own and the one before it),
      which the paper counts among its n (Sec. 4.1), then the blocks with the
      highest compressed-branch probability among the others it can see (the
      paper's importance scores, with selection blocks equal to compression
      blocks); see :func:`select_blocks`;
    - sliding: the last ``window`` keys (causal), or those within ``window``
      on either side (non-causal).

    The output is ``gate_cmp·o_cmp + gate_slc·o_slc + gate_win·o_win``. The
    paper's gates are sigmoids of an MLP on the layer input, which an
    attention operator does not see; here they are Config constants. Selection
    is per query and per head (the paper shares it across a GQA group; per
    head keeps grouped-query attention equal to repeated keys and values).
    A compressed block is visible to a row when all its keys are (the causal
    rule and the user's mask alike), so a key hidden from a row never reaches
    it through a block mean; a NaN or infinity in a key or value reaches only
    the rows that attend it (:func:`._isolation.attend_isolated`).

    DeepSeek published no code for NSA; the definitions follow the paper
    (Sec. 3.3, 4.1). The departures above (mean pooling for the compression
    MLP, equal and non-overlapping compression and selection blocks,
    constant gates, per-head selection) are on purpose: an attention
    operator has no layer parameters and no layer input.
    """

    spec = Spec(
        name="nsa",
        family="sparse",
        title="NSA: native sparse attention (compressed, selected, sliding)",
        paper="arXiv:2502.11089",
        exact=False,
        decode=True,
        complexity="O(N·(N/B + n·B + W)·D)",
    )
    tiny_config: ClassVar[dict] = {"block": 4, "top_n": 2, "window": 5}

    @dataclass
    class Config:
        block: int = 64
        top_n: int = 16
        window: int = 512
        gate_cmp: float = 1 / 3
        gate_slc: float = 1 / 3
        gate_win: float = 1 / 3

        def __post_init__(self):
            check_positive_int("block", self.block)
            check_positive_int("top_n", self.top_n)
            check_positive_int("window", self.window)
            for name in ("gate_cmp", "gate_slc", "gate_win"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise AttnInputError(f"{name}: expected a float, got {value!r}")

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        def attend(q, k, v):
            return self._branches(q, k, v, causal=causal, mask=mask, scale=scale)

        return attend_isolated(attend, q, k, v).to(q.dtype)

    def _branches(self, q, k, v, *, causal, mask, scale):
        """The gated sum of the three branches, in the accumulation dtype."""
        cfg = self.config
        nq, nk = q.shape[2], k.shape[2]
        acc = acc_dtype(q.dtype)
        out = 0.0
        o_cmp, p_cmp = compressed_branch(
            q, k, v, block=cfg.block, scale=scale, causal=causal, mask=mask
        )
        if cfg.gate_cmp:
            out = out + cfg.gate_cmp * o_cmp
        if cfg.gate_slc:
            own = own_blocks(nq, nk, cfg.block, causal, q.device)
            sel = select_blocks(p_cmp, own, cfg.top_n, causal)
            o_slc = token_block_attention(
                q, k, v, sel, block=cfg.block, scale=scale, causal=causal, mask=mask
            )
            out = out + cfg.gate_slc * o_slc
        if cfg.gate_win:
            o_win = band_attention(
                q, k, v, window=cfg.window, scale=scale, causal=causal, mask=mask
            )
            out = out + cfg.gate_win * o_win
        if not torch.is_tensor(out):
            out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)
        return out

    def limit(self, n):
        """The selected branch alone, with every block selected."""
        return dataclasses.replace(
            self.config,
            top_n=max(1, -(-n // self.config.block)),
            gate_cmp=0.0,
            gate_slc=1.0,
            gate_win=0.0,
        )

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """Keys (compressed, selected and in the window) visited per query, over Nk.

        Exact for the compressed and sliding branches; the selected branch is
        counted as own block + (top_n - 1) full blocks wherever that many are visible.
        """
        bs, n, w = self.config.block, self.config.top_n, self.config.window
        nkb = -(-nk // bs)
        pos = torch.arange(nq, dtype=torch.float64) + (nk - nq)
        if causal:
            own = pos.clamp_min(0) // bs
            cmp = own
            slc = (pos - own * bs + 1) + torch.minimum(own, torch.tensor(n - 1.0)) * bs
            win = (pos + 1).clamp(0, w)
            total = torch.where(pos < 0, 0.0, cmp + slc + win)
        else:
            cmp = torch.full_like(pos, float(nkb))
            slc = torch.full_like(pos, float(min(n, nkb) * bs))
            win = torch.minimum(pos + w, torch.tensor(float(nk))) - (pos - w + 1).clamp_min(0)
            total = cmp + slc.clamp(max=nk) + win
        return float(total.sum()) / (nq * nk)
