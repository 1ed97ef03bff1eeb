"""The trainable block-sparse path on CPU: planned pieces, each computed by the fused
flash kernel's forward and backward (:class:`BlockPieces`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import sizes
from .bands import BandSplit, band_runs, sliding_start
from .layout import BlockLayout
from .pieces import blocked, lse_merge, piece_keys


@dataclass(frozen=True, eq=False)
class Segment:
    """Query blocks ``c0`` .. ``c1`` - 1 planned alike: a band split (``band``), a
    sliding band from key block ``start`` (joined over runs that continue each other),
    or gathered blocks; ``used`` slots, ``plain`` (no mask), ``seen`` (every query
    sees a key), ``shared``: one bias for every query block (None: none or per run)."""

    c0: int
    c1: int
    start: int | None
    used: int
    plain: bool
    shared: torch.Tensor | None
    seen: bool
    band: BandSplit | None


@dataclass(frozen=True, eq=False)
class Part:
    """Keys of a piece: the sliding band of ``used`` blocks from key block ``start`` + i
    for query block c0 + i (a strided view, no copy), or, where ``start`` is None, the
    blocks ``rows`` of the flattened [B·Hkv·Nk/bk] key blocks (gathered, ``used`` per
    query block); ``bias``: the part's additive token mask (None: all visible)."""

    start: int | None
    rows: torch.Tensor | None
    used: int
    bias: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class Piece:
    """Query blocks ``c0`` .. ``c1`` - 1 attending ``parts`` (one, or a band and further
    blocks merged by log-sum-exp); ``seen`` [B·H | 1, c, bq, 1] zeroes the queries that
    see nothing (None: all see a key)."""

    c0: int
    c1: int
    parts: tuple[Part, ...]
    seen: torch.Tensor | None


def grad_pieces(layout: BlockLayout, b: int, hq: int, hkv: int, d: int, dtype: torch.dtype):
    """(forward, backward): the :class:`Piece` lists :class:`BlockPieces` computes a
    layout in (cached).

    A run that is a sliding band (and shares no key heads) is read through sliding
    views; consecutive such runs that continue each other under the same shared
    mask are joined. A run that :func:`band_split` splits is a band read in place
    plus gathered further blocks (two parts merged by their log-sum-exps). Other runs
    gather their blocks, with the run's token mask as a bias. Forward pieces hold
    about ``sizes.BAND_BYTES`` of band output and ``sizes.GATHER_BYTES`` of gathered
    keys and values; backward pieces about ``sizes.GRAD_BYTES`` of keys and values, as
    large as the key and value gradients the kernel returns per piece (smaller pieces
    are faster in the backward, larger ones in the forward).
    """
    band_bytes, gather_bytes, grad_bytes = sizes.BAND_BYTES, sizes.GATHER_BYTES, sizes.GRAD_BYTES

    def make():
        device = layout.kv_indices.device
        bs, nkb = layout.block, layout.k_blocks
        bi = torch.arange(b, device=device).view(b, 1, 1, 1)
        hi = (torch.arange(hq, device=device) // (hq // hkv)).view(1, hq, 1, 1)
        per_block = b * hq * bs * d * torch.empty((), dtype=dtype).element_size()

        def gathered(idx):
            return ((bi * hkv + hi) * nkb + idx).flatten()

        runs = band_runs(layout, b * hq, dtype) if hq == hkv else layout.runs(b * hq)
        segments: list[Segment] = []
        for run in runs:
            r0, r1, used, plain = run.c0, run.c1, run.used, run.plain
            start = None
            if run.band is None and hq == hkv:
                start = sliding_start(layout, r0, r1, used)
            shared = None
            if not plain and run.band is None:
                shared = layout.shared_bias(r0, r1, used, dtype)
            if segments and start is not None and (plain or shared is not None):
                prev = segments[-1]
                if (
                    prev.start is not None
                    and prev.used == used
                    and prev.start + prev.c1 - prev.c0 == start
                    and prev.plain == plain
                    and (plain or (prev.shared is not None and torch.equal(prev.shared, shared)))
                ):
                    segments[-1] = Segment(
                        prev.c0, r1, prev.start, used, plain, prev.shared, True, None
                    )
                    continue
            segments.append(Segment(r0, r1, start, used, plain, shared, run.seen, run.band))

        def cut(band_bytes, kv_bytes) -> list[Piece]:
            pieces = []
            for seg in segments:
                r0, r1, used, split = seg.c0, seg.c1, seg.used, seg.band
                if split is not None:
                    e = split.extra.shape[-1]
                    if band_bytes:
                        step = min(band_bytes // per_block, kv_bytes // (2 * per_block * max(e, 1)))
                    else:
                        step = kv_bytes // (2 * per_block * (split.width + e))
                    step = max(1, step)
                    for c0 in range(r0, r1, step):
                        c1 = min(c0 + step, r1)
                        parts = [Part(split.first + c0 - r0, None, split.width, split.bias)]
                        if e > 0:
                            hide = split.extra_bias
                            if hide is not None:
                                hide = per_row(hide[:, :, c0 - r0 : c1 - r0], b, hq)
                            rows = gathered(split.extra[:, :, c0 - r0 : c1 - r0])
                            parts.append(Part(None, rows, e, hide))
                        pieces.append(Piece(c0, c1, tuple(parts), None))
                    continue
                step = kv_bytes // (2 * per_block * used)
                if seg.start is not None and band_bytes:
                    step = band_bytes // per_block
                step = max(1, step)
                for c0 in range(r0, r1, step):
                    c1 = min(c0 + step, r1)
                    rows, first, bias, seen = None, None, None, None
                    if seg.start is None:
                        rows = gathered(layout.kv_indices[:, :, c0:c1, :used])
                    else:
                        first = seg.start + c0 - r0
                    if seg.shared is not None:
                        bias = seg.shared
                    elif not seg.plain:
                        run_bias, run_seen = layout.run_bias(r0, r1, used, dtype)
                        bias = per_row(run_bias[:, :, c0 - r0 : c1 - r0], b, hq)
                        if not seg.seen:
                            seen = per_row(run_seen[:, :, c0 - r0 : c1 - r0], b, hq).to(dtype)
                    pieces.append(Piece(c0, c1, (Part(first, rows, used, bias),), seen))
            return pieces

        return cut(band_bytes, gather_bytes), cut(0, grad_bytes)

    sized = (band_bytes, gather_bytes, grad_bytes)
    return layout.cached(f"grad-pieces-{b}-{hq}-{hkv}-{d}-{dtype}-{sized}", make)


def per_row(x: torch.Tensor, b: int, hq: int) -> torch.Tensor:
    """[Bl, Hl, c, bq, *] as the fused kernel's [1 | B·H, c, bq, *] (c as its heads)."""
    if x.shape[0] * x.shape[1] > 1:
        x = x.expand(b, hq, *x.shape[2:])
    return x.flatten(0, 1)


class BlockPieces(torch.autograd.Function):
    """Block-sparse attention over planned :class:`Piece` lists, with a backward by the
    fused kernel.

    ``pieces`` (of the forward; ``backward_pieces`` of the backward, which cover the
    same query blocks), from :func:`grad_pieces`. Two parts of a piece (a band and
    further blocks) are merged by their log-sum-exps. The forward keeps the
    log-sum-exps; the backward runs the CPU flash kernel's backward per piece and
    part with the merged output and log-sum-exp (so the parts' gradients add up to the
    whole softmax's) and adds the key and value gradients back into their blocks:
    ``used`` shifted slices for a band, index_add for gathered blocks. What autograd
    does for strided views instead (a generic as_strided backward) costs several
    times the attention's own backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, pieces, backward_pieces, block, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        b, hq, nq, _ = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        nqb, nkb = -(-nq // block), -(-nk // block)
        qb, kb, vb = blocked(q, nqb, block), blocked(k, nkb, block), blocked(v, nkb, block)
        out = q.new_empty(b, hq, nqb, block, dv)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.empty(b * hq, nqb, block, dtype=acc, device=q.device)
        for piece in pieces:
            c0, c1 = piece.c0, piece.c1
            qp = qb[:, :, c0:c1].flatten(0, 1)
            o, lse_piece = None, None
            for part in piece.parts:
                kg, vg = piece_keys(kb, vb, c0, c1, part.start, part.rows, part.used, b * hq)
                o_part, lse_part = flash(qp, kg, vg, attn_mask=part.bias, scale=scale)
                if o is None:
                    o, lse_piece = o_part, lse_part
                    continue
                o = lse_merge(o, lse_piece, o_part, lse_part)
                lse_piece = torch.logaddexp(lse_piece, lse_part)
            if piece.seen is not None:
                o = o * piece.seen
            out[:, :, c0:c1].copy_(o.unflatten(0, (b, hq)))
            lse[:, c0:c1].copy_(lse_piece)
        result = out.view(b, hq, nqb * block, dv)[:, :, :nq]
        ctx.save_for_backward(q, k, v, result)
        ctx.out, ctx.lse, ctx.pieces = out, lse, backward_pieces
        ctx.block, ctx.scale = block, scale
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k, v, _ = ctx.saved_tensors
        out, lse, block = ctx.out, ctx.lse, ctx.block
        b, hq, nq, d = q.shape
        hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
        nqb, nkb = -(-nq // block), -(-nk // block)
        qb, kb, vb = blocked(q, nqb, block), blocked(k, nkb, block), blocked(v, nkb, block)
        gb = blocked(grad, nqb, block)
        dq = torch.empty_like(qb)
        # half precision: the pieces' key and value gradients add up in float32
        acc = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else k.dtype
        dk = kb.new_zeros(b, hkv, nkb, block, d, dtype=acc)
        dvb = vb.new_zeros(b, hkv, nkb, block, dv, dtype=acc)
        for piece in ctx.pieces:
            c0, c1 = piece.c0, piece.c1
            g = gb[:, :, c0:c1].flatten(0, 1)
            if piece.seen is not None:
                g = g * piece.seen
            for p, part in enumerate(piece.parts):
                start, rows, used = part.start, part.rows, part.used
                kg, vg = piece_keys(kb, vb, c0, c1, start, rows, used, b * hq)
                g_q, g_k, g_v = bwd(
                    g,
                    qb[:, :, c0:c1].flatten(0, 1),
                    kg,
                    vg,
                    out[:, :, c0:c1].flatten(0, 1),
                    lse[:, c0:c1],
                    0.0,
                    False,
                    attn_mask=part.bias,
                    scale=ctx.scale,
                )
                g_q = g_q.unflatten(0, (b, hq))
                if p == 0:
                    dq[:, :, c0:c1].copy_(g_q)
                else:
                    dq[:, :, c0:c1] += g_q
                if start is None:
                    dk.view(-1, block, d).index_add_(0, rows, g_k.reshape(-1, block, d).to(acc))
                    dvb.view(-1, block, dv).index_add_(0, rows, g_v.reshape(-1, block, dv).to(acc))
                    continue
                # query block c0 + i read key blocks start + i ... start + i + used - 1:
                # add them back row by row or slot by slot, whichever takes fewer adds
                g_k = g_k.view(b, hq, c1 - c0, used, block, d)
                g_v = g_v.view(b, hq, c1 - c0, used, block, dv)
                if c1 - c0 <= used:
                    for i in range(c1 - c0):
                        dk[:, :, start + i : start + i + used] += g_k[:, :, i]
                        dvb[:, :, start + i : start + i + used] += g_v[:, :, i]
                    continue
                for j in range(used):
                    dk[:, :, start + j : start + j + c1 - c0] += g_k[:, :, :, j]
                    dvb[:, :, start + j : start + j + c1 - c0] += g_v[:, :, :, j]
        dq = dq.view(b, hq, nqb * block, d)[:, :, :nq]
        dk = dk.view(b, hkv, nkb * block, d)[:, :, :nk].to(k.dtype)
        dvb = dvb.view(b, hkv, nkb * block, dv)[:, :, :nk].to(v.dtype)
        return dq, dk, dvb, None, None, None, None
