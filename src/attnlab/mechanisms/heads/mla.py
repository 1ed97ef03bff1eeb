"""Multi-head latent attention (MLA) of DeepSeek-V2 and DeepSeek-V3."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from attnlab.core.errors import AttnInputError
from attnlab.core.registry import register
from attnlab.core.spec import Spec

from .base import HeadsLayer, attend, check_count, merge_heads, rotate, split_heads


@register
class MultiHeadLatentAttention(HeadsLayer):
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, section 2.1; as used in
    DeepSeek-V3 and discussed in "Insights into DeepSeek-V3", arXiv:2505.09343).

    Keys and values of every head are up-projections of one compressed latent per token,
    c = RMSNorm(W_DKV x) of width ``kv_rank`` (eqs. 9-11): k_h = W_UK,h c, v_h = W_UV,h c.
    Rotary position embedding cannot pass through that compression, so it is decoupled
    (eqs. 14-19): each head's query gains ``rope_dim`` rotated features from W_QR c_q, and
    every head shares one rotated key of ``rope_dim`` features, W_KR x. Queries are
    compressed too when ``q_rank`` is set (c_q = RMSNorm(W_DQ x), eqs. 12-13). Scores are
    scaled by (nope_dim + rope_dim)^-1/2.

    The full pass computes the per-head keys and values (the training path). Decoding
    caches only c and the shared rotary key, ``kv_rank + rope_dim`` floats per token
    against ``heads·(nope_dim + rope_dim + v_dim)`` for multi-head attention of the same
    head widths (``mha_cache_floats_per_token``), and absorbs the up-projections (section
    2.1.2): W_UK,h is folded into the query (q_h^T W_UK,h c), W_UV,h is applied after the
    attention-weighted sum of latents, so every head attends over the shared latent as in
    multi-query attention with head width ``kv_rank + rope_dim``.

    The RMSNorms on the latents follow the authors' released DeepSeek-V2 model code
    (``kv_a_layernorm``, ``q_a_layernorm``); the paper's equations omit them.
    """

    spec = Spec(
        name="mla",
        family="heads",
        title="Multi-head latent attention: low-rank latent KV cache, decoupled rotary keys",
        paper="arXiv:2405.04434",
        exact=False,
        cross=False,
        decode=True,
        mask=False,
        complexity="O(N²·heads·(nope_dim+rope_dim+v_dim)); cache (kv_rank + rope_dim) floats/token",
    )

    @dataclass
    class Config:
        dim: int = 64
        heads: int = 4
        kv_rank: int = 32
        q_rank: int | None = 48
        nope_dim: int = 16
        rope_dim: int = 8
        v_dim: int = 16

    tiny_config: ClassVar[dict[str, Any]] = {
        "dim": 16,
        "heads": 3,
        "kv_rank": 6,
        "q_rank": 8,
        "nope_dim": 4,
        "rope_dim": 4,
        "v_dim": 5,
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        cfg = self.config
        self.heads = check_count("heads", cfg.heads)
        self.kv_rank = check_count("kv_rank", cfg.kv_rank)
        self.nope_dim = check_count("nope_dim", cfg.nope_dim)
        self.rope_dim = check_count("rope_dim", cfg.rope_dim)
        self.v_dim = check_count("v_dim", cfg.v_dim)
        if self.rope_dim % 2:
            raise AttnInputError(f"rope_dim: rotary needs an even width, got {self.rope_dim}")
        h, dim = self.heads, cfg.dim
        q_width = h * (self.nope_dim + self.rope_dim)
        if cfg.q_rank is None:
            self.q_proj = nn.Linear(dim, q_width, bias=False)
        else:
            rank = check_count("q_rank", cfg.q_rank)
            self.q_proj = nn.Sequential(
                nn.Linear(dim, rank, bias=False),
                nn.RMSNorm(rank),
                nn.Linear(rank, q_width, bias=False),
            )
        self.kv_down = nn.Linear(dim, self.kv_rank, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_rank)
        self.rope_key = nn.Linear(dim, self.rope_dim, bias=False)
        self.key_up = nn.Linear(self.kv_rank, h * self.nope_dim, bias=False)
        self.value_up = nn.Linear(self.kv_rank, h * self.v_dim, bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, dim, bias=False)
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5

    def _queries(self, x: torch.Tensor, offset: int):
        q = split_heads(self.q_proj(x), self.heads)
        return q[..., : self.nope_dim], rotate(q[..., self.nope_dim :], offset)

    def _latents(self, x: torch.Tensor, offset: int):
        latent = self.kv_norm(self.kv_down(x))  # [B, N, kv_rank]
        rope_key = rotate(self.rope_key(x)[:, None], offset)[:, 0]  # [B, N, rope_dim]
        return latent, rope_key

    def forward(self, x, context=None, causal=False):
        q_nope, q_rope = self._queries(x, 0)
        latent, rope_key = self._latents(x, 0)
        k_nope = split_heads(self.key_up(latent), self.heads)
        k_rope = rope_key[:, None].expand(-1, self.heads, -1, -1)
        v = split_heads(self.value_up(latent), self.heads)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        out = attend(q, k, v, causal=causal, scale=self.scale)
        return self.o_proj(merge_heads(out))

    def init_state(self, batch: int, *, dtype=torch.float32, device=None) -> dict:
        """An empty cache: latents [B, 0, kv_rank] and shared rotary keys [B, 0, rope_dim]."""
        return {
            "latent": torch.zeros(batch, 0, self.kv_rank, dtype=dtype, device=device),
            "rope_key": torch.zeros(batch, 0, self.rope_dim, dtype=dtype, device=device),
        }

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Causal attention of the new tokens x [B, t, dim] over the cached latents, with
        the key and value up-projections absorbed (nothing per head is cached or rebuilt)."""
        self.check_step(x, state)
        n = state["latent"].shape[1]
        q_nope, q_rope = self._queries(x, n)
        latent, rope_key = self._latents(x, n)
        latents = torch.cat([state["latent"], latent], dim=1)
        rope_keys = torch.cat([state["rope_key"], rope_key], dim=1)
        key_up = self.key_up.weight.view(self.heads, self.nope_dim, self.kv_rank)
        value_up = self.value_up.weight.view(self.heads, self.v_dim, self.kv_rank)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, key_up)
        q = torch.cat([q_latent, q_rope], dim=-1)
        k = torch.cat([latents, rope_keys], dim=-1)[:, None]  # one head shared by all
        out_latent = attend(q, k, latents[:, None], causal=True, scale=self.scale)
        out = torch.einsum("bhtr,hdr->bhtd", out_latent, value_up)
        return self.o_proj(merge_heads(out)), {"latent": latents, "rope_key": rope_keys}

    def cache_floats_per_token(self) -> int:
        """One latent and one shared rotary key per token: kv_rank + rope_dim."""
        return self.kv_rank + self.rope_dim

    def mha_cache_floats_per_token(self) -> int:
        """The cache of multi-head attention with the same heads and head widths, which
        keeps every head's key (nope_dim + rope_dim) and value (v_dim)."""
        return self.heads * (self.nope_dim + self.rope_dim + self.v_dim)
