"""The plain-PyTorch block-sparse path (:func:`torch_block_attention`): trainable on
every device, and the faster inference path on CPU."""

from __future__ import annotations

import torch

from . import sizes
from .autograd import BlockPieces, grad_pieces
from .bands import BandSplit, band_runs, sliding_start
from .layout import BlockLayout, additive_bias
from .pieces import lse_kernel, lse_merge, pad_to, piece_keys


def torch_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse softmax attention in plain PyTorch (the trainable path).

    For a chunk of query blocks, the listed key and value blocks are gathered
    into [B, H, c, S*block, D] and each query block attends its gathered keys
    with ``scaled_dot_product_attention`` (batched matmul with an online
    softmax, fused; it has a backward on every device), the token mask and
    the user's mask entering as an additive -inf bias. Rows that see nothing
    give zeros. Half precision accumulates in float32 inside the kernel.

    Where every query block of a run has the same token mask, one
    [bq, S*bk] bias serves them all. Without gradients the results are
    written into one preallocated output, and gathers are cut into pieces
    of about ``sizes.GATHER_BYTES``, small enough for the allocator to reuse (a
    fresh large buffer is page-faulted on first touch). With gradients on CPU
    (no user mask, equal key and value widths) :class:`BlockPieces` computes
    it: the fused flash kernel's forward and backward per piece, whose key and
    value gradients it adds back into their blocks (autograd's backward of the
    overlapping band views is several times slower than the attention's).
    """
    b, hq, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    bs, nqb, nkb = layout.block, layout.q_blocks, layout.k_blocks
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and mask is None and lse_kernel(q, k, v):
        forward, backward = grad_pieces(layout, b, hq, hkv, k.shape[-1], q.dtype)
        return BlockPieces.apply(q, k, v, forward, backward, bs, scale)
    qb = pad_to(q, nqb * bs).unflatten(2, (nqb, bs))
    kb = pad_to(k, nkb * bs).unflatten(2, (nkb, bs))
    vb = pad_to(v, nkb * bs).unflatten(2, (nkb, bs))
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    hi = (torch.arange(hq, device=q.device) // (hq // hkv)).view(1, hq, 1, 1)
    out = None if grad else q.new_empty(b, hq, nqb, bs, dv)
    outs = []
    row_bytes = b * hq * bs * (k.shape[-1] + dv) * k.element_size()
    lse = out is not None and mask is None and hq == hkv and lse_kernel(q, k, v)
    if lse:
        runs = band_runs(layout, b * hq, q.dtype, sizes.FUSED_MIN_ELEMENTS)
    else:
        runs = layout.runs(b * hq)
    for run in runs:
        r0, r1, used = run.c0, run.c1, run.used
        plain = run.plain and mask is None
        if run.band is not None:
            if kb.stride()[2:] != (bs * kb.shape[-1], kb.shape[-1], 1):
                kb = kb.contiguous()
            if vb.stride()[2:] != (bs * dv, dv, 1):
                vb = vb.contiguous()
            rows = (bi * hkv + hi) * nkb
            _band_and_extras(qb, kb, vb, out, r0, r1, run.band, rows, row_bytes, scale)
            continue
        start = sliding_start(layout, r0, r1, used) if hq == hkv else None
        step = r1 - r0
        if start is None and out is not None:
            # gathered pieces only without gradients: with them autograd keeps every piece
            step = max(1, sizes.GATHER_BYTES // (row_bytes * used))
        shared = None
        if not plain and mask is None:
            shared = layout.shared_bias(r0, r1, used, q.dtype)
        for c0 in range(r0, r1, step):
            c1 = min(c0 + step, r1)
            rows, s0 = None, None
            if start is None:
                # one row index per gathered block: index_select copies whole blocks
                rows = ((bi * hkv + hi) * nkb + layout.kv_indices[:, :, c0:c1, :used]).flatten()
            else:
                # query block c0 + i visits key blocks start + i ... start + i + used - 1:
                # overlapping strided views of k and v, no copy
                s0 = start + c0 - r0
            kg, vg = piece_keys(kb, vb, c0, c1, s0, rows, used, b * hq)  # [B·H, c, used·bs, D]
            keys = slice(0, used * bs)
            bias, seen = None, None
            if not plain:
                if shared is not None:
                    bias = shared
                elif mask is None:
                    run_bias, run_seen = layout.run_bias(r0, r1, used, q.dtype)
                    bias = run_bias[:, :, c0 - r0 : c1 - r0]
                    seen = None if run.seen else run_seen[:, :, c0 - r0 : c1 - r0]
                else:
                    qpos, kpos = layout.positions(c0, c1)
                    user = _user_mask_at(mask, qpos, kpos[..., keys], nq, nk)
                    allowed = layout.allowed()[:, :, c0:c1, :, keys] & user
                    bias, seen = additive_bias(allowed, q.dtype)
                if bias.dim() == 5:
                    bias = bias.expand(b, hq, -1, -1, -1).flatten(0, 1)
            qc = qb[:, :, c0:c1].flatten(0, 1)
            o = _attend(qc, kg, vg, bias, scale).unflatten(0, (b, hq))
            if seen is not None:
                o = o * seen.to(o.dtype)
            if out is None:
                outs.append(o)
            else:
                out[:, :, c0:c1].copy_(o)
    if out is None:
        out = torch.cat(outs, dim=2)
    return out.view(b, hq, nqb * bs, dv)[:, :, :nq]


def _user_mask_at(mask: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, nq: int, nk: int):
    """The user's [B|1, H|1, Nq|1, Nk|1] mask at gathered positions (b, h, q, k)."""
    bm, hm, qm, km = mask.shape
    b = torch.arange(bm, device=mask.device).view(bm, 1, 1, 1, 1)
    h = torch.arange(hm, device=mask.device).view(1, hm, 1, 1, 1)
    q = qpos.clamp(max=nq - 1) if qm > 1 else torch.zeros_like(qpos)
    k = kpos.clamp(max=nk - 1) if km > 1 else torch.zeros_like(kpos)
    return mask[b, h, q, k]


def _band_and_extras(qb, kb, vb, out, r0, r1, band: BandSplit, rows, row_bytes, scale):
    """Query blocks r0..r1 of a run that :func:`band_split` splits (no autograd).

    The band is read in place through a sliding view, about ``sizes.BAND_BYTES`` of
    band output per call; the further blocks, all fully visible, are gathered
    in pieces of about ``sizes.BAND_GATHER_BYTES`` and attended without a mask (but
    for the padding slots of rows with fewer of them). The two partial softmaxes
    are merged by their log-sum-exps into ``out``:
    o = o_x + (o_band - o_x)·sigmoid(lse_band - lse_x).
    """
    extra, extra_bias = band.extra, band.extra_bias
    b, hq, _, bs, d = qb.shape
    used = extra.shape[-1]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    band_step = max(1, sizes.BAND_BYTES // (b * hq * bs * d * qb.element_size()))
    step = max(1, sizes.BAND_GATHER_BYTES // (row_bytes * max(used, 1)))
    for p0 in range(r0, r1, band_step):
        p1 = min(p0 + band_step, r1)
        keys = piece_keys(kb, vb, p0, p1, band.first + p0 - r0, None, band.width, b * hq)
        qp = qb[:, :, p0:p1].flatten(0, 1)
        ob, lb = flash(qp, *keys, attn_mask=band.bias, scale=scale)
        if used == 0:
            out[:, :, p0:p1].copy_(ob.unflatten(0, (b, hq)))
            continue
        for c0 in range(p0, p1, step):
            c1 = min(c0 + step, p1)
            ids = (rows + extra[:, :, c0 - r0 : c1 - r0]).flatten()
            kg, vg = piece_keys(kb, vb, c0, c1, None, ids, used, b * hq)
            hide = None
            if extra_bias is not None:
                hide = extra_bias[:, :, c0 - r0 : c1 - r0].expand(b, hq, -1, -1, -1).flatten(0, 1)
            ox, lx = flash(qp[:, c0 - p0 : c1 - p0], kg, vg, attn_mask=hide, scale=scale)
            cut = slice(c0 - p0, c1 - p0)
            lse_merge(ob[:, cut], lb[:, cut], ox, lx, out=out[:, :, c0:c1].flatten(0, 1))


def _attend(q, k, v, bias, scale):
    """Softmax attention of query blocks over their gathered keys, [X, c, bq, *] each.

    Large chunks go to the fused ``scaled_dot_product_attention`` (matmul and
    online softmax in one kernel; (B, H) x query block act as its batch x
    heads). Small ones use explicit matmuls and a max-shifted exponential:
    the fused kernel's parallel region costs more than the work there.
    ``bias`` never leaves a row all -inf (see :func:`additive_bias`).
    """
    if q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] >= sizes.FUSED_MIN_ELEMENTS:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=scale
        )
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = (q @ k.transpose(-1, -2)).to(acc) * scale
    if bias is not None:
        s = s + bias
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return ((p.to(v.dtype) @ v).to(acc) / p.sum(dim=-1, keepdim=True)).to(q.dtype)
