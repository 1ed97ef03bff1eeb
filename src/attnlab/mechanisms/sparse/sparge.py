"""SpargeAttn: training-free block-sparse prediction (Zhang et al., arXiv:2502.18137).

The comparison with thu-ml/SpargeAttn (get_block_map_meansim) is in the class docstring:
the same mean-similarity prediction and TopCdf count; the kernel's second stage is left
out on purpose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.blocks import BlockLayout, block_sparse_attention
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv

from ._routed import NEG_INF, causal_rule, pad_seq, pool_blocks, visible_blocks


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
    """Bool: per row of ``p``, the largest entries whose cumulative sum (largest first)
    stays within ``threshold``, at least the largest one (every entry when
    threshold >= 1).

    As the authors' ``get_block_map_meansim`` (thu-ml/SpargeAttn,
    ``spas_sage_attn/utils.py``): ``searchsorted(cdf, threshold, right=True)`` blocks,
    one when that is zero; the block whose mass crosses the threshold is not kept.
    """
    if threshold >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    val, order = p.sort(dim=-1, descending=True)
    keep_sorted = val.cumsum(dim=-1) <= threshold
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@register
class Sparge(Mechanism):
    """SpargeAttn's sparse block prediction, after "SpargeAttn: Accurate Sparse
    Attention Accelerating Any Model Inference" (Zhang et al., arXiv:2502.18137).

    Training-free: queries and keys are cut into blocks of ``block`` and each
    block is compressed to its mean. A block is self-similar when the mean
    cosine similarity of its tokens reaches ``sim_threshold``; only then does
    its mean stand for it. The compressed map P̂ = softmax(q̄ k̄ᵀ · scale) over
    the self-similar key blocks gives each query block its highest-ranked key
    blocks whose cumulative P̂ mass stays within ``cdf_threshold``, at least
    one (the TopCdf selection, counted as the authors' code does: the block
    whose mass crosses the threshold is left out); query blocks that are not
    self-similar keep every key block, and key blocks that are not
    self-similar are kept by every query block.
    Attention then runs on the kept blocks, token by token. The paper's
    second, in-kernel stage (skipping by the online softmax maximum) is a
    kernel-level optimisation and is left out.

    Causal (the paper's kernels take ``is_causal``; its reference code,
    thu-ml/SpargeAttn ``get_block_map_meansim``, masks the compressed map with
    the block-level causal mask before the softmax and the kept blocks after
    the selection): only key blocks holding a visible key take part in P̂
    and are kept, and inside them the token-level causal rule applies. The
    prediction still pools every query and key of a block, so the form is
    causal per block (``Spec.causality = "block"``): the output of query i
    does not depend on tokens after the end of its query block, nor on any
    value after i.

    ``density`` reports the last call's layout (1.0 before any call).
    """

    spec = Spec(
        name="sparge",
        family="sparse",
        title="SpargeAttn: block-sparse prediction from compressed q, k",
        paper="arXiv:2502.18137",
        exact=False,
        causality="block",
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

    def predict(
        self, q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool = False
    ) -> torch.Tensor:
        """Bool [B, H, nqb, nkb]: the key blocks each query block computes.

        With ``causal`` only the key blocks that hold a key visible to some query
        of the block (bottom-right) take part in the prediction and are kept.
        """
        cfg = self.config
        nq, nk = q.shape[2], k.shape[2]
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        with torch.no_grad():
            q_sim = self_similarity(q, cfg.block) >= cfg.sim_threshold  # [B, H, nqb]
            k_sim = self_similarity(k, cfg.block) >= cfg.sim_threshold  # [B, H, nkb]
            s = (pool_blocks(q, cfg.block) @ pool_blocks(k, cfg.block).transpose(-1, -2)).float()
            s = (s * scale).masked_fill(~k_sim[:, :, None, :], NEG_INF)
            visible = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
            if causal:
                visible = visible_blocks(nq, nk, cfg.block, q.device)
                s = s.masked_fill(~visible, NEG_INF)
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            keep = cdf_select(p, cfg.cdf_threshold) & k_sim[:, :, None, :]
            keep = (keep | ~q_sim[..., None] | ~k_sim[:, :, None, :]) & visible
        return keep

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        nq, nk = q.shape[2], k.shape[2]
        keep = self.predict(q, k, scale, causal)
        nkb = keep.shape[-1]
        cand = torch.where(keep, torch.arange(nkb, device=q.device), -1)
        rule = causal_rule(nq, nk) if causal else None
        layout = BlockLayout.build(rule, cand, nq, nk, self.config.block)
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
