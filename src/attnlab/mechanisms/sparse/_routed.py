"""Shared pieces of the routed sparse mechanisms (moba, nsa, routing, topk, ...).

- :func:`pool_blocks`: mean-pooled block summaries of keys, queries or values.
- :func:`token_block_attention`: softmax attention where every query picks its
  own key blocks (MoBA's and NSA's per-token gating). The (query, block)
  choices are sorted by key block into tiles that share one block, all run
  as one batch; the partial softmaxes of a query's blocks are merged by
  log-sum-exp. Plain PyTorch and trainable; no N x N tensor is built.
- :func:`masked_tiled_attention`: the shared tiled online-softmax kernel with
  a token rule computed tile by tile (routing clusters, DHSA chunk masks):
  exact about what it keeps, O(tile) memory, but it visits every tile.
- :func:`band_attention`: causal or symmetric sliding-window attention by
  query blocks (NSA's sliding branch).
- :func:`visible_blocks`, :func:`causal_rule`: the block-level and token-level
  bottom-right causal rules of the block-routed mechanisms (sparge, pyramid).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnlab.core.masks import divide_or_zero, repeat_kv, slice_mask
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


def visible_blocks(nq: int, nk: int, block: int, device=None) -> torch.Tensor:
    """Bool [nqb, nkb]: key blocks holding a key that some query of the block may see
    under the bottom-right causal rule (query i sees keys j <= i + Nk - Nq)."""
    nqb, nkb = -(-nq // block), -(-nk // block)
    last = torch.clamp(torch.arange(1, nqb + 1, device=device) * block, max=nq) - 1 + (nk - nq)
    return torch.arange(nkb, device=device) * block <= last[:, None]


def causal_rule(nq: int, nk: int):
    """The bottom-right causal mask_mod: query i sees keys j <= i + Nk - Nq."""
    offset = nk - nq

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return mask_mod


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

    The (query, block) choices are sorted by (head, key block, needs a token
    mask) and cut into tiles of ``block`` queries that share one key block;
    all tiles run as one batch (a tile is a [block, D] x [D, block] product),
    the token mask only on tiles whose block is not wholly visible to their
    queries. Each query's partial softmaxes are merged by log-sum-exp. With
    ``fused`` on CPU in float32/float64 (Dv = D) the batch runs in torch's
    fused flash kernel (``_scaled_dot_product_flash_attention_for_cpu``, which
    also returns the log-sum-exp) with its own backward (:class:`_FusedTiles`);
    otherwise in plain ops that autograd differentiates.
    """
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    hkv = k.shape[1]
    groups = h // hkv
    acc = acc_dtype(q.dtype)
    nkb = -(-nk // block)
    offset = nk - nq
    dev = q.device
    tile = block
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    fused = fused and q.dtype in FUSED_DTYPES and dev.type == "cpu" and dv == d
    # membership [B*H, nkb, 2, Nq]: query qi chose block j, needing the token mask or not;
    # its nonzero entries come out sorted by (head, block, needs-mask, query)
    valid = sel >= 0
    blk = sel.clamp_min(0)
    qi = torch.arange(nq, device=dev).view(1, 1, nq, 1)
    if causal:  # a block wholly in the future adds nothing
        valid = valid & (blk * block <= qi + offset)
    # under the causal rule a query's own block is masked whole, so that in
    # self-attention its tile is the block's own queries: one causal square
    needs = torch.zeros_like(valid)
    if causal:
        needs = (blk + 1) * block > qi + offset
    if mask is not None:
        needs = torch.ones_like(valid)
    member = torch.zeros(b * h, nkb + 1, 2, nq, dtype=torch.bool, device=dev)
    bh = torch.arange(b * h, device=dev).view(b, h, 1, 1)
    member[bh, torch.where(valid, blk, nkb), needs.long(), qi] = True
    member = member[:, :nkb].reshape(b * h * nkb * 2, nq)
    counts = member.sum(dim=-1)  # per group (head, block, needs)
    group, g_q = torch.nonzero(member, as_tuple=True)
    tiles_per = (counts + tile - 1) // tile
    tile_start = torch.cumsum(tiles_per, 0) - tiles_per
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.numel(), device=dev) - group_start[group]
    tile_id = tile_start[group] + rank // tile
    n_tiles = int(tiles_per.sum())
    if n_tiles == 0:
        return torch.zeros(b, h, nq, dv, dtype=acc, device=dev)
    tile_group = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), tiles_per)
    tile_masked = (tile_group % 2).bool()
    tile_bh, tile_blk = (tile_group // 2) // nkb, (tile_group // 2) % nkb
    dummy = b * h * nq  # the row that empty slots read (zeros) and write
    slot_q = torch.full((n_tiles, tile), -1, dtype=torch.long, device=dev)
    slot_q[tile_id, rank % tile] = g_q
    q_rows = torch.where(slot_q >= 0, tile_bh[:, None] * nq + slot_q, dummy)
    kb = pad_seq(k, nkb * block).reshape(b * hkv * nkb, block, d)
    vb = pad_seq(v, nkb * block).reshape(b * hkv * nkb, block, dv)
    # every masked tile is a block's own queries in order: one aligned causal square
    square = causal and mask is None and nq == nk
    ar = torch.arange(block, device=dev)
    parts = []
    for masked in (False, True):
        ids = torch.nonzero(tile_masked == masked, as_tuple=True)[0]
        if ids.numel() == 0:
            continue
        t_bh, t_blk, t_q, t_rows = tile_bh[ids], tile_blk[ids], slot_q[ids], q_rows[ids]
        causal_square = (
            masked and square and bool(((t_q == t_blk[:, None] * block + ar) | (t_q < 0)).all())
        )
        # every block's own tile in (head, block) order: the blocks themselves, no gather
        direct = causal_square and ids.numel() == b * h * nkb and groups == 1 and nq % block == 0
        kv_row = ((t_bh // h) * hkv + (t_bh % h) // groups) * nkb + t_blk
        allowed = None
        if not masked and nk % block:
            allowed = (t_blk[:, None, None] * block + ar < nk).expand(-1, tile, -1)
        if masked and not square:
            kpos = t_blk[:, None, None] * block + ar  # [T, 1, block]
            qpos = t_q[:, :, None]
            allowed = (kpos < nk) & (kpos <= qpos + offset if causal else True)
            if mask is not None:
                bi, hi = (t_bh // h)[:, None, None], (t_bh % h)[:, None, None]
                allowed = allowed & user_mask_at(mask, bi, hi, qpos, kpos, nq, nk)
            allowed = allowed.expand(-1, tile, -1)
        if masked and square and not causal_square:
            kpos = t_blk[:, None, None] * block + ar
            allowed = ((kpos < nk) & (kpos <= t_q[:, :, None])).expand(-1, tile, -1)
        parts.append(
            {
                "rows": t_rows,
                "kv_row": kv_row,
                "allowed": allowed,
                "causal": causal_square,
                "direct": direct,
            }
        )
    q_flat = torch.cat([q.reshape(b * h * nq, d), q.new_zeros(1, d)])
    if fused and q.dtype in (torch.float32, torch.float64):
        for part in parts:
            allowed = part["allowed"]
            part["bias"] = None
            if allowed is not None:
                bias = torch.zeros(allowed.shape, dtype=q.dtype, device=dev)
                part["bias"] = bias.masked_fill_(~allowed, NEG_INF)[:, None]
        out = _FusedTiles.apply(q_flat, kb, vb, parts, scale)
        return out[:dummy].view(b, h, nq, dv)
    lses, os_, rows_all = [], [], []
    for part in parts:
        qt, kt, vt = _part_inputs(q_flat, kb, vb, part)
        allowed = part["allowed"]
        if part["causal"]:
            allowed = (ar[:, None] >= ar[None, :]).expand(qt.shape[0], -1, -1)
        sc = (qt @ kt.transpose(-1, -2)).to(acc) * scale
        if allowed is not None:
            sc = sc.masked_fill(~allowed, NEG_INF)
        m = sc.amax(dim=-1, keepdim=True)
        p = torch.exp(sc - m.masked_fill(torch.isinf(m), 0.0))
        total = p.sum(dim=-1, keepdim=True)
        o = (p.to(v.dtype) @ vt).to(acc) / total.clamp_min(torch.finfo(acc).tiny)
        lses.append((m + torch.log(total)).flatten())  # -inf where nothing is allowed
        os_.append(o.flatten(0, 1))
        rows_all.append(part["rows"].flatten())
    out, _ = _merge(torch.cat(rows_all), torch.cat(lses), os_, dummy + 1, dv, acc, grad)
    return out[:dummy].view(b, h, nq, dv)


def _part_inputs(q_flat, kb, vb, part):
    """The query, key and value tiles of one partition: [T, tile, D], [T, block, D] x 2."""
    rows = part["rows"]
    if part["direct"]:
        return q_flat[:-1].view(-1, kb.shape[1], kb.shape[2]), kb, vb
    qt = q_flat.index_select(0, rows.flatten()).view(*rows.shape, q_flat.shape[-1])
    return qt, kb.index_select(0, part["kv_row"]), vb.index_select(0, part["kv_row"])


def _merge(rows, lse, os_, n_rows, dv, acc, grad):
    """Merge normalised partial outputs by log-sum-exp: the output [R, Dv] and its LSE [R]."""
    dev = rows.device
    lse = lse.masked_fill(rows == n_rows - 1, NEG_INF)  # the dummy row
    top = torch.full((n_rows,), NEG_INF, dtype=acc, device=dev)
    top = top.scatter_reduce(0, rows, lse.detach(), reduce="amax")
    top = top.masked_fill(torch.isinf(top), 0.0)
    w = torch.exp(lse - top[rows])  # 0 where a part saw nothing
    den = torch.zeros(n_rows, dtype=acc, device=dev).index_add(0, rows, w)
    out = torch.zeros(n_rows, dv, dtype=acc, device=dev)
    if grad:
        out = out.index_add(0, rows, w[:, None] * torch.cat(os_))
    else:
        out.index_add_(0, rows, torch.cat(os_).mul_(w[:, None]))
    seen = den > 0
    out = torch.where(seen[:, None], out / den.clamp_min(torch.finfo(acc).tiny)[:, None], 0.0)
    total = torch.where(seen, top + torch.log(den.clamp_min(torch.finfo(acc).tiny)), NEG_INF)
    return out, total


class _FusedTiles(torch.autograd.Function):
    """The tiles in torch's fused CPU flash kernel, forward and backward.

    Forward runs each partition's tiles in one call and merges the partial
    results by log-sum-exp. Backward calls the kernel's own backward per
    partition with the merged output and log-sum-exp: the probabilities it
    recomputes, exp(s - LSE), are then those of the whole softmax over the
    query's selected keys, so the per-tile gradients add up to the exact one.
    """

    @staticmethod
    def forward(ctx, q_flat, kb, vb, parts, scale):
        lses, os_, rows_all = [], [], []
        for part in parts:
            qt, kt, vt = _part_inputs(q_flat, kb, vb, part)
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qt[:, None],
                kt[:, None],
                vt[:, None],
                0.0,
                part["causal"],
                attn_mask=part["bias"],
                scale=scale,
            )
            lse = lse[:, 0]
            if part["allowed"] is not None:
                lse = lse.masked_fill(~part["allowed"].any(dim=-1), NEG_INF)
            lses.append(lse.flatten())
            os_.append(o[:, 0].flatten(0, 1))
            rows_all.append(part["rows"].flatten())
        rows = torch.cat(rows_all)
        out, total = _merge(
            rows, torch.cat(lses), os_, q_flat.shape[0], vb.shape[-1], q_flat.dtype, False
        )
        ctx.save_for_backward(q_flat, kb, vb, out, total)
        ctx.parts, ctx.scale = parts, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_flat, kb, vb, out, total = ctx.saved_tensors
        # rows that saw nothing: an infinite LSE makes every probability zero
        total = total.masked_fill(torch.isinf(total), float("inf"))
        dq, dk, dv = torch.zeros_like(q_flat), torch.zeros_like(kb), torch.zeros_like(vb)
        grad_out = grad_out.contiguous()
        for part in ctx.parts:
            qt, kt, vt = _part_inputs(q_flat, kb, vb, part)
            rows = part["rows"]
            dqt, dkt, dvt = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[rows][:, None],
                qt[:, None],
                kt[:, None],
                vt[:, None],
                out[rows][:, None],
                total[rows][:, None],
                0.0,
                part["causal"],
                attn_mask=part["bias"],
                scale=ctx.scale,
            )
            if part["direct"]:
                dq[:-1] += dqt.reshape(-1, dq.shape[-1])
                dk += dkt[:, 0]
                dv += dvt[:, 0]
            else:
                dq.index_add_(0, rows.flatten(), dqt[:, 0].flatten(0, 1))
                dk.index_add_(0, part["kv_row"], dkt[:, 0])
                dv.index_add_(0, part["kv_row"], dvt[:, 0])
        return dq, dk, dv, None, None


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
    return divide_or_zero(p, total)
