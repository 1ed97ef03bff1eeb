"""Fixed block-sparse attention: local, global and random blocks (BigBird, arXiv:2007.14062).

Compared with google-research/bigbird (bigbird_block_rand_mask_with_head and
full_bigbird_mask in bigbird/core/attention.py): the same block pattern of a sliding
window (the authors' 3 blocks are local=2 here), global blocks and per-head random
blocks drawn outside the window and the global ones; on purpose the global blocks are
only the first global_blocks (the authors also make the last block global), so that the
pattern has a causal form, and the random blocks come from a seeded generator instead of
the authors' per-length plan of where to draw them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Spec, register
from attnlab.core.blocks import StaticBlockSparse, check_backend
from attnlab.core.checks import check_positive_int
from attnlab.core.config import option
from attnlab.core.errors import AttnInputError


def block_table_candidates(table: torch.Tensor) -> torch.Tensor:
    """Candidates [1, Hl, Nq/block, C] from a bool block table [Hl, Nq/block, Nk/block]."""
    count = max(1, int(table.sum(dim=-1).max()))
    order = torch.where(table, 0, 1).argsort(dim=-1, stable=True)[..., :count]
    idx = torch.where(table.gather(-1, order), order, -1)
    return idx[None]


def block_table_rule(table: torch.Tensor, block: int, offset: int, causal: bool):
    """Token rule: query i sees key j when its block pair is in ``table`` (and j <= i + offset)."""
    per_head = table.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        ok = table[h if per_head else 0, q_idx // block, kv_idx // block]
        return ok & (kv_idx <= q_idx + offset) if causal else ok

    return mask_mod


class BlockTableSparse(StaticBlockSparse):
    """A static pattern given as a bool table of (query block, key block) pairs:
    ``table()`` defines it; the token rule and the block candidates follow from it."""

    def table(self, nq: int, nk: int, causal: bool, heads: int) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define table()")

    def block_distances(self, nq: int, nk: int, causal: bool):
        """(dist [Nq/block, Nk/block]: the block of each query block's own (absolute,
        bottom-right) position minus the key block, visible: the pairs causality allows,
        kb: the key block indices)."""
        bs = self.config.block
        nqb, nkb = -(-nq // bs), -(-nk // bs)
        own = (torch.arange(nqb) * bs + (nk - nq)).clamp(min=0) // bs
        kb = torch.arange(nkb)
        dist = own[:, None] - kb[None, :]
        visible = dist >= 0 if causal else torch.ones(nqb, nkb, dtype=torch.bool)
        return dist, visible, kb

    def rule(self, nq, nk, causal, heads, device=None):
        table = self.table(nq, nk, causal, heads).to(device)
        return block_table_rule(table, self.config.block, nk - nq, causal)

    def candidates(self, nq, nk, causal, heads):
        return block_table_candidates(self.table(nq, nk, causal, heads))


@register
class BlockSparse(BlockTableSparse):
    """Block-sparse attention with a fixed pattern of local, global and random blocks.

    After BigBird (Zaheer et al., arXiv:2007.14062) at block granularity,
    blocks of ``block`` tokens, queries aligned bottom-right: query block i
    attends the ``local`` key blocks nearest its own (|i - j| < local; j <= i
    when causal), the first ``global_blocks`` key blocks, and ``random``
    further key blocks drawn per head and query block from a generator seeded
    by ``seed`` (among the visible ones when causal); the first
    ``global_blocks`` query blocks attend every key block. Inside the chosen
    blocks every pair is attended (token-level causality on the diagonal).
    """

    spec = Spec(
        name="blocksparse",
        family="sparse",
        title="Block-sparse attention: local, global and random blocks (BigBird)",
        paper="arXiv:2007.14062",
        exact=False,
        cross=True,
        complexity="O(N·(local+global+random)·block·D)",
    )
    tiny_config: ClassVar[dict] = {"local": 2, "global_blocks": 1, "random": 1, "block": 4}
    per_head: ClassVar[bool] = True

    @dataclass
    class Config:
        local: int = 3
        global_blocks: int = option(1, low=0)
        random: int = option(2, low=0)
        seed: int = option(0, low=0)
        block: int = 128
        backend: str = "auto"

        def __post_init__(self):
            check_positive_int("local", self.local)
            for name in ("global_blocks", "random", "seed"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise AttnInputError(f"{name}: expected an integer >= 0, got {value!r}")
            check_positive_int("block", self.block)
            check_backend(self.backend)

    def table(self, nq: int, nk: int, causal: bool, heads: int) -> torch.Tensor:
        """Bool [H|1, Nq/block, Nk/block]: the key blocks each query block attends."""
        cfg = self.config
        dist, visible, kb = self.block_distances(nq, nk, causal)
        nqb, nkb = dist.shape
        own = dist[:, 0]  # minus key block 0: the own block index
        local = (dist.abs() < cfg.local) & visible
        glob = (kb[None, :] < cfg.global_blocks) | (own[:, None] < cfg.global_blocks)
        fixed = local | (glob & visible)
        if cfg.random == 0:
            return fixed[None]
        gen = torch.Generator().manual_seed(cfg.seed)
        scores = torch.rand(heads, nqb, nkb, generator=gen)
        scores = scores.masked_fill(fixed[None] | ~visible[None], -1.0)
        top = scores.topk(min(cfg.random, nkb), dim=-1)
        chosen = torch.zeros(heads, nqb, nkb, dtype=torch.bool)
        chosen.scatter_(-1, top.indices, top.values >= 0)
        return fixed[None] | chosen

    def layout(self, nq, nk, causal, heads=1, device=None):
        heads = heads if self.config.random else 1
        return super().layout(nq, nk, causal, heads, device)

    def limit(self, n):
        return dataclasses.replace(self.config, local=-(-n // self.config.block) + 1)
