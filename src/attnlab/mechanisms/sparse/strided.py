"""Heterogeneous context sharding among heads (S2-Attention, arXiv:2407.17678).

Compared with linxihui/dkernel (get_sparse_attn_mask in dkernel/utils.py, the kernel of
S2-Attention and Phi-3-small): the same causal band of local blocks plus a vertical
stride offset per head, with equal density and, for heads >= stride, equal coverage; it
differs in three details: a head here keeps blocks with (j + h) % stride == stride - 1
where dkernel keeps (j + h·step) % stride == 0, dkernel's step = max(1, stride // heads)
spreads fewer heads than stride over the whole period (here they cover only part of it),
and dkernel gives all query heads of one key/value head the same shard, here each query
head has its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Spec, register
from attnlab.core.blocks import check_backend
from attnlab.core.checks import check_positive_int

from .blocksparse import BlockTableSparse


@register
class Strided(BlockTableSparse):
    """Each head attends its own strided shard of the context; the shards cover it all.

    S2-Attention (Lin et al., "Efficient LLM Training and Serving with
    Heterogeneous Context Sharding among Attention Heads", arXiv:2407.17678),
    its local + vertical-stride pattern at block granularity: query block i
    of head h attends the ``local`` most recent key blocks (|i - j| < local
    without causality) and every key block j with (j + h) % stride ==
    stride - 1. Heads are offset by one block each, so any ``stride``
    consecutive heads together see every block of the context.
    """

    spec = Spec(
        name="strided",
        family="sparse",
        title="Heterogeneous strided context sharding among heads (S2-Attention)",
        paper="arXiv:2407.17678",
        exact=False,
        cross=True,
        complexity="O(N·(N/stride + local·block)·D)",
    )
    tiny_config: ClassVar[dict] = {"local": 1, "stride": 3, "block": 4}
    per_head: ClassVar[bool] = True

    @dataclass
    class Config:
        local: int = 2
        stride: int = 8
        block: int = 128
        backend: str = "auto"

        def __post_init__(self):
            check_positive_int("local", self.local)
            check_positive_int("stride", self.stride)
            check_positive_int("block", self.block)
            check_backend(self.backend)

    def table(self, nq: int, nk: int, causal: bool, heads: int) -> torch.Tensor:
        """Bool [H, Nq/block, Nk/block]: the key blocks of each head's shard and local band."""
        cfg = self.config
        dist, visible, kb = self.block_distances(nq, nk, causal)
        local = dist.abs() < cfg.local
        shard = (kb[None, :] + torch.arange(heads)[:, None]) % cfg.stride == cfg.stride - 1
        return (local[None] | shard[:, None, :]) & visible[None]

    def limit(self, n):
        return dataclasses.replace(self.config, stride=1)
