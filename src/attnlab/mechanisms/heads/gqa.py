"""Multi-query and grouped-query attention layers, and the mean-pooling of key/value heads
that turns a trained multi-head (or grouped) layer into one with fewer key/value heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from attnlab.core.errors import AttnInputError
from attnlab.core.registry import register
from attnlab.core.spec import Spec

from .base import HeadsLayer, attend, check_count, merge_heads, rotate, split_heads


def mean_pool_heads(weight: torch.Tensor, heads: int, new_heads: int) -> torch.Tensor:
    """Rows of a projection ``weight`` [heads·d, ...] (or a bias [heads·d]) grouped into
    ``new_heads`` groups of consecutive heads and averaged within each group:
    [new_heads·d, ...]. GQA (arXiv:2305.13245, section 2.1) builds each key and value head
    of the grouped checkpoint as the mean of the original heads of its group."""
    check_count("new_heads", new_heads, divides=heads, of="heads")
    d = weight.shape[0] // heads
    grouped = weight.reshape(new_heads, heads // new_heads, d, *weight.shape[1:])
    return grouped.mean(dim=1).reshape(new_heads * d, *weight.shape[1:])


def _pooled_linear(linear: nn.Linear, heads: int, new_heads: int) -> nn.Linear:
    out = nn.Linear(
        linear.in_features,
        linear.out_features // heads * new_heads,
        bias=linear.bias is not None,
        dtype=linear.weight.dtype,
        device=linear.weight.device,
    )
    with torch.no_grad():
        out.weight.copy_(mean_pool_heads(linear.weight, heads, new_heads))
        if linear.bias is not None:
            out.bias.copy_(mean_pool_heads(linear.bias, heads, new_heads))
    return out


def pool_kv_heads(model: nn.Module, kv_heads: int = 1) -> int:
    """Convert, in place, every attention layer of a Hugging Face Llama-style model
    (modules with ``k_proj``, ``v_proj``, ``head_dim`` and ``num_key_value_groups``, as
    SmolLM2's) to ``kv_heads`` key/value heads by mean-pooling the rows of ``k_proj`` and
    ``v_proj`` per group of heads: GQA's initialisation of uptraining (arXiv:2305.13245,
    section 2.1), here without the uptraining. Returns the number of layers converted.
    The model's config says ``num_key_value_heads = kv_heads`` afterwards.
    """
    config = getattr(model, "config", None)
    layers = [
        m
        for m in model.modules()
        if all(hasattr(m, a) for a in ("k_proj", "v_proj", "head_dim", "num_key_value_groups"))
    ]
    if not layers:
        raise AttnInputError(
            "model: expected attention modules with k_proj, v_proj, head_dim and "
            f"num_key_value_groups (Llama-style), found none in {type(model).__name__}"
        )
    for layer in layers:
        current = layer.k_proj.out_features // layer.head_dim
        check_count("kv_heads", kv_heads, divides=current, of="the layer's key/value heads")
        q_heads = current * layer.num_key_value_groups
        layer.k_proj = _pooled_linear(layer.k_proj, current, kv_heads)
        layer.v_proj = _pooled_linear(layer.v_proj, current, kv_heads)
        layer.num_key_value_groups = q_heads // kv_heads
    if config is not None and hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = kv_heads
    return len(layers)


class GroupedHeads(HeadsLayer):
    """Query heads in ``kv_heads`` groups, each group sharing one key and one value head,
    with a key/value cache for decoding. Subclasses may weight the heads' outputs per token
    before the output projection (``mix_heads``); ``Config.kv_heads`` None means one
    key/value head per query head, a Config without the option means one in all."""

    tiny_config: ClassVar[dict[str, Any]] = {"dim": 16, "heads": 4, "rotary": True}

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        cfg = self.config
        self.heads, self.kv_heads, self.head_dim = self._head_counts()
        if cfg.rotary and self.head_dim % 2:
            raise AttnInputError(f"head_dim: rotary needs an even head width, got {self.head_dim}")
        hd = self.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.heads * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.dim, self.kv_heads * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.dim, self.kv_heads * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(self.heads * hd, cfg.dim, bias=cfg.bias)

    def _head_counts(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, head width) from the Config."""
        cfg = self.config
        heads = check_count("heads", cfg.heads)
        kv_heads = getattr(cfg, "kv_heads", 1)
        kv_heads = check_count(
            "kv_heads", heads if kv_heads is None else kv_heads, divides=heads, of="heads"
        )
        if cfg.head_dim is not None:
            return heads, kv_heads, check_count("head_dim", cfg.head_dim)
        check_count("heads", heads, divides=cfg.dim, of="dim")
        return heads, kv_heads, cfg.dim // heads

    def _project(self, x, source, offset_q: int, offset_k: int):
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.k_proj(source), self.kv_heads)
        v = split_heads(self.v_proj(source), self.kv_heads)
        if self.config.rotary:
            q, k = rotate(q, offset_q), rotate(k, offset_k)
        return q, k, v

    def mix_heads(self, heads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs [B, H, N, head_dim] as they enter the output projection, for
        the query tokens x [B, N, dim]; multi-head attention passes them on unchanged."""
        return heads

    def forward(self, x, context=None, causal=False):
        q, k, v = self._project(x, x if context is None else context, 0, 0)
        return self.o_proj(merge_heads(self.mix_heads(attend(q, k, v, causal=causal), x)))

    def init_state(self, batch: int, *, dtype=torch.float32, device=None) -> dict:
        """An empty cache of keys and values [B, kv_heads, 0, head_dim]."""
        empty = torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=dtype, device=device)
        return {"k": empty, "v": empty.clone()}

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Causal attention of the new tokens x [B, t, dim] over the cache and themselves."""
        self.check_step(x, state)
        n = state["k"].shape[2]
        q, k, v = self._project(x, x, n, n)
        keys = torch.cat([state["k"], k], dim=2)
        values = torch.cat([state["v"], v], dim=2)
        out = self.mix_heads(attend(q, keys, values, causal=True), x)
        return self.o_proj(merge_heads(out)), {"k": keys, "v": values}

    def cache_floats_per_token(self) -> int:
        """One key and one value of ``head_dim`` per key/value head: 2·kv_heads·head_dim."""
        return 2 * self.kv_heads * self.head_dim


class _PlainGroupedHeads(GroupedHeads):
    """Grouped heads summed as in multi-head attention, which mean-pooling can convert."""

    def pooled(self, kv_heads: int) -> GroupedQueryAttention:
        """A grouped-query copy of this layer with ``kv_heads`` key/value heads, each the
        mean of the heads of its group (GQA's uptraining initialisation, arXiv:2305.13245)."""
        check_count("kv_heads", kv_heads, divides=self.kv_heads, of="this layer's kv_heads")
        cfg = self.config
        layer = GroupedQueryAttention(
            dim=cfg.dim,
            heads=self.heads,
            kv_heads=kv_heads,
            head_dim=self.head_dim,
            rotary=cfg.rotary,
            bias=cfg.bias,
        ).to(self.q_proj.weight)
        layer.q_proj.load_state_dict(self.q_proj.state_dict())
        layer.o_proj.load_state_dict(self.o_proj.state_dict())
        layer.k_proj = _pooled_linear(self.k_proj, self.kv_heads, kv_heads)
        layer.v_proj = _pooled_linear(self.v_proj, self.kv_heads, kv_heads)
        return layer.train(self.training)


@register
class GroupedQueryAttention(_PlainGroupedHeads):
    """Grouped-query attention (Ainslie et al., arXiv:2305.13245): ``heads`` query heads in
    ``kv_heads`` groups, the heads of a group sharing one key head and one value head.
    ``kv_heads = heads`` is multi-head attention, ``kv_heads = 1`` multi-query attention.
    The cache holds 2·kv_heads·head_dim floats per token. ``rotary`` applies RoFormer's
    rotary embedding to queries and keys (the papers' layers have none; Llama-family
    models that use GQA do). ``pooled(kv_heads)`` makes fewer key/value heads by
    mean-pooling, the paper's conversion of a multi-head checkpoint."""

    spec = Spec(
        name="gqa",
        family="heads",
        title="Grouped-query attention: groups of query heads share one key/value head",
        paper="arXiv:2305.13245",
        exact=False,
        decode=True,
        mask=False,
        complexity="O(N²·dim); cache 2·kv_heads·head_dim floats/token",
    )

    @dataclass
    class Config:
        dim: int = 64
        heads: int = 8
        kv_heads: int = 2
        head_dim: int | None = None
        rotary: bool = False
        bias: bool = False

    tiny_config: ClassVar[dict[str, Any]] = {"dim": 16, "heads": 4, "kv_heads": 2, "rotary": True}


@register
class MultiQueryAttention(_PlainGroupedHeads):
    """Multi-query attention (Shazeer, "Fast Transformer Decoding: One Write-Head is All
    You Need", arXiv:1911.02150): ``heads`` query heads and output projections as in
    multi-head attention, but a single key head and a single value head shared by all of
    them, so the decode cache holds 2·head_dim floats per token instead of 2·heads·head_dim.
    ``rotary`` as in :class:`GroupedQueryAttention` (the paper has none)."""

    spec = Spec(
        name="mqa",
        family="heads",
        title="Multi-query attention: all query heads share one key/value head",
        paper="arXiv:1911.02150",
        exact=False,
        decode=True,
        mask=False,
        complexity="O(N²·dim); cache 2·head_dim floats/token",
    )

    @dataclass
    class Config:
        dim: int = 64
        heads: int = 8
        head_dim: int | None = None
        rotary: bool = False
        bias: bool = False
