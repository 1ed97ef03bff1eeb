"""Heterogeneous context sharding among heads (S2-Attention, arXiv:2407.17678)."""

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
