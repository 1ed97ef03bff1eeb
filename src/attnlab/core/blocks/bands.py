"""Sliding bands in a block layout: runs of query blocks that read consecutive key blocks.

Query block c0 + i of such a run visits key blocks first + i ... first + i + width - 1,
so its keys and values are read in place through one strided view
(:func:`attnlab.core.blocks.pieces.sliding_view`) instead of gathered. A run that is
a band plus a few further, fully visible blocks (local attention with global and
random blocks) is split into the two (:class:`BandSplit`), attended apart and merged
by log-sum-exp.
"""

from __future__ import annotations

import dataclasses

import torch

from .layout import BandSplit, BlockLayout, Run, additive_bias


def sliding_start(layout: BlockLayout, c0: int, c1: int, used: int) -> int | None:
    """The first key block of query block c0 when blocks c0..c1 visit consecutive key
    blocks, one further per query block (a sliding band), else None (cached)."""

    def make():
        if layout.kv_indices.shape[:2] != (1, 1) or not bool(
            layout.kv_valid[..., c0:c1, :used].all()
        ):
            return None
        idx = layout.kv_indices[0, 0, c0:c1, :used]
        start = int(idx[0, 0])
        rows = torch.arange(c1 - c0, device=idx.device)[:, None]
        band = start + rows + torch.arange(used, device=idx.device)
        if start + (c1 - c0 - 1) + used > layout.k_blocks or not torch.equal(idx, band):
            return None
        return start

    return layout.cached(f"sliding-{c0}-{c1}-{used}", make)


def band_split(
    layout: BlockLayout, c0: int, c1: int, used: int, dtype: torch.dtype
) -> BandSplit | None:
    """Query blocks c0..c1 (``used`` slots) as a sliding band plus further blocks (cached).

    None unless every batch entry and head of each query block visits the same
    consecutive key blocks under one shared token mask in which every query sees a
    key, and every other block it visits is fully visible; every row then has at
    least one real further block when there are any.
    """

    def make():
        idx = layout.kv_indices[..., c0:c1, :used]
        valid = layout.kv_valid[..., c0:c1, :used]
        rows = torch.arange(c0, c1, device=idx.device)[:, None]
        off = idx - rows
        lo, hi = int(off[valid].min()), int(off[valid].max())
        span = hi - lo + 1
        present = torch.zeros(*off.shape[:-1], span + 1, dtype=torch.bool, device=idx.device)
        present.scatter_(-1, torch.where(valid, off - lo, span), True)
        common = present[..., :span].flatten(0, 2).all(dim=0)
        # the longest run of consecutive offsets that every row and head visits
        best, width, run = 0, 0, 0
        for d, ok in enumerate(common.tolist()):
            run = run + 1 if ok else 0
            if run > width:
                best, width = d - run + 1, run
        if width == 0:
            return None
        d0 = lo + best
        rest = valid & ~((off >= d0) & (off < d0 + width))
        count = rest.sum(dim=-1)
        e = int(count.max())
        if e > 0 and int(count.min()) == 0:
            return None
        order = torch.where(rest, 0, 1).argsort(dim=-1, stable=True)[..., :e]
        real = rest.gather(-1, order)
        extra = torch.where(real, idx.gather(-1, order), 0)
        qpos, _ = layout.positions(c0, c1)
        ar = torch.arange(layout.block, device=idx.device)
        kpos = (extra[..., None] * layout.block + ar).flatten(-2)[..., None, :]
        hidden = ~real[..., None].expand(*real.shape, layout.block).flatten(-2)[..., None, :]
        if not bool(layout.real_rows(layout.allowed_at(qpos, kpos) | hidden, c0).all()):
            return None
        extra_bias = None
        if not bool(real.all()):
            extra_bias = torch.zeros(hidden.shape, dtype=dtype, device=idx.device)
            extra_bias.masked_fill_(hidden, float("-inf"))
        ar = torch.arange(width * layout.block, device=idx.device)
        kpos = ((rows + d0) * layout.block + ar)[None, None, :, None, :]
        allowed = layout.allowed_at(qpos, kpos)
        first = allowed[:1, :1, :1]
        same = layout.real_rows(allowed == first, c0)
        if not bool(same.all()) or not bool(first.any(dim=-1).all()):
            return None
        bias = None if bool(first.all()) else additive_bias(first[0], dtype)[0]
        return BandSplit(c0 + d0, width, bias, extra, extra_bias)

    return layout.cached(f"band-{c0}-{c1}-{used}-{dtype}", make)


def band_runs(
    layout: BlockLayout, batch_heads: int, dtype: torch.dtype, min_elements: int = 0
) -> list[Run]:
    """The layout's runs (:meth:`BlockLayout.runs`), each with its :func:`band_split` as
    ``Run.band`` where it is no sliding band, every query sees a key and its scores hold
    at least ``min_elements`` (else None) (cached).

    Consecutive runs whose bands continue each other are joined: the band path
    computes in pieces of bounded size, so it needs no per-run memory bound, and
    fewer, longer runs are faster.
    """

    def make():
        out: list[Run] = []
        for run in layout.runs(batch_heads):
            c0, c1, used = run.c0, run.c1, run.used
            band = None
            large = batch_heads * (c1 - c0) * layout.block**2 * used >= min_elements
            if run.seen and large and sliding_start(layout, c0, c1, used) is None:
                band = band_split(layout, c0, c1, used, dtype)
            joined = _join_bands(out[-1], run, band) if out else None
            if joined is not None:
                prev = out[-1]
                out[-1] = Run(prev.c0, c1, used, prev.plain and run.plain, True, joined)
            else:
                out.append(dataclasses.replace(run, band=band))
        return out

    return layout.cached(f"band-runs-{batch_heads}-{dtype}-{min_elements}", make)


def _join_bands(prev: Run, run: Run, band: BandSplit | None) -> BandSplit | None:
    """The band split of ``prev`` and ``run`` (split as ``band``) as one, or None where
    they do not continue each other (same band width, mask and number of further blocks)."""
    a, b = prev.band, band
    if a is None or b is None or run.used != prev.used:
        return None
    if a.width != b.width or b.first != a.first + run.c0 - prev.c0:
        return None
    if a.extra.shape[-1] != b.extra.shape[-1] or a.extra.shape[:2] != b.extra.shape[:2]:
        return None
    if (a.bias is None) != (b.bias is None):
        return None
    if a.bias is not None and not torch.equal(a.bias, b.bias):
        return None
    hide = None
    if a.extra_bias is not None or b.extra_bias is not None:
        like = a.extra_bias if a.extra_bias is not None else b.extra_bias
        bl, hl, _, _, keys = like.shape
        xa, xb = (
            x
            if x is not None
            else torch.zeros(bl, hl, e.shape[2], 1, keys, dtype=like.dtype, device=like.device)
            for x, e in ((a.extra_bias, a.extra), (b.extra_bias, b.extra))
        )
        hide = torch.cat([xa, xb], dim=2)
    return BandSplit(a.first, a.width, a.bias, torch.cat([a.extra, b.extra], dim=2), hide)
