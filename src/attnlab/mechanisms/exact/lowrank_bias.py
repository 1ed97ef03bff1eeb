"""Attention with a low-rank additive bias, computed as in FlashBias (arXiv:2505.12044).

Compared with thuml/FlashBias (FlashBiasFunc in flash_bias/flash_bias_triton.py,
attention_torch in flash_bias/attention_func.py): the same decomposition, bias factors
q_bias [Nq, R] and k_bias [Nk, R] joined to the scaled scores inside one exact kernel,
shared over batch and optionally over heads; the authors receive the factors from the
model (or its SVD) as inputs, where attnlab holds them as learned per-position
parameters, because the operator's contract carries only q, k and v.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv
from attnlab.core.mechanism import KVCacheDecode
from attnlab.core.tiled import tiled_attention

from ._rows import dense_scores, masked_softmax
from .softmax import Softmax


@register
class LowRankBias(KVCacheDecode, Mechanism):
    """softmax(q kᵀ · scale + U Wᵀ) v with the bias never materialised: FlashBias.

    "FlashBias: Fast Computation of Attention with Bias" (Wu et al.,
    arXiv:2505.12044): a bias of rank R, ``b_ij = u_i · w_j``, joins the scores
    by widening queries and keys, ``q'_i = [q_i · scale, u_i]`` and
    ``k'_j = [k_j, w_j]``, so that ``q'_i · k'_j = q_i · k_j · scale + b_ij``
    and any fast exact kernel (here torch SDPA, or the shared tiled kernel with
    ``backend="tiled"``) computes biased attention at the cost of D + R
    dimensions instead of an N x N bias read (Sec. 3-4, exact decomposition).
    A general bias is approximated by its truncated SVD (the paper's SVD
    decomposition): :meth:`from_bias`.

    The factors are learned per position: ``query_factors`` and
    ``key_factors``, [heads, max_len, R] (heads = 1 shares one bias across all
    heads). Keys take positions 0..Nk-1 and queries the last Nq of them
    (bottom-right, as attnlab's causal convention), so a cached decode step
    sees the same bias as the parallel pass. Query factors start
    N(0, 1/R) and key factors N(0, init_std²), so the initial bias entries
    have standard deviation ``init_std``; with the default 0 an untrained
    mechanism is exact softmax attention (:meth:`limit`), and gradients still
    reach the key factors through the query factors.
    """

    spec = Spec(
        name="lowrank-bias",
        family="exact",
        title="Low-rank attention bias via widened q/k (FlashBias)",
        paper="arXiv:2505.12044",
        exact=False,
        decode=True,
        complexity="O(N²·(D+R))",
    )
    backends: ClassVar[tuple[str, ...]] = ("sdpa", "tiled")
    tiny_config: ClassVar[dict] = {
        "rank": 3,
        "max_len": 32,
        "init_std": 0.7,
        "block_q": 7,
        "block_k": 5,
    }

    @dataclass
    class Config:
        rank: int = 16  # R
        max_len: int = 4096  # positions with learned factors
        heads: int = 1  # 1: one bias shared by all heads; else Hq
        init_std: float = option(0.0, low=0)  # std of the initial bias entries
        backend: str = "sdpa"  # sdpa: torch's fused kernels; tiled: the shared tiled kernel
        block_q: int = 512
        block_k: int = 1024

    def __init__(self, **config):
        super().__init__(**config)
        cfg = self.config
        shape = (cfg.heads, cfg.max_len, cfg.rank)
        self.query_factors = nn.Parameter(torch.randn(shape) * cfg.rank**-0.5)
        self.key_factors = nn.Parameter(torch.randn(shape) * cfg.init_std)
        self._sdpa = Softmax()

    @classmethod
    def from_bias(cls, bias: torch.Tensor, rank: int, **config) -> LowRankBias:
        """The mechanism whose bias is the best rank-``rank`` approximation of ``bias``.

        ``bias`` is [L, L] (one bias for all heads) or [H, L, L] (one per query
        head), rows = query positions, columns = key positions 0..L-1. The
        factors are ``U_R sqrt(S_R)`` and ``V_R sqrt(S_R)`` of its SVD (the
        paper's SVD decomposition), exact when ``bias`` has rank <= ``rank``.
        """
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise AttnInputError(f"bias: expected a floating torch.Tensor, got {bias!r:.80}")
        if bias.dim() not in (2, 3) or bias.shape[-1] != bias.shape[-2]:
            raise AttnInputError(
                f"bias: expected a square [L, L] or [H, L, L] tensor, got shape {tuple(bias.shape)}"
            )
        check_positive_int("rank", rank)
        length = bias.shape[-1]
        if rank > length:
            raise AttnInputError(f"rank: expected at most L={length}, got {rank}")
        b3 = bias if bias.dim() == 3 else bias[None]
        u, s, vh = torch.linalg.svd(b3.double())
        root = s[:, :rank].sqrt()[:, None, :]
        mech = cls(**{**config, "rank": rank, "max_len": length, "heads": b3.shape[0]})
        with torch.no_grad():
            mech.query_factors.copy_(u[..., :rank] * root)
            mech.key_factors.copy_(vh[:, :rank].transpose(-1, -2) * root)
        return mech

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        nq, nk, hq = q.shape[2], k.shape[2], q.shape[1]
        if nk > self.config.max_len:
            reasons.append(
                f"k: expected Nk <= max_len={self.config.max_len} (positions with bias "
                f"factors), got Nk={nk}"
            )
        if nq > nk:
            reasons.append(
                f"q: expected Nq <= Nk (queries take the last Nq of the Nk key positions), "
                f"got Nq={nq}, Nk={nk}"
            )
        if self.config.heads not in (1, hq):
            reasons.append(
                f"q: expected Hq={self.config.heads} heads (the bias factors' heads), got Hq={hq}"
            )
        return reasons

    def limit(self, n):
        """Zero key factors: the bias vanishes and the output is softmax attention."""
        return dataclasses.replace(self.config, init_std=0.0, max_len=max(self.config.max_len, n))

    def factors(self, nq: int, nk: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [heads, Nq, R], W [heads, Nk, R]) for queries at the last Nq key positions."""
        u = self.query_factors[:, nk - nq : nk].to(dtype)
        w = self.key_factors[:, :nk].to(dtype)
        return u, w

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        b, hq, nq, _ = q.shape
        nk = k.shape[2]
        u, w = self.factors(nq, nk, q.dtype)
        if self.config.heads != 1 and k.shape[1] != hq:
            # per-head key factors: each query head needs its own widened keys
            groups = hq // k.shape[1]
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        hk = k.shape[1]
        q2 = torch.cat([q * scale, u.expand(b, hq, nq, -1)], dim=-1)
        k2 = torch.cat([k, w.expand(b, hk, nk, -1)], dim=-1)
        if self.config.backend == "sdpa":
            return self._sdpa.forward(q2, k2, v, causal=causal, mask=mask, scale=1.0)
        return tiled_attention(
            q2,
            k2,
            v,
            scale=1.0,
            causal=causal,
            mask=mask,
            block_q=self.config.block_q,
            block_k=self.config.block_k,
        )

    def reference(self, q, k, v, *, causal, mask, scale):
        """softmax(q kᵀ · scale + U Wᵀ) v densely, the bias written out as a matrix."""
        scores, allowed, v = dense_scores(q, k, v, causal=causal, mask=mask, scale=scale)
        u, w = self.factors(q.shape[2], k.shape[2], q.dtype)
        return masked_softmax(scores + u @ w.transpose(-1, -2), allowed) @ v
