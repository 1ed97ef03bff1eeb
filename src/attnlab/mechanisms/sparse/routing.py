"""Routing attention: online k-means clusters of queries and keys (Roy et al., arXiv:2003.05997).

Compared with google-research/google-research (routing_transformer/utils.py,
clustered_local_attention_helper): the same shared-centroid routing with an exponential-
moving-average k-means in training; on purpose attnlab assigns each query and key to its
nearest centroid (the paper's definition) where the authors gather for every centroid
its attention_window nearest items (balanced clusters whose membership depends on the
whole sequence, so not causal), and it projects onto the unit sphere where the authors
use a layer norm without scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv
from attnlab.core.mechanism import KVCacheDecode

from ._routed import masked_tiled_attention


@register
class Routing(KVCacheDecode, Mechanism):
    """Routing attention, after "Efficient Content-Based Sparse Attention with
    Routing Transformers" (Roy, Saffar, Vaswani and Grangier, arXiv:2003.05997).

    Queries and keys are normalised to the unit sphere and assigned to the
    nearest of ``clusters`` centroids (shared by queries and keys, one set
    per query head); a query attends, with one softmax, only to the keys of
    its own cluster (and within the causal rule and the mask). In training
    mode the centroids follow the paper's online k-means: an exponential
    moving average, with decay ``decay``, towards the sums of the queries and
    keys assigned to them (then renormalised); in eval mode they are fixed.
    Assignment is by nearest centroid (the paper's definition), not the
    balanced top-k routing of its implementation, so it stays causal.

    The centroids ``centroids`` [Hq, clusters, D] are created on the first
    call, seeded by ``seed``. The trainable path visits every (query tile,
    key tile) with the cluster rule (memory O(tile), not N x N). ``density``
    is the share of (query, key) pairs that shared a cluster in the last call.
    """

    spec = Spec(
        name="routing",
        family="sparse",
        title="Routing attention (online k-means clusters)",
        paper="arXiv:2003.05997",
        exact=False,
        decode=True,
        complexity="O(N²·D) tiled; O(N·C·D) routing",
    )
    tiny_config: ClassVar[dict] = {"clusters": 3, "block_q": 7, "block_k": 5}

    @dataclass
    class Config:
        clusters: int = 8
        decay: float = 0.999
        seed: int = option(0, low=0)
        block_q: int = 256
        block_k: int = 512

        def __post_init__(self):
            check_positive_int("clusters", self.clusters)
            check_positive_int("block_q", self.block_q)
            check_positive_int("block_k", self.block_k)
            if not 0.0 <= self.decay < 1.0:
                raise AttnInputError(f"decay: expected a float in [0, 1), got {self.decay!r}")

    def __init__(self, **config):
        super().__init__(**config)
        self.register_buffer("centroids", None)
        self._last_density: float | None = None

    def _centroids(self, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        if self.centroids is None:
            gen = torch.Generator().manual_seed(self.config.seed)
            c = torch.randn(heads, self.config.clusters, dim, generator=gen, dtype=torch.float64)
            c = torch.nn.functional.normalize(c, dim=-1)
            self.centroids = c.to(dtype=like.dtype, device=like.device)
        return self.centroids

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        c = self.centroids
        if c is not None and (c.shape[0] != q.shape[1] or c.shape[2] != q.shape[-1]):
            reasons.append(
                f"q: these centroids were built for {c.shape[0]} heads of dim {c.shape[2]}, "
                f"got {q.shape[1]} heads of dim {q.shape[-1]}"
            )
        return reasons

    def assign(self, x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """Long [B, H, N]: the nearest centroid (cosine) of each vector of x [B, H, N, D]."""
        xn = torch.nn.functional.normalize(x.detach(), dim=-1)
        return torch.einsum("bhnd,hcd->bhnc", xn, centroids.to(x.dtype)).argmax(dim=-1)

    @torch.no_grad()
    def _update(self, q, k, cq, ck):
        """One online k-means step: mu <- decay*mu + (1-decay)/2 (sum of its q + sum of its k).

        Vectors with a NaN or an infinity take no part, so one bad input never makes the
        centroids NaN."""
        c = self.centroids
        h, n_c, d = c.shape
        sums = torch.zeros(h, n_c, d, dtype=torch.float32, device=q.device)
        for x, cx in ((q, cq), (k, ck)):
            xn = torch.nn.functional.normalize(x.float(), dim=-1)
            xn = torch.where(torch.isfinite(xn).all(dim=-1, keepdim=True), xn, 0.0)
            idx = cx.permute(1, 0, 2).reshape(h, -1, 1).expand(-1, -1, d)
            sums.scatter_add_(1, idx, xn.permute(1, 0, 2, 3).reshape(h, -1, d))
        decay = self.config.decay
        new = decay * c.float() + (1 - decay) / 2 * sums
        self.centroids = torch.nn.functional.normalize(new, dim=-1).to(c.dtype)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        h = q.shape[1]
        centroids = self._centroids(h, q.shape[-1], q)
        k_h = repeat_kv(k, h // k.shape[1])
        cq, ck = self.assign(q, centroids), self.assign(k_h, centroids)
        if self.training:
            self._update(q, k_h, cq, ck)
        n_c = self.config.clusters
        per_q = torch.nn.functional.one_hot(cq, n_c).sum(dim=2).double()
        per_k = torch.nn.functional.one_hot(ck, n_c).sum(dim=2).double()
        self._last_density = float((per_q * per_k).sum(-1).mean()) / (q.shape[2] * k.shape[2])

        def allowed(qs, ks):
            return cq[:, :, qs, None] == ck[:, :, None, ks]

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
        """One cluster: every query and key share it."""
        return dataclasses.replace(self.config, clusters=1)

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """Share of pairs in a common cluster in the last call (1/clusters before any call),
        times the causal share (Nq+1)/2Nq-style of full attention when causal."""
        base = self._last_density if self._last_density is not None else 1 / self.config.clusters
        if causal:
            vis = (torch.arange(nq, dtype=torch.float64) + (nk - nq) + 1).clamp(0, nk)
            base *= float(vis.sum()) / (nq * nk)
        return base
