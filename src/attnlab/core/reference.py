"""The golden reference: plain float64 matmul-softmax-matmul.

Used by the tests and nothing else. It is deliberately the most direct
formula, so that every mechanism can be held to it.
"""

from __future__ import annotations

import torch

from .masks import causal_mask, repeat_kv


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias, masked) v in float64; rows that see nothing give 0.

    ``bias`` is an optional additive score bias broadcastable to [B, Hq, Nq, Nk].
    Returns float64 [B, Hq, Nq, Dv].
    """
    q, k, v = q.double(), k.double(), v.double()
    hq, hkv = q.shape[1], k.shape[1]
    k, v = repeat_kv(k, hq // hkv), repeat_kv(v, hq // hkv)
    nq, nk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & causal_mask(nq, nk, q.device)
    if mask is not None:
        allowed = allowed & mask
    allowed = allowed.expand(q.shape[0], hq, nq, nk)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    v = v.masked_fill(~allowed.any(dim=2).any(dim=1)[:, None, :, None], 0.0)
    return probs @ v
