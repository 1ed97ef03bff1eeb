"""MoBA: Mixture of Block Attention (Lu et al., arXiv:2502.13189)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.blocks import (
    BlockLayout,
    flex_block_attention,
    flex_unsupported,
    ranges_to_candidates,
)
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv
from attnlab.core.mechanism import KVCacheDecode

from ._routed import NEG_INF, pool_blocks, token_block_attention

FORMS = ("auto", "torch", "flex")


def check_form(form: object) -> str:
    if form not in FORMS:
        raise AttnInputError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
    return form


def own_blocks(nq: int, nk: int, block: int, causal: bool, device) -> torch.Tensor:
    """Long [Nq]: the key block holding each query's aligned position i + Nk - Nq (-1: none)."""
    pos = torch.arange(nq, device=device) + (nk - nq)
    own = pos.clamp(0, nk - 1) // block
    return torch.where(pos < 0, -1, own) if causal else own


def moba_select(q, k, *, block: int, top_k: int, causal: bool) -> torch.Tensor:
    """Long [B, H, Nq, top_k]: the key blocks each query attends under MoBA's gate.

    The gate of query i for key block j is ``q_i · mean(K_j)``. The block that
    holds the query's own position is always taken; the other ``top_k - 1``
    are the highest-gated blocks among those wholly in the query's past
    (causal) or among all others (non-causal). Empty slots hold -1.
    """
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    nkb = -(-nk // block)
    centroids = repeat_kv(pool_blocks(k, block), h // k.shape[1])  # [B, H, nkb, D]
    own = own_blocks(nq, nk, block, causal, q.device)  # [Nq]
    sel_own = own.view(1, 1, nq, 1).expand(b, h, nq, 1)
    if top_k == 1 or nkb == 1:
        return sel_own
    with torch.no_grad():
        gate = q @ centroids.transpose(-1, -2)  # [B, H, Nq, nkb]
        cols = torch.arange(nkb, device=q.device)
        eligible = cols[None, :] < own[:, None] if causal else cols[None, :] != own[:, None]
        gate = gate.masked_fill(~eligible, NEG_INF)
        n_other = min(top_k - 1, nkb - 1)
        val, idx = gate.topk(n_other, dim=-1, sorted=False)
        idx = torch.where(torch.isinf(val), -1, idx)
    return torch.cat([sel_own, idx], dim=-1)


def selection_layout(sel: torch.Tensor, nq: int, nk: int, block: int, causal: bool) -> BlockLayout:
    """The shared engine's layout for per-query block choices.

    Each query block visits the union of the blocks its queries chose; the
    token rule keeps, for each query, only its own choices (and the causal rule).
    """
    b, h = sel.shape[:2]
    nkb, nqb = -(-nk // block), -(-nq // block)
    chosen = torch.zeros(b, h, nq, nkb + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(-1, torch.where(sel >= 0, sel, nkb), True)
    chosen = chosen[..., :nkb]
    rows = torch.nn.functional.pad(chosen, (0, 0, 0, nqb * block - nq))
    union = rows.unflatten(2, (nqb, block)).any(dim=3)  # [B, H, nqb, nkb]
    lo = torch.zeros(b, h, nqb, dtype=torch.long, device=sel.device)
    cand = ranges_to_candidates(lo, lo + nkb)
    cand = torch.where(union.gather(-1, cand.clamp_min(0)) & (cand >= 0), cand, -1)
    offset = nk - nq

    def mask_mod(bi, hi, q_idx, kv_idx):
        ok = chosen[bi, hi, q_idx, kv_idx // block]
        return ok & (kv_idx <= q_idx + offset) if causal else ok

    return BlockLayout.build(mask_mod, cand, nq, nk, block)


@register
class MoBA(KVCacheDecode, Mechanism):
    """Mixture of Block Attention, after "MoBA: Mixture of Block Attention for
    Long-Context LLMs" (Lu et al., arXiv:2502.13189).

    Keys are cut into blocks of ``block``; each query gates every block by the
    dot product of the query with the block's mean-pooled key and attends,
    with one softmax, to the ``top_k`` blocks it keeps: its own block (the one
    holding its aligned position, causal inside) always, plus the ``top_k - 1``
    best-gated blocks wholly in its past (causal) or anywhere else (non-causal).
    As in the paper the gate is per query token, so the mechanism stays
    causal; the gate itself is not differentiated (gradients flow through the
    attention over the chosen blocks).

    Paths (``form``): the (query, block) choices are sorted by key block into
    tiles of ``block`` queries sharing one block, all tiles run as one batch
    and each query's partial softmaxes are merged by log-sum-exp. ``"auto"``
    runs the tiles in torch's fused CPU flash kernel, forward and backward
    (its backward, given the merged log-sum-exp, yields the exact gradient),
    so it is both the fast and a trainable path; on other devices, dtypes or
    Dv != D it falls back to ``"torch"``: the same tiles in plain PyTorch ops
    (trainable by autograd). ``"flex"`` runs FlexAttention over the union of
    the blocks each query block chose, with a per-token rule (inference only;
    compiled per shape, slower than ``"auto"`` on CPU).
    """

    spec = Spec(
        name="moba",
        family="sparse",
        title="MoBA: mixture of block attention (top-k gated key blocks)",
        paper="arXiv:2502.13189",
        exact=False,
        cross=True,
        decode=True,
        complexity="O(N·k·B·D + N²/B·D)",
    )
    tiny_config: ClassVar[dict] = {"block": 4, "top_k": 2}
    forms: ClassVar[tuple[str, ...]] = FORMS

    @dataclass
    class Config:
        block: int = 512
        top_k: int = 3
        form: str = "auto"

        def __post_init__(self):
            check_positive_int("block", self.block)
            check_positive_int("top_k", self.top_k)
            check_form(self.form)

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if self.config.form == "flex":
            reasons += flex_unsupported(q, k, v)
        return reasons

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        cfg = self.config
        sel = moba_select(q, k, block=cfg.block, top_k=cfg.top_k, causal=causal)
        if cfg.form == "flex":
            layout = selection_layout(sel, q.shape[2], k.shape[2], cfg.block, causal)
            return flex_block_attention(q, k, v, layout, scale=scale, mask=mask)
        out = token_block_attention(
            q,
            k,
            v,
            sel,
            block=cfg.block,
            scale=scale,
            causal=causal,
            mask=mask,
            fused=cfg.form == "auto",
        )
        return out.to(q.dtype)

    def limit(self, n):
        """Every block kept: ``top_k`` = the number of key blocks."""
        return dataclasses.replace(self.config, top_k=max(1, -(-n // self.config.block)))

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """Fraction of the Nq x Nk pairs computed (exact when Nk is a multiple of ``block``)."""
        bs, top_k = self.config.block, self.config.top_k
        nkb = -(-nk // bs)
        pos = torch.arange(nq, dtype=torch.float64) + (nk - nq)
        if causal:
            own = (pos.clamp_min(0) // bs).floor()
            seen = (pos - own * bs + 1) + torch.minimum(own, torch.tensor(top_k - 1.0)) * bs
            seen = torch.where(pos < 0, 0.0, seen)
        else:
            seen = torch.full_like(pos, float(min(top_k, nkb) * bs))
        return float(seen.clamp(max=nk).sum()) / (nq * nk)
