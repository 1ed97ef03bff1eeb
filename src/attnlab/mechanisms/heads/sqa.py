"""Sparse query attention: fewer query heads than the head width implies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from attnlab.core.errors import AttnInputError
from attnlab.core.registry import register
from attnlab.core.spec import Spec

from .base import check_count
from .gqa import GroupedHeads


@register
class SparseQueryAttention(GroupedHeads):
    """Sparse query attention (Filipek, arXiv:2510.01817, section 3).

    A layer of ``heads`` heads has head width dim / heads; SQA keeps that width but
    computes only ``query_heads`` < heads query heads, so the score computation costs
    query_heads / heads of multi-head attention's, and the output projection maps
    query_heads·head_dim back to dim. Keys and values have ``kv_heads`` heads shared by
    groups of query heads as in GQA (kv_heads <= query_heads). The paper's symmetric
    variant sSQA is query_heads = kv_heads = heads / 2, its extreme variant xSQA
    query_heads = heads / 4. The cache holds 2·kv_heads·head_dim floats per token.
    """

    spec = Spec(
        name="sqa",
        family="heads",
        title="Sparse query attention: fewer query heads, each of the full head width",
        paper="arXiv:2510.01817",
        exact=False,
        decode=True,
        mask=False,
        complexity="O(N²·query_heads·head_dim); cache 2·kv_heads·head_dim floats/token",
    )

    @dataclass
    class Config:
        dim: int = 64
        heads: int = 8
        query_heads: int = 4
        kv_heads: int = 2
        rotary: bool = False
        bias: bool = False

    tiny_config: ClassVar[dict[str, Any]] = {
        "dim": 16,
        "heads": 4,
        "query_heads": 2,
        "kv_heads": 1,
        "rotary": True,
    }

    def _head_counts(self) -> tuple[int, int, int]:
        cfg = self.config
        heads = check_count("heads", cfg.heads, divides=cfg.dim, of="dim")
        query_heads = check_count("query_heads", cfg.query_heads)
        if query_heads > heads:
            raise AttnInputError(f"query_heads: expected at most heads={heads}, got {query_heads}")
        kv_heads = check_count("kv_heads", cfg.kv_heads, divides=query_heads, of="query_heads")
        return query_heads, kv_heads, cfg.dim // heads

    @property
    def query_heads(self) -> int:
        """The number of query heads computed (``heads`` of the parent class)."""
        return self.heads
