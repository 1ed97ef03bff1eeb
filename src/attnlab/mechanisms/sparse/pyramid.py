"""PSA: Pyramid Sparse Attention (Li et al., arXiv:2512.04025)."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv

from ._routed import NEG_INF, acc_dtype, pad_seq, pool_blocks, softmax_rows, visible_blocks

# elements of one chunk of gathered scores
_CHUNK_ELEMENTS = 1 << 24


def pyramid_levels(p: torch.Tensor, thresholds: tuple[float, ...]) -> torch.Tensor:
    """Long, like ``p`` [..., nkb]: the pooling level of each key block (0 = dropped).

    Key blocks are ranked by ``p``; a block whose higher-ranked blocks hold less
    mass than ``thresholds[h-1]`` gets level h (the first such h): the most
    important blocks stay whole, the next ones are pooled more and more, the
    rest are dropped. A threshold >= 1 takes every remaining block.
    """
    val, order = p.sort(dim=-1, descending=True)
    before = val.cumsum(dim=-1) - val
    level = torch.zeros_like(order)
    for h in range(len(thresholds), 0, -1):
        t = thresholds[h - 1]
        take = torch.ones_like(before, dtype=torch.bool) if t >= 1 else before < t
        level = torch.where(take, h, level)
    return torch.zeros_like(level).scatter(-1, order, level)


def pooled_pyramid(x: torch.Tensor, block: int, factor: int, nkb: int):
    """Keys or values [B, H, Nk, D] as [B, H, nkb, block/factor, D], each pooled
    token the mean of ``factor`` consecutive real positions, and the log of how
    many real positions each pooled token holds ([nkb, block/factor], -inf: none)."""
    n = x.shape[2]
    padded = pad_seq(x, nkb * block).unflatten(2, (nkb * block // factor, factor)).sum(dim=3)
    counts = torch.clamp(n - torch.arange(0, nkb * block, factor, device=x.device), 0, factor)
    pooled = padded / counts.clamp_min(1).to(x.dtype)[:, None]
    logc = torch.log(counts.to(torch.float64)).to(acc_dtype(x.dtype))
    return pooled.unflatten(2, (nkb, block // factor)), logc.view(nkb, block // factor)


@register
class Pyramid(Mechanism):
    """Pyramid Sparse Attention, after "PSA: Pyramid Sparse Attention for Efficient
    Video Understanding and Generation" (Li et al., arXiv:2512.04025).

    Keys and values are cut into blocks of ``block``; level h of the pyramid
    mean-pools each block by 2^(h-1) (level 1 is the block itself). Each query
    block estimates the importance of every key block from the block means
    (P̂ = softmax(q̄ k̄ᵀ · scale)) and, instead of keeping or dropping it,
    gives it a level by cumulative mass: the blocks ranked first until
    ``thresholds[0]`` of P̂ stay whole, those until ``thresholds[1]`` are pooled
    by 2, and so on; the rest are dropped. Every query of the block then
    attends, with one softmax, to the union of those full and pooled tokens.
    A pooled token stands for the 2^(h-1) keys it averages: its score gets
    + log 2^(h-1), so that it carries their softmax mass (our reading; with
    uniform keys the pooled block then weighs what the whole block would).

    Causal, as in the authors' code for video understanding (ziplab/
    Pyramid-Sparse-Attention, ``qwen2.5-vl-example``, ``psa_kernel_causal.py``):
    importance is ranked over the key blocks holding a key visible to some
    query of the block (bottom-right), and a pooled key is seen by a query
    only once every position it averages is (its last real position <= the
    query's). Importance still pools every query and key of a block, so the
    form is causal per block (``Spec.causality = "block"``): the output of
    query i does not depend on tokens after the end of its query block, nor
    on any value after i.

    A pooled key mixes positions, so no per-key mask is taken. ``density``
    reports the last call (keys and pooled keys visited per query, over Nk).
    """

    spec = Spec(
        name="pyramid",
        family="sparse",
        title="PSA: pyramid sparse attention (a pooling level per key block)",
        paper="arXiv:2512.04025",
        exact=False,
        causality="block",
        mask=False,
        complexity="O(N·Σ_h n_h·B/2^(h-1)·D + N²/B²·D)",
    )
    tiny_config: ClassVar[dict] = {"block": 4, "thresholds": (0.3, 0.6, 0.9)}

    @dataclass
    class Config:
        block: int = 64
        thresholds: tuple[float, ...] = field(default=(0.5, 0.8, 0.95))

        def __post_init__(self):
            check_positive_int("block", self.block)
            t = tuple(self.thresholds)
            if not t or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in t):
                raise AttnInputError(f"thresholds: expected a tuple of floats, got {t!r}")
            if any(b < a for a, b in itertools.pairwise(t)) or t[0] <= 0:
                raise AttnInputError(
                    f"thresholds: expected positive, non-decreasing values, got {t!r}"
                )
            if self.block % (2 ** (len(t) - 1)):
                raise AttnInputError(
                    f"block: expected a multiple of 2^(levels-1) = {2 ** (len(t) - 1)}, "
                    f"got {self.block}"
                )
            self.thresholds = t

    def __init__(self, **config):
        super().__init__(**config)
        self._last_density: tuple[int, int, float] | None = None

    def levels(
        self, q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool = False
    ) -> torch.Tensor:
        """Long [B, H, nqb, nkb]: the pyramid level of each (query block, key block).

        With ``causal`` only key blocks holding a key visible to some query of the
        block (bottom-right) are ranked; the others get level 0.
        """
        bs = self.config.block
        with torch.no_grad():
            kr = repeat_kv(pool_blocks(k, bs), q.shape[1] // k.shape[1])
            s = (pool_blocks(q, bs) @ kr.transpose(-1, -2)).float() * scale
            if not causal:
                return pyramid_levels(torch.softmax(s, dim=-1), self.config.thresholds)
            visible = visible_blocks(q.shape[2], k.shape[2], bs, q.device)
            p = torch.softmax(s.masked_fill(~visible, NEG_INF), dim=-1).nan_to_num(0.0)
            return pyramid_levels(p, self.config.thresholds).masked_fill(~visible, 0)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        bs = self.config.block
        b, h, nq, _ = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        acc = acc_dtype(q.dtype)
        nqb, nkb = -(-nq // bs), -(-nk // bs)
        level = self.levels(q, k, scale, causal)
        groups = h // k.shape[1]
        bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
        hi = (torch.arange(h, device=q.device) // groups).view(1, h, 1, 1)
        # per level: the pooled blocks, and for each query block the list of its blocks there
        sources, visited = [], 0.0
        for lv in range(1, len(self.config.thresholds) + 1):
            chosen = level == lv
            width = int(chosen.sum(dim=-1).max())
            if width == 0:
                continue
            idx = torch.where(chosen, torch.arange(nkb, device=q.device), nkb)
            idx = idx.sort(dim=-1).values[..., :width]
            ok = idx < nkb
            factor = 2 ** (lv - 1)
            kp, logc = pooled_pyramid(k, bs, factor, nkb)
            vp, _ = pooled_pyramid(v, bs, factor, nkb)
            # last real position each pooled token covers: [nkb, block/factor]
            ends = torch.arange(factor, nkb * bs + 1, factor, device=q.device).clamp(max=nk) - 1
            sources.append((idx.clamp_max(nkb - 1), ok, kp, vp, logc, ends.view(nkb, -1)))
            visited += float((chosen.sum(dim=-1).double() * bs / 2 ** (lv - 1)).mean())
        self._last_density = (nq, nk, min(1.0, visited / nk))
        qb = pad_seq(q, nqb * bs).unflatten(2, (nqb, bs))
        if not sources:
            return torch.zeros(b, h, nq, dv, dtype=q.dtype, device=q.device)
        per_block = b * h * bs * sum(s[0].shape[-1] * s[2].shape[3] for s in sources)
        step = max(1, _CHUNK_ELEMENTS // max(per_block, 1))
        outs = []
        for c0 in range(0, nqb, step):
            c1 = min(c0 + step, nqb)
            ks, vs, biases, last = [], [], [], []
            for idx, ok, kp, vp, logc, ends in sources:
                sel = idx[:, :, c0:c1]
                ks.append(kp[bi, hi, sel].flatten(3, 4))  # [B, H, c, S*L, D]
                vs.append(vp[bi, hi, sel].flatten(3, 4))
                bias = logc[sel].masked_fill(~ok[:, :, c0:c1, :, None], NEG_INF)
                biases.append(bias.flatten(3, 4))
                last.append(ends[sel].flatten(3, 4))
            kg, vg, bias = torch.cat(ks, dim=3), torch.cat(vs, dim=3), torch.cat(biases, dim=3)
            s = (qb[:, :, c0:c1] @ kg.transpose(-1, -2)).to(acc) * scale + bias[:, :, :, None]
            if causal:  # a pooled key is seen once every position it covers is
                qpos = torch.arange(c0 * bs, c1 * bs, device=q.device).view(c1 - c0, bs, 1)
                ahead = torch.cat(last, dim=3)[:, :, :, None, :] > qpos + (nk - nq)
                s = s.masked_fill(ahead, NEG_INF)
            outs.append(softmax_rows(s) @ vg.to(acc))
        out = torch.cat(outs, dim=2).flatten(2, 3)[:, :, :nq]
        return out.to(q.dtype)

    def limit(self, n):
        """Every key block kept whole: the first threshold at 1."""
        return dataclasses.replace(self.config, thresholds=(1.0,) * len(self.config.thresholds))

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """Keys and pooled keys visited per query over Nk, in the last call of this
        shape (1.0 before any call): a pooled key costs what one key does."""
        last = self._last_density
        if last is not None and last[:2] == (nq, nk):
            return last[2]
        return 1.0
