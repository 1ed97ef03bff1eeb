"""The shared tiled kernel: online-softmax attention in plain PyTorch.

Queries and keys are both cut into tiles; for each query tile the kernel walks
the key tiles, keeping a running row maximum and normaliser as in
FlashAttention (Dao et al., arXiv:2205.14135, Algorithm 1) and the online
softmax of Milakov & Gimelshein (arXiv:1805.02867). Tiles wholly in the causal
future are skipped, and tiles wholly in the past need no mask.

Softmax alternatives reuse the kernel through two hooks, in the spirit of
FlexAttention's ``score_mod`` (arXiv:2412.05496):

- ``score_mod(scores, q_slice, k_slice)`` edits a scaled score tile
  [B, H, tq, tk] (add a bias, a learned term, ...); slices give absolute query
  and key positions.
- ``weight``: ``None`` for softmax (exp with the running maximum), or an
  elementwise function of the scores whose result is used as the attention
  weight directly; ``normalise`` then chooses whether the row is divided by
  its sum of weights (l1 normalisation) or left as it is (sigmoid attention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .masks import divide_or_zero, repeat_kv, slice_mask

ScoreMod = Callable[[torch.Tensor, slice, slice], torch.Tensor]
Weight = Callable[[torch.Tensor], torch.Tensor]


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    weight: Weight | None = None,
    normalise: bool = True,
    block_q: int = 256,
    block_k: int = 1024,
) -> torch.Tensor:
    """Attention by tiles: ``sum_j w(s_ij) v_j / Z_i`` with s = score_mod(q kᵀ · scale).

    With ``weight=None`` it is exact softmax attention computed online. Rows with
    no key to attend to give zeros. Memory is O(block_q · block_k) per head
    beyond the inputs and output (plus what autograd keeps when gradients flow).
    """
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    groups = hq // k.shape[1]
    # half-precision inputs are computed in float32, as fused kernels accumulate
    acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    # the scale is folded into q once instead of into every score tile
    q_scaled = q.to(acc_dtype) * scale
    k = repeat_kv(k, groups).to(acc_dtype)
    dv = v.shape[-1]
    v = repeat_kv(v, groups).to(acc_dtype)
    softmax = weight is None
    if softmax or normalise:
        # a ones column makes the weights' row sum fall out of the same matmul as the values
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    # without gradients the score tile is updated in place, saving a pass and an allocation
    inplace = not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    )
    offset = nk - nq
    out_tiles = []
    for q0 in range(0, nq, block_q):
        q1 = min(q0 + block_q, nq)
        qs = slice(q0, q1)
        q_tile = q_scaled[:, :, qs]
        last_key = nk if not causal else min(nk, q1 + offset)
        acc = q_scaled.new_zeros(b, hq, q1 - q0, v.shape[-1])
        row_max = q_scaled.new_full((b, hq, q1 - q0, 1), float("-inf"))
        for k0 in range(0, max(last_key, 0), block_k):
            k1 = min(k0 + block_k, last_key)
            ks = slice(k0, k1)
            scores = q_tile @ k[:, :, ks].transpose(-1, -2)
            if score_mod is not None:
                scores = score_mod(scores, qs, ks)
            allowed = slice_mask(mask, qs, ks)
            if causal and k1 - 1 > q0 + offset:
                # query q0+i sees key k0+j when k0+j <= q0+i+offset
                tile_causal = _shifted_causal(q1 - q0, k1 - k0, q0 + offset - k0, q.device)
                allowed = tile_causal if allowed is None else allowed & tile_causal
            if softmax:
                if allowed is not None and inplace:
                    scores.masked_fill_(~allowed, float("-inf"))
                elif allowed is not None:
                    scores = scores.masked_fill(~allowed, float("-inf"))
                new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
                safe_max = new_max.masked_fill(torch.isinf(new_max), 0.0)
                probs = scores.sub_(safe_max).exp_() if inplace else torch.exp(scores - safe_max)
                acc = acc * torch.exp(row_max - safe_max) + probs @ v[:, :, ks]
                row_max = new_max
            else:
                w = weight(scores)
                if allowed is not None:
                    w = w.masked_fill(~allowed, 0.0)
                acc = acc + w @ v[:, :, ks]
        if softmax or normalise:
            row_sum = acc[..., dv:]
            acc = divide_or_zero(acc[..., :dv], row_sum)
        out_tiles.append(acc)
    return torch.cat(out_tiles, dim=2).to(q.dtype)


def _shifted_causal(tq: int, tk: int, diag: int, device) -> torch.Tensor:
    """Bool [tq, tk]: row i may see column j when j <= i + diag."""
    rows = torch.arange(tq, device=device).unsqueeze(1)
    cols = torch.arange(tk, device=device).unsqueeze(0)
    return cols <= rows + diag
