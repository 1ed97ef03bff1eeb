"""Row-wise helpers shared by the softmax alternatives of the exact family.

- :func:`visible_sum`: for each query, the sum over the keys it may attend of a
  per-key quantity (a count, the values) without building an N x N matrix when
  the mask does not vary by query (no mask, or a key-padding mask);
- :func:`dense_scores`, :func:`masked_softmax`: the plain dense pieces that the
  mechanisms' ``reference()`` definitions are written with.
"""

from __future__ import annotations

import torch

from attnlab.core.masks import causal_mask, repeat_kv


def visible_sum(x: torch.Tensor, mask: torch.Tensor | None, causal: bool, nq: int) -> torch.Tensor:
    """``sum_{j visible to i} x_j`` for every query i.

    ``x`` is [B|1, H|1, Nk, C]; ``mask`` a 4-d bool mask broadcastable to
    [B, H, Nq, Nk] (or None); ``causal`` is bottom-right aligned (query i sees
    j <= i + Nk - Nq). Returns [B', H', Nq, C] (broadcast dims kept at 1 where
    possible); a query that sees nothing gets zeros.
    """
    nk = x.shape[-2]
    if mask is not None and mask.shape[-2] != 1:
        # the mask differs from query to query: it is already N x N, use it densely
        allowed = mask.expand(*mask.shape[:-1], nk)
        if causal:
            allowed = allowed & causal_mask(nq, nk, x.device)
        return allowed.to(x.dtype) @ x
    if mask is not None:
        keep = mask.expand(*mask.shape[:-1], nk).transpose(-1, -2)  # [B|1, H|1, Nk, 1]
        x = x * keep.to(x.dtype)
    if not causal:
        total = x.sum(dim=-2, keepdim=True)
        return total.expand(*total.shape[:-2], nq, total.shape[-1])
    prefix = x.cumsum(dim=-2)
    last = torch.arange(nq, device=x.device) + (nk - nq)  # last key each query sees
    out = prefix.index_select(-2, last.clamp(0, nk - 1))
    return out.masked_fill((last < 0)[:, None], 0.0)


def visible_count(
    mask: torch.Tensor | None, causal: bool, nq: int, nk: int, *, dtype, device
) -> torch.Tensor:
    """Number of keys each query may attend: [B|1, H|1, Nq, 1] in ``dtype``."""
    ones = torch.ones(1, 1, nk, 1, dtype=dtype, device=device)
    return visible_sum(ones, mask, causal, nq)


def dense_scores(q, k, v, *, causal, mask, scale):
    """Dense pieces for reference definitions: (scaled scores, allowed, v repeated).

    scores [B, Hq, Nq, Nk] = q kᵀ · scale; allowed is the bool mask of keys each
    query may attend (causal bottom-right and the user's mask), expanded to the
    score shape; v is repeated to Hq heads.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    nq, nk = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = causal_mask(nq, nk, q.device)
    if mask is not None:
        allowed = allowed & mask
    return scores, allowed.expand(scores.shape), v


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed keys; rows with no allowed key are all zero."""
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return probs.nan_to_num(0.0)
