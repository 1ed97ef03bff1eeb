"""BiFormer's bi-level routing attention (Zhu et al., arXiv:2303.08810)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Mechanism, Spec, register
from attnlab.core.blocks import BACKENDS, BlockLayout, block_sparse_attention, flex_unsupported
from attnlab.core.checks import check_positive_int

from ._isolation import attend_isolated
from ._routed import pool_blocks


@register
class BiFormer(Mechanism):
    """Bi-level routing attention, after "BiFormer: Vision Transformer with Bi-Level
    Routing Attention" (Zhu et al., arXiv:2303.08810).

    The sequence is cut into regions of ``region`` tokens (the paper's S x S
    grid of image regions, flattened; order the tokens region by region to
    use it on images). Region-level queries and keys are the means of the
    queries and keys of each region, over all channels: Qr, Kr in
    R^(S² x C) with the heads side by side (under grouped-query attention
    each key head stands beside the query heads it serves), so the region
    affinity A = Qr Krᵀ is the sum of the heads' affinities. A gives each
    query region its ``top_k`` key regions, one routing shared by all heads
    (Sec. 3.2), and every token of the query region then attends, with one
    softmax per head, to all tokens of those regions.
    The paper's local context enhancement (a depth-wise convolution on V
    added to the output) belongs to the layer, not to the attention, and is
    left out. The paper defines no causal form (its tasks are image
    classification, detection and segmentation), and routing reads every
    token of a query region, so ``causal=True`` is refused. A NaN or
    infinity in a key or value reaches only the rows that attend it, and a
    non-finite query does not change its region's routing
    (:func:`._isolation.attend_isolated`).

    Paths (``backend``) from the shared block-sparse engine: ``"torch"``
    (gathered regions, trainable), ``"flex"`` (compiled FlexAttention,
    inference) and ``"auto"`` (its chooser).

    Compared with rayleizhu/BiFormer (``TopkRouting`` and
    ``BiLevelRoutingAttention`` in ``ops/bra_legacy.py``): the same routing
    (means over regions of the whole q and k, top-k of their product, no
    gradient through it) and the same gathered attention; the paper's
    optional key/value down-sampling inside regions, soft routing weights
    and the local-context convolution are left to the layer.
    """

    spec = Spec(
        name="biformer",
        family="sparse",
        title="BiFormer: bi-level routing attention (top-k regions)",
        paper="arXiv:2303.08810",
        exact=False,
        causal=False,
        complexity="O(N·k·R·D + (N/R)²·D)",
    )
    tiny_config: ClassVar[dict] = {"region": 4, "top_k": 2}
    backends: ClassVar[tuple[str, ...]] = BACKENDS

    @dataclass
    class Config:
        region: int = 64
        top_k: int = 4
        backend: str = "auto"

        def __post_init__(self):
            check_positive_int("region", self.region)
            check_positive_int("top_k", self.top_k)

    def __init__(self, **config):
        super().__init__(**config)
        self._last: BlockLayout | None = None

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if causal:
            reasons = [r for r in reasons if not r.startswith("causal:")]
            reasons.append(
                "causal: BiFormer (Zhu et al., arXiv:2303.08810) is a vision transformer whose "
                "bi-level routing has no causal form: a query region is routed by the mean of "
                "all its queries and attends whole key regions (pass causal=False)"
            )
        if self.config.backend == "flex":
            reasons += flex_unsupported(q, k, v)
        return reasons

    def route(self, q: torch.Tensor, k: torch.Tensor) -> BlockLayout:
        """The layout: for each query region, its ``top_k`` key regions by the affinity
        over all channels, shared by the heads ([B, 1, nqr, top_k])."""
        r = self.config.region
        b, h, _, d = q.shape
        hkv = k.shape[1]
        nkr = -(-k.shape[2] // r)
        with torch.no_grad():
            q = torch.where(torch.isfinite(q), q, 0.0)
            qr = pool_blocks(q, r).view(b, hkv, h // hkv, -1, d)  # [B, Hkv, G, nqr, D]
            kr = pool_blocks(k, r)  # [B, Hkv, nkr, D]
            affinity = torch.einsum("bkgid,bkjd->bij", qr, kr)  # [B, nqr, nkr]
            idx = affinity.topk(min(self.config.top_k, nkr), dim=-1).indices
        return BlockLayout.build(None, idx[:, None], q.shape[2], k.shape[2], r)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        def attend(q, k, v):
            layout = self.route(q, k)
            self._last = layout
            return block_sparse_attention(
                q, k, v, layout, scale=scale, mask=mask, path=self.config.backend
            )

        return attend_isolated(attend, q, k, v).to(q.dtype)

    def limit(self, n):
        """Every key region routed: ``top_k`` = the number of regions."""
        return dataclasses.replace(self.config, top_k=max(1, -(-n // self.config.region)))

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """Share of the Nq x Nk pairs computed: from the last call's routing when it had
        this shape, else min(top_k·region, Nk)/Nk (exact when Nk is a multiple of region)."""
        last = self._last
        if last is not None and (last.nq, last.nk) == (nq, nk):
            return last.density()
        return min(self.config.top_k * self.config.region, nk) / nk
