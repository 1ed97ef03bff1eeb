"""DHSA: Dynamic Hierarchical Sparse Attention (Xiong et al., arXiv:2510.24606)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv

from ._routed import NEG_INF, masked_tiled_attention


def dynamic_chunks(k: torch.Tensor, *, threshold: float, min_chunk: int, max_chunk: int):
    """Chunk index of every position [B, H, N] from the keys [B, H, N, D].

    A chunk starts at position t (a multiple of ``min_chunk``) when the cosine
    similarity of keys t-1 and t falls below ``threshold`` (a semantic shift),
    and at every multiple of ``max_chunk``; so chunks hold ``min_chunk`` to
    ``max_chunk`` positions (the last may hold fewer), and whether t starts a
    chunk depends on keys up to t only.
    """
    b, h, n, _ = k.shape
    t = torch.arange(n, device=k.device)
    kn = torch.nn.functional.normalize(k.float(), dim=-1)
    cos = (kn[:, :, 1:] * kn[:, :, :-1]).sum(dim=-1)
    start = (t % max_chunk == 0).expand(b, h, n).clone()
    start[:, :, 1:] |= ((t[1:] % min_chunk) == 0) & (cos < threshold)
    return start.long().cumsum(dim=-1) - 1


@register
class DHSA(Mechanism):
    """Dynamic Hierarchical Sparse Attention, after "Long-Context Modeling with
    Dynamic Hierarchical Sparse Attention for On-Device LLMs" (Xiong, Zou,
    Fekri and Cho, arXiv:2510.24606).

    1. Dynamic chunking: the sequence is cut where consecutive keys shift
       (cosine similarity below ``threshold``), on a grid of ``min_chunk``
       and at least every ``max_chunk`` positions. The paper learns this
       boundary predictor; its training labels come from the same similarity
       shift between consecutive keys, which is used here directly.
    2. Chunk representations with length normalisation: the mean of a
       chunk's keys (and queries) times sqrt(chunk length).
    3. Chunk similarity S_c = q̄ k̄ᵀ, upsampled to tokens (query i, key j) ->
       S_c[chunk(i), chunk(j)]; each query keeps its ``budget`` keys of
       highest upsampled similarity: whole chunks in order of similarity until
       the budget is reached (ties inside a chunk keep the chunk whole), its
       own chunk always first.
    4. Softmax attention over the kept keys.

    Causal mode: a query's chunk representation is the length-normalised
    mean of the queries of its chunk up to itself (the paper's
    representation at the end of the chunk), and only visible keys count
    against the budget, so the mechanism stays causal. ``density`` reports
    the kept share of the last call (budget/Nk before any call).
    """

    spec = Spec(
        name="dhsa",
        family="sparse",
        title="DHSA: dynamic hierarchical sparse attention (chunk similarity)",
        paper="arXiv:2510.24606",
        exact=False,
        cross=False,
        complexity="O(N²/C·D) prediction, O(N²·D) tiled",
    )
    tiny_config: ClassVar[dict] = {
        "budget": 8,
        "min_chunk": 2,
        "max_chunk": 6,
        "threshold": 0.0,
        "block_q": 7,
        "block_k": 5,
    }

    @dataclass
    class Config:
        budget: int = 256
        min_chunk: int = 16
        max_chunk: int = 128
        threshold: float = 0.5
        block_q: int = 256
        block_k: int = 512

        def __post_init__(self):
            for name in ("budget", "min_chunk", "max_chunk", "block_q", "block_k"):
                check_positive_int(name, getattr(self, name))
            if self.max_chunk < self.min_chunk:
                raise AttnInputError(
                    f"max_chunk: expected at least min_chunk={self.min_chunk}, got {self.max_chunk}"
                )
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise AttnInputError(f"threshold: expected a float, got {t!r}")

    def __init__(self, **config):
        super().__init__(**config)
        self._last_density: tuple[int, float] | None = None

    def select(self, q: torch.Tensor, k: torch.Tensor, causal: bool):
        """Chunk ids [B, H, N] and the chunks each query keeps, bool [B, H, N, C]."""
        cfg = self.config
        b, h, n, d = q.shape
        with torch.no_grad():
            cid = dynamic_chunks(
                k, threshold=cfg.threshold, min_chunk=cfg.min_chunk, max_chunk=cfg.max_chunk
            )
            nc = int(cid.max()) + 1
            ones = torch.ones(b, h, n, dtype=torch.float32, device=q.device)
            length = torch.zeros(b, h, nc, device=q.device).scatter_add_(2, cid, ones)
            start = length.cumsum(dim=-1) - length
            idx = cid[..., None].expand(-1, -1, -1, d)
            ksum = torch.zeros(b, h, nc, d, device=q.device).scatter_add_(2, idx, k.float())
            kbar = ksum / length.clamp_min(1)[..., None] * length.sqrt()[..., None]
            pos = torch.arange(n, device=q.device, dtype=torch.float32)
            own_start = start.gather(2, cid)
            if causal:
                qcum = q.float().cumsum(dim=2)
                prev = (own_start.long() - 1).clamp_min(0)[..., None].expand(-1, -1, -1, d)
                before = torch.where(own_start[..., None] > 0, qcum.gather(2, prev), 0.0)
                count = (pos - own_start + 1)[..., None]
                qbar = (qcum - before) / count * count.sqrt()
            else:
                qsum = torch.zeros(b, h, nc, d, device=q.device).scatter_add_(2, idx, q.float())
                qchunk = qsum / length.clamp_min(1)[..., None] * length.sqrt()[..., None]
                qbar = qchunk.gather(2, idx)
            score = qbar @ kbar.transpose(-1, -2)  # [B, H, N, C]: upsampled per token
            if causal:
                end = (start + length)[:, :, None, :]
                vis = (torch.minimum(end, pos[:, None] + 1) - start[:, :, None, :]).clamp_min(0)
            else:
                vis = length[:, :, None, :].expand(-1, -1, n, -1)
            own = torch.nn.functional.one_hot(cid, nc).bool()
            score = score.masked_fill(vis <= 0, NEG_INF).masked_fill(own, float("inf"))
            val, order = score.sort(dim=-1, descending=True)
            vis_sorted = vis.gather(-1, order)
            before_sum = vis_sorted.cumsum(dim=-1) - vis_sorted
            keep_sorted = (before_sum < cfg.budget) & ~torch.isneginf(val)
            keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
            kept = float((keep * vis).sum(dim=(-1, -2)).mean())
        return cid, keep, kept

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        n = q.shape[2]
        k_h = repeat_kv(k, q.shape[1] // k.shape[1])
        cid, keep, kept = self.select(q, k_h, causal)
        self._last_density = (n, kept / (n * n))

        def allowed(qs, ks):
            rows = keep[:, :, qs]
            return rows.gather(-1, cid[:, :, None, ks].expand(-1, -1, rows.shape[2], -1))

        return masked_tiled_attention(
            q,
            k,
            v,
            allowed,
            scale=scale,
            causal=causal,
            mask=mask,
            block_q=self.config.block_q,
            block_k=self.config.block_k,
        )

    def limit(self, n):
        """Every key kept: ``budget`` = N."""
        return dataclasses.replace(self.config, budget=n)

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """Kept share of the Nq x Nk pairs in the last call of this length, else
        min(budget, Nk)/Nk (only visible keys counted when causal)."""
        last = self._last_density
        if last is not None and last[0] == nq == nk:
            return last[1]
        vis = torch.full((nq,), float(nk), dtype=torch.float64)
        if causal:
            vis = (torch.arange(nq, dtype=torch.float64) + (nk - nq) + 1).clamp(0, nk)
        return float(vis.clamp(max=self.config.budget).sum()) / (nq * nk)
