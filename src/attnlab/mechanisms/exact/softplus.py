"""Length-scaled Softplus attention, with optional re-weighting (Gao et al., arXiv:2501.13428)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.config import option
from attnlab.core.masks import divide_or_zero
from attnlab.core.mechanism import KVCacheDecode
from attnlab.core.tiled import tiled_attention

from ._rows import dense_scores, visible_count

# Rows that see at most this many keys are re-weighted without the offset O:
# the paper zeroes O on the first three rows of a causal sequence, where a
# near-uniform distribution would otherwise be cut to nothing.
_NO_OFFSET_ROWS = 3


@register
class Softplus(KVCacheDecode, Mechanism):
    """LSSA / LSSAR: "Softplus Attention with Re-weighting Boosts Length Extrapolation".

    Gao, Spratling & Gionfrida (arXiv:2501.13428) read softmax as a positive map
    followed by l1 normalisation and replace the map. Normalisation stage
    (LSSA, length-scaled Softplus attention), for query i::

        q̂, k̂ = q/|q|, k/|k|                       (cosine scores in [-1, 1])
        a_ij = softplus(log(D) · log(N_i) · q̂_i·k̂_j)  on the keys i may attend
        A_ij = a_ij / sum_j a_ij

    where N_i is the number of keys query i attends (its row of the paper's
    length matrix N: i+1 for causal self-attention) and D the head dimension;
    ``log N_i`` is the entropy-invariance scale that keeps the distribution's
    sharpness as the context grows. Sharpening stage (re-weighting, LSSAR; on
    with ``Config.reweight``)::

        R_ij = ReLU(A_ij · N_i - O_i) ** p,   out_i = sum_j R_ij v_j / sum_j R_ij

    with O_i = 1, except 0 on rows that see at most three keys (the paper's
    first three causal rows), and power p (``Config.power``; the paper reports
    3 and 15, 15 best for extrapolation). ``scale`` multiplies the logit as a
    temperature relative to the default D^-0.5, which gives the paper's factor
    exactly. A row with nothing to attend (or whose re-weighted row vanishes)
    gives zeros.

    Both stages run on the shared tiled kernel: LSSA as a Softplus weight with
    l1 normalisation; LSSAR as one pass for the row sums sum_j a_ij and a
    second pass that applies the power in log space (``p · log R``) through the
    kernel's online-softmax path, so that large p cannot overflow.
    """

    spec = Spec(
        name="softplus",
        family="exact",
        title="Length-scaled Softplus attention with re-weighting (LSSA/LSSAR)",
        paper="arXiv:2501.13428",
        exact=False,
        decode=True,
        complexity="O(N²·D) (two passes with re-weighting)",
    )
    tiny_config: ClassVar[dict] = {"reweight": True, "power": 3.0, "block_q": 7, "block_k": 5}

    @dataclass
    class Config:
        reweight: bool = False  # LSSAR: sharpen by ReLU(A·N - O)^p and renormalise
        power: float = option(15.0, low=0, low_open=True)  # p of the re-weighting
        block_q: int = 512
        block_k: int = 1024

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qn = F.normalize(q.to(acc), dim=-1)
        kn = F.normalize(k.to(acc), dim=-1)
        counts = visible_count(mask, causal, nq, nk, dtype=acc, device=q.device)
        # log N_i, with rows that see nothing kept finite (they are masked out anyway)
        log_n = counts.clamp_min(1.0).log()
        factor = scale * math.sqrt(d) * math.log(d)
        blocks = {"block_q": self.config.block_q, "block_k": self.config.block_k}

        def length_scaled(s, qs, ks):
            return s * log_n[..., qs, :]

        tiled = dict(scale=factor, causal=causal, mask=mask, score_mod=length_scaled, **blocks)
        if not self.config.reweight:
            out = tiled_attention(qn, kn, v.to(acc), weight=F.softplus, normalise=True, **tiled)
            return out.to(q.dtype)
        ones = kn.new_ones(*kn.shape[:-1], 1)
        row_sum = tiled_attention(qn, kn, ones, weight=F.softplus, normalise=False, **tiled)
        # A_ij · N_i = softplus(...) · (N_i / sum_j a_ij)
        ratio = counts / row_sum.clamp_min(torch.finfo(acc).tiny)
        offset = (counts > _NO_OFFSET_ROWS).to(acc)
        p = float(self.config.power)

        def reweighted_log(s, qs, ks):
            # log of ReLU(A·N - O)^p; exp of it, normalised, is the re-weighted row
            r = F.softplus(s * log_n[..., qs, :]) * ratio[..., qs, :] - offset[..., qs, :]
            positive = r > 0
            return torch.where(positive, p * r.clamp_min(torch.finfo(acc).tiny).log(), -math.inf)

        out = tiled_attention(qn, kn, v.to(acc), **{**tiled, "score_mod": reweighted_log})
        return out.to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The paper's formulas, densely (matrices N and O written out)."""
        d = q.shape[-1]
        qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        cos, allowed, v = dense_scores(qn, kn, v, causal=causal, mask=mask, scale=1.0)
        n = allowed.sum(dim=-1, keepdim=True).to(q.dtype)  # N_i: keys query i attends
        logits = cos * (scale * math.sqrt(d) * math.log(d)) * n.clamp_min(1).log()
        a = F.softplus(logits) * allowed
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
        if self.config.reweight:
            o = (n > _NO_OFFSET_ROWS).to(q.dtype)
            a = torch.relu(a * n - o) ** self.config.power * allowed
            total = a.sum(dim=-1, keepdim=True)
            a = divide_or_zero(a, total)
        return a @ v
