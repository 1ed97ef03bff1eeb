"""SpargeAttn: training-free block-sparse prediction (Zhang et al., arXiv:2502.18137)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.blocks import BlockLayout, block_sparse_attention
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv

from ._routed import NEG_INF, pad_seq, pool_blocks


def self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the vectors inside each block: [B, H, nb].

    Equals ‖Σ x̂_i‖² / n² over the n unit vectors x̂_i of the block (O(N·D)).
    """
    n = x.shape[2]
    nb = -(-n // block)
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    summed = pad_seq(xn, nb * block).unflatten(2, (nb, block)).sum(dim=3)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = n - (nb - 1) * block
    return summed.pow(2).sum(-1) / counts**2


def cdf_select(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool: the smallest set of largest entries of each row of ``p`` whose sum reaches
    ``threshold`` (every entry when threshold >= 1)."""
    if threshold >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    val, order = p.sort(dim=-1, descending=True)
    before = val.cumsum(dim=-1) - val  # mass of the entries ranked above
    keep_sorted = before < threshold
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@register
class Sparge(Mechanism):
    """SpargeAttn's sparse block prediction, after "SpargeAttn: Accurate Sparse
    Attention Accelerating Any Model Inference" (Zhang et al., arXiv:2502.18137).

    Training-free: queries and keys are cut into blocks of ``block`` and each
    block is compressed to its mean. A block is self-similar when the mean
    cosine similarity of its tokens reaches ``sim_threshold``; only then does
    its mean stand for it. The compressed map P̂ = softmax(q̄ k̄ᵀ · scale) over
    the self-similar key blocks gives each query block the fewest key blocks
    whose P̂ mass reaches ``cdf_threshold`` (the cumulative-threshold, TopCdf,
    selection); query blocks that are not self-similar keep every key block,
    and key blocks that are not self-similar are kept by every query block.
    Attention then runs on the kept blocks, token by token. The paper's
    second, in-kernel stage (skipping by the online softmax maximum) is a
    kernel-level optimisation and is left out.

    Prediction pools every query of a block, so there is no causal form.
    ``density`` reports the last call's layout (1.0 before any call).
    """

    spec = Spec(
        name="sparge",
        family="sparse",
        title="SpargeAttn: block-sparse prediction from compressed q, k",
        paper="arXiv:2502.18137",
        exact=False,
        causal=False,
        complexity="O(N²/B²·D + kept blocks·B²·D)",
    )
    tiny_config: ClassVar[dict] = {"block": 4, "cdf_threshold": 0.5, "sim_threshold": 0.2}

    @dataclass
    class Config:
        block: int = 64
        cdf_threshold: float = 0.9
        sim_threshold: float = 0.6

        def __post_init__(self):
            check_positive_int("block", self.block)
            t = self.cdf_threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
                raise AttnInputError(f"cdf_threshold: expected a float in (0, 1], got {t!r}")
            s = self.sim_threshold
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise AttnInputError(f"sim_threshold: expected a float, got {s!r}")

    def __init__(self, **config):
        super().__init__(**config)
        self._last: BlockLayout | None = None

    def predict(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """Bool [B, H, nqb, nkb]: the key blocks each query block computes."""
        cfg = self.config
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        with torch.no_grad():
            q_sim = self_similarity(q, cfg.block) >= cfg.sim_threshold  # [B, H, nqb]
            k_sim = self_similarity(k, cfg.block) >= cfg.sim_threshold  # [B, H, nkb]
            s = (pool_blocks(q, cfg.block) @ pool_blocks(k, cfg.block).transpose(-1, -2)).float()
            s = (s * scale).masked_fill(~k_sim[:, :, None, :], NEG_INF)
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            keep = cdf_select(p, cfg.cdf_threshold) & k_sim[:, :, None, :]
            keep = keep | ~q_sim[..., None] | ~k_sim[:, :, None, :]
        return keep

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        keep = self.predict(q, k, scale)
        nkb = keep.shape[-1]
        cand = torch.where(keep, torch.arange(nkb, device=q.device), -1)
        layout = BlockLayout.build(None, cand, q.shape[2], k.shape[2], self.config.block)
        self._last = layout
        out = block_sparse_attention(q, k, v, layout, scale=scale, mask=mask, path="auto")
        return out.to(q.dtype)

    def limit(self, n):
        """Every block kept: ``cdf_threshold`` = 1."""
        return dataclasses.replace(self.config, cdf_threshold=1.0)

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """Share of the Nq x Nk pairs computed in the last call (1.0 before any call)."""
        last = self._last
        if last is not None and (last.nq, last.nk) == (nq, nk):
            return last.density()
        return 1.0
