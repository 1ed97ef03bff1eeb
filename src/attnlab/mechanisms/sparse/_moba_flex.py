"""MoBA's FlexAttention path (Lu et al., arXiv:2502.13189): the union of the blocks
each query block chose, as a layout of the shared block-sparse engine, with a per-token
rule that keeps each query's own choices (inference only)."""

from __future__ import annotations

import torch

from attnlab.core.blocks import BlockLayout, flex_block_attention, ranges_to_candidates


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


def flex_moba(q, k, v, sel, *, block: int, scale: float, causal: bool, mask=None):
    """MoBA attention over the block choices ``sel`` [B, H, Nq, top_k] (from
    :func:`attnlab.mechanisms.sparse.moba.moba_select`) by compiled FlexAttention."""
    layout = selection_layout(sel, q.shape[2], k.shape[2], block, causal)
    return flex_block_attention(q, k, v, layout, scale=scale, mask=mask)
