"""Shared pieces of the routed sparse mechanisms (moba, nsa, routing, topk, ...).

- :func:`pool_blocks`: mean-pooled block summaries of keys, queries or values.
- :func:`token_block_attention`: softmax attention where every query picks its
  own key blocks (MoBA's and NSA's per-token gating). The (query, block)
  choices are grouped by key block, so each group is one dense matmul; the
  partial softmaxes of a query's blocks are merged by log-sum-exp. Plain
  PyTorch and trainable; no N x N tensor is built.
- :func:`masked_tiled_attention`: the shared tiled online-softmax kernel with
  a token rule computed tile by tile (routing clusters, DHSA chunk masks):
  exact about what it keeps, O(tile) memory, but it visits every tile.
- :func:`band_attention`: causal or symmetric sliding-window attention by
  query blocks (NSA's sliding branch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnlab.core.masks import repeat_kv, slice_mask
from attnlab.core.tiled import tiled_attention

NEG_INF = float("-inf")
# dtypes of the fused CPU flash kernel used by the inference path
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half precision, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def pad_seq(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad dim 2 of [B, H, N, D] up to ``n``."""
    if x.shape[2] == n:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` positions: [B, H, N, D] -> [B, H, ceil(N/block), D].

    The last, partial block is averaged over the positions it has.
    """
    n = x.shape[2]
    nb = -(-n // block)
    counts = torch.full((nb,), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = n - (nb - 1) * block
    summed = pad_seq(x, nb * block).unflatten(2, (nb, block)).sum(dim=3)
    return summed / counts[:, None]


def user_mask_at(mask, b, h, qpos, kpos, nq, nk):
    """The user's [B|1, H|1, Nq|1, Nk|1] mask read at broadcast index tensors."""
    bm, hm, qm, km = mask.shape
    return mask[
        b if bm > 1 else 0,
        h if hm > 1 else 0,
        qpos.clamp(0, nq - 1) if qm > 1 else 0,
        kpos.clamp(0, nk - 1) if km > 1 else 0,
    ]


def token_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    *,
    block: int,
    scale: float,
    causal: bool,
    mask: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Softmax attention of each query over its own selected key blocks.

    ``q`` [B, H, Nq, D], ``k``/``v`` [B, Hkv, Nk, *], ``sel`` long [B, H, Nq, S]:
    key block indices (blocks of ``block`` keys) per query, -1 for an empty
    slot, no duplicates. Inside the blocks the causal rule (bottom-right) and
    the user's mask apply. Rows that see nothing give zeros. Returns the
    output [B, H, Nq, Dv] in the accumulation dtype.

    The (query, block) choices are grouped by (head, key block): each group
    is one dense [queries, D] x [D, block] matmul on the block itself (no
    copy of keys), with the token mask only in groups whose block is not
    wholly visible to its queries. Each query's partial softmaxes are then
    merged by log-sum-exp. With ``fused`` and no gradients on CPU, each group
    runs in torch's fused flash kernel (``_scaled_dot_product_flash_attention_for_cpu``,
    which also returns the log-sum-exp); otherwise in plain, trainable ops.
    """
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    hkv = k.shape[1]
    groups = h // hkv
    acc = acc_dtype(q.dtype)
    nkb = -(-nk // block)
    offset = nk - nq
    dev = q.device
    # membership [B*H, nkb, 2, Nq]: query qi chose block j, needing the token mask or not;
    # its nonzero entries come out sorted by (head, block, needs-mask, query)
    valid = sel >= 0
    blk = sel.clamp_min(0)
    qi = torch.arange(nq, device=dev).view(1, 1, nq, 1)
    # the token rule is needed only where a block is not wholly visible to the query
    # (under the causal rule a query's own block is masked whole, so that in
    # self-attention its group is the block's own queries: one causal square)
    needs = torch.zeros_like(valid)
    if causal:
        needs = (blk + 1) * block > qi + offset
    if mask is not None:
        needs = torch.ones_like(valid)
    member = torch.zeros(b * h, nkb + 1, 2, nq, dtype=torch.bool, device=dev)
    bh = torch.arange(b * h, device=dev).view(b, h, 1, 1)
    member[bh, torch.where(valid, blk, nkb), needs.long(), qi] = True
    member = member[:, :nkb]
    counts = member.sum(dim=-1).flatten().tolist()  # per group (head, block, needs)
    rows_sorted = torch.nonzero(member.flatten(0, 2), as_tuple=True)
    g_rows = rows_sorted[1] + (rows_sorted[0] // (nkb * 2)) * nq  # rows of [B*H*Nq]
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    fused = fused and not grad and q.dtype in FUSED_DTYPES and dev.type == "cpu" and dv == d
    q_flat = (q if fused else q * scale).reshape(b * h * nq, d)
    kb = pad_seq(k, nkb * block).unflatten(2, (nkb, block))
    vb = pad_seq(v, nkb * block).unflatten(2, (nkb, block))
    ar = torch.arange(block, device=dev)
    lses, os_, rows_all = [], [], []
    for g, rows in enumerate(torch.split(g_rows, counts)):
        if rows.numel() == 0:
            continue
        head, rest = divmod(g, nkb * 2)
        j, masked = divmod(rest, 2)
        bi, hi = divmod(head, h)
        length = min(block, nk - j * block)
        kj = kb[bi, hi // groups, j, :length]
        vj = vb[bi, hi // groups, j, :length]
        allowed = None
        square = False  # the group is exactly the block's own queries under the causal rule
        if masked:
            qpos = (rows - head * nq)[:, None]
            first = int(qpos[0]) + offset
            square = (
                mask is None
                and rows.numel() == length
                and first == j * block
                and int(qpos[-1]) - int(qpos[0]) == length - 1
            )
            if not square:
                kpos = j * block + ar[:length]
                allowed = torch.ones(rows.numel(), length, dtype=torch.bool, device=dev)
                if causal:
                    allowed = allowed & (kpos <= qpos + offset)
                if mask is not None:
                    allowed = allowed & user_mask_at(mask, bi, hi, qpos, kpos, nq, nk)
        qg = q_flat.index_select(0, rows)
        if fused:
            # one fused kernel per group; it returns the log-sum-exp of each row
            bias = None
            if allowed is not None:
                bias = torch.zeros(allowed.shape, dtype=q.dtype, device=dev)
                bias = bias.masked_fill_(~allowed, NEG_INF)[None, None]
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qg[None, None],
                kj[None, None],
                vj[None, None],
                0.0,
                square,
                attn_mask=bias,
                scale=scale,
            )
            o, lse = o[0, 0].to(acc), lse[0, 0].to(acc)
            if allowed is not None:
                lse = lse.masked_fill(~allowed.any(dim=-1), NEG_INF)
        else:
            sc = (qg @ kj.transpose(0, 1)).to(acc)
            if square:
                allowed = ar[:length, None] >= ar[None, :length]
            if allowed is not None:
                sc = sc.masked_fill(~allowed, NEG_INF)
            m = sc.amax(dim=-1, keepdim=True)
            p = torch.exp(sc - m.masked_fill(torch.isinf(m), 0.0))
            total = p.sum(dim=-1, keepdim=True)
            o = (p.to(v.dtype) @ vj).to(acc) / total.clamp_min(torch.finfo(acc).tiny)
            lse = (m + torch.log(total)).squeeze(-1)  # -inf where nothing is allowed
        lses.append(lse)
        os_.append(o)
        rows_all.append(rows)
    out = torch.zeros(b * h * nq, dv, dtype=acc, device=dev)
    if not rows_all:
        return out.view(b, h, nq, dv)
    # merge the (normalised) partial results of each query by their log-sum-exp
    rows, lse = torch.cat(rows_all), torch.cat(lses)
    top = torch.full((b * h * nq,), NEG_INF, dtype=acc, device=dev)
    top = top.scatter_reduce(0, rows, lse.detach(), reduce="amax")
    top = top.masked_fill(torch.isinf(top), 0.0)
    w = torch.exp(lse - top[rows])  # 0 where a part saw nothing
    den = torch.zeros(b * h * nq, dtype=acc, device=dev).index_add(0, rows, w)
    if grad:
        out = out.index_add(0, rows, w[:, None] * torch.cat(os_))
    else:  # in place, group by group: no copy of all partial outputs
        parts = torch.split(w, [r.numel() for r in rows_all])
        for rows_g, o_g, w_g in zip(rows_all, os_, parts, strict=True):
            out.index_add_(0, rows_g, o_g.mul_(w_g[:, None]))
    out = torch.where(den[:, None] > 0, out / den.clamp_min(torch.finfo(acc).tiny)[:, None], 0.0)
    return out.view(b, h, nq, dv)


AllowedFn = Callable[[slice, slice], torch.Tensor]


def masked_tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: AllowedFn,
    *,
    scale: float,
    causal: bool,
    mask: torch.Tensor | None,
    block_q: int = 256,
    block_k: int = 512,
) -> torch.Tensor:
    """Softmax attention restricted by a token rule evaluated tile by tile.

    ``allowed(q_slice, k_slice)`` returns a bool tensor broadcastable to
    [B, H, tq, tk]. Runs on :func:`attnlab.core.tiled.tiled_attention`, so
    memory stays O(block_q * block_k) per head and autograd gives the backward.
    """

    def score_mod(scores, qs, ks):
        return scores.masked_fill(~allowed(qs, ks), NEG_INF)

    return tiled_attention(
        q,
        k,
        v,
        scale=scale,
        causal=causal,
        mask=mask,
        score_mod=score_mod,
        block_q=block_q,
        block_k=block_k,
    )


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float,
    causal: bool,
    mask: torch.Tensor | None = None,
    block: int = 128,
) -> torch.Tensor:
    """Sliding-window softmax attention: query i (aligned at p = i + Nk - Nq) sees keys
    ``p - window < j <= p`` when causal, ``|j - p| < window`` otherwise.

    Each query block gathers the band of keys it can reach, [block + 2*window]
    at most, so cost and memory are O(N * (block + window)).
    """
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    groups = h // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    offset = nk - nq
    acc = acc_dtype(q.dtype)
    outs = []
    for q0 in range(0, nq, block):
        q1 = min(q0 + block, nq)
        lo = max(0, q0 + offset - window + 1)
        hi = min(nk, q1 + offset + (1 if causal else window))
        if hi <= lo:
            outs.append(q.new_zeros(b, h, q1 - q0, v.shape[-1], dtype=acc))
            continue
        s = (q[:, :, q0:q1] @ k[:, :, lo:hi].transpose(-1, -2)).to(acc) * scale
        qpos = torch.arange(q0, q1, device=q.device)[:, None] + offset
        kpos = torch.arange(lo, hi, device=q.device)[None, :]
        ok = kpos > qpos - window
        ok = ok & (kpos <= qpos) if causal else ok & (kpos < qpos + window)
        user = slice_mask(mask, slice(q0, q1), slice(lo, hi))
        if user is not None:
            ok = ok & user
        s = s.masked_fill(~ok, NEG_INF)
        outs.append(softmax_rows(s) @ v[:, :, lo:hi].to(acc))
    return torch.cat(outs, dim=2)


def softmax_rows(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where a row of all -inf gives zeros (not NaN)."""
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(torch.isinf(m), 0.0)
    p = torch.exp(s - m)
    total = p.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), 0.0)
