"""Talking-heads attention: attention logits and weights mixed across heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from attnlab.core.masks import causal_mask
from attnlab.core.registry import register
from attnlab.core.spec import Spec

from .base import HeadsLayer, check_count, merge_heads, split_heads


@register
class TalkingHeadsAttention(HeadsLayer):
    """Talking-heads attention (Shazeer et al., arXiv:2003.02436, section 4).

    Queries and keys are projected into ``key_heads`` heads and values into
    ``value_heads`` heads. The logits of the key heads, J [B, key_heads, N, M], are mixed
    across heads by a learned [key_heads, heads] matrix before the softmax (P_l), the
    softmax runs over the ``heads`` mixed heads, and its weights are mixed again by a
    [heads, value_heads] matrix (P_w) before they weigh the values. The mixing matrices
    start as identities when the three head counts agree, so the layer starts as
    multi-head attention. Every head's score matrix is formed explicitly (the mixing
    acts on it), so memory is O(N²·heads) rather than SDPA's O(N).

    Masked positions (causal, bottom-right aligned) are set to -inf after the logit
    mixing, so no head sees a masked key; a query with no key to see gets zeros. The
    cache holds the keys and values: key_heads·head_dim + value_heads·head_dim floats
    per token.
    """

    spec = Spec(
        name="talking-heads",
        family="heads",
        title="Talking-heads attention: logits and weights mixed across heads",
        paper="arXiv:2003.02436",
        exact=False,
        decode=True,
        mask=False,
        complexity="O(N²·(dim + heads²)); cache (key_heads + value_heads)·head_dim floats/token",
    )

    @dataclass
    class Config:
        dim: int = 64
        heads: int = 8
        key_heads: int | None = None
        value_heads: int | None = None
        head_dim: int | None = None

    tiny_config: ClassVar[dict[str, Any]] = {
        "dim": 16,
        "heads": 4,
        "key_heads": 3,
        "value_heads": 5,
        "head_dim": 4,
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        cfg = self.config
        self.heads = check_count("heads", cfg.heads)
        self.key_heads = check_count("key_heads", cfg.key_heads or self.heads)
        self.value_heads = check_count("value_heads", cfg.value_heads or self.heads)
        if cfg.head_dim is None:
            check_count("heads", self.heads, divides=cfg.dim, of="dim")
        self.head_dim = check_count("head_dim", cfg.head_dim or cfg.dim // self.heads)
        hd = self.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.key_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.key_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.value_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.value_heads * hd, cfg.dim, bias=False)
        self.logit_mix = nn.Parameter(self._start(self.key_heads, self.heads))  # P_l
        self.weight_mix = nn.Parameter(self._start(self.heads, self.value_heads))  # P_w

    @staticmethod
    def _start(rows: int, cols: int) -> torch.Tensor:
        if rows == cols:
            return torch.eye(rows)
        return torch.randn(rows, cols) / rows**0.5

    def _attend(self, q, k, v, causal: bool) -> torch.Tensor:
        logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * self.head_dim**-0.5
        logits = torch.einsum("bhnm,hg->bgnm", logits, self.logit_mix)
        if causal:
            allowed = causal_mask(q.shape[2], k.shape[2], device=q.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        weights = logits.softmax(dim=-1)
        if causal:
            weights = weights.masked_fill(~allowed, 0.0)  # rows with no key: zeros, not NaN
        weights = torch.einsum("bgnm,gv->bvnm", weights, self.weight_mix)
        return self.o_proj(merge_heads(weights @ v))

    def _project(self, x, source):
        q = split_heads(self.q_proj(x), self.key_heads)
        k = split_heads(self.k_proj(source), self.key_heads)
        v = split_heads(self.v_proj(source), self.value_heads)
        return q, k, v

    def forward(self, x, context=None, causal=False):
        q, k, v = self._project(x, x if context is None else context)
        return self._attend(q, k, v, causal)

    def init_state(self, batch: int, *, dtype=torch.float32, device=None) -> dict:
        """An empty cache: keys [B, key_heads, 0, head_dim], values [B, value_heads, 0,
        head_dim]."""
        hd = self.head_dim
        return {
            "k": torch.zeros(batch, self.key_heads, 0, hd, dtype=dtype, device=device),
            "v": torch.zeros(batch, self.value_heads, 0, hd, dtype=dtype, device=device),
        }

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Causal attention of the new tokens x [B, t, dim] over the cache and themselves."""
        self.check_step(x, state)
        q, k, v = self._project(x, x)
        keys = torch.cat([state["k"], k], dim=2)
        values = torch.cat([state["v"], v], dim=2)
        return self._attend(q, keys, values, True), {"k": keys, "v": values}

    def cache_floats_per_token(self) -> int:
        """Keys of the key heads and values of the value heads:
        (key_heads + value_heads)·head_dim."""
        return (self.key_heads + self.value_heads) * self.head_dim
