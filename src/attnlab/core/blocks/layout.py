"""Block layouts: which key blocks each query block attends, and the token rule inside.

A :class:`BlockLayout` is planned once per shape and caches what the paths ask of
it: the runs of query blocks that visit as many key blocks (:class:`Run`), the
token masks and additive biases of those runs, and the pairs it allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import sizes

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class BandSplit:
    """A run as a sliding band plus further blocks (see :func:`band_split`).

    Query block c0 + i of the run visits key blocks ``first`` + i ...
    ``first`` + i + ``width`` - 1 under one shared token mask ``bias`` [1, 1,
    bq, width·bk] (None: fully visible), and besides them the fully visible key
    blocks ``extra`` [Bl, Hl, c, E] (E may be 0). Rows with fewer than E further
    blocks are padded with block 0, which ``extra_bias`` [Bl, Hl, c, 1, E·bk]
    hides (-inf; None when no row is padded).
    """

    first: int
    width: int
    bias: torch.Tensor | None
    extra: torch.Tensor
    extra_bias: torch.Tensor | None


@dataclass(frozen=True)
class Run:
    """Query blocks ``c0`` .. ``c1`` - 1 that each visit at most ``used`` key blocks.

    ``plain``: every pair of the run's slots is allowed, so no mask is needed;
    ``seen``: every query of the run has a key to attend (padding queries beyond
    Nq do not count); ``band``: on the band path (:func:`attnlab.core.blocks.band_runs`)
    the run as a sliding band plus further blocks, else None.
    """

    c0: int
    c1: int
    used: int
    plain: bool
    seen: bool
    band: BandSplit | None = None


@dataclass(eq=False)
class BlockLayout:
    """Which key blocks each query block attends, and the token rule inside them.

    ``kv_indices``/``kv_valid``/``kv_full``: [Bl, Hl, Nq/block, S], with Bl in
    {1, B} and Hl in {1, Hq} broadcast over the batch and the query heads.
    A ``mask_mod`` that reads ``b`` or ``h`` must come with a layout built for
    the real batch size or number of heads. Build one with :meth:`build`.
    """

    nq: int
    nk: int
    block: int
    kv_indices: torch.Tensor
    kv_valid: torch.Tensor
    kv_full: torch.Tensor
    mask_mod: MaskMod | None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def q_blocks(self) -> int:
        return -(-self.nq // self.block)

    @property
    def k_blocks(self) -> int:
        return -(-self.nk // self.block)

    @property
    def slots(self) -> int:
        return self.kv_indices.shape[-1]

    @classmethod
    def build(
        cls,
        mask_mod: MaskMod | None,
        candidates: torch.Tensor,
        nq: int,
        nk: int,
        block: int,
    ) -> BlockLayout:
        """The layout from candidate key blocks per query block, refined by ``mask_mod``.

        ``candidates``: long [Bl, Hl, Nq/block, C], key block indices with -1
        for none; a superset of the blocks needed is enough (duplicates are
        dropped). Each candidate is evaluated token by token: blocks where
        ``mask_mod`` allows nothing are dropped, blocks where it allows
        everything are marked full. Cost: one mask evaluation over the
        candidate pairs, never over all N x N.
        """
        nkb = -(-nk // block)
        idx = torch.where(candidates >= 0, candidates, nkb)
        idx, _ = idx.sort(dim=-1)
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
        valid = (idx < nkb) & ~dup
        idx = torch.where(valid, idx, 0)
        raw = cls(nq, nk, block, idx, valid, torch.zeros_like(valid), mask_mod)
        any_, all_ = [], []
        for c0, c1 in raw._chunks(idx.shape[0] * idx.shape[1]):
            allowed = raw.token_mask(c0, c1)
            bl, hl, c, bq, _ = allowed.shape
            allowed = allowed.reshape(bl, hl, c, bq, idx.shape[-1], block)
            any_.append(allowed.any(dim=-1).any(dim=-2))
            all_.append(allowed.all(dim=-1).all(dim=-2))
        keep = torch.cat(any_, dim=2) & valid
        full = torch.cat(all_, dim=2) & keep
        # kept blocks first, in increasing key order; where the rule differs per
        # batch or head, fully visible blocks come before partial ones, so that
        # rows with the same partial pattern share one token mask across heads
        rank = torch.where(keep, idx, 2 * nkb + idx)
        if idx.shape[0] * idx.shape[1] > 1:
            rank = rank + torch.where(keep & ~full, nkb, 0)
        order = rank.argsort(dim=-1)
        count = max(1, int(keep.sum(dim=-1).max()))
        order = order[..., :count]
        return cls(
            nq,
            nk,
            block,
            idx.gather(-1, order),
            keep.gather(-1, order),
            full.gather(-1, order),
            mask_mod,
        )

    def _chunks(self, batch_heads: int) -> list[tuple[int, int]]:
        """Query-block ranges whose gathered scores (or token masks, for the layout's
        own batch x heads) hold at most ``sizes.CHUNK_ELEMENTS`` elements."""
        per_block = batch_heads * self.block * self.slots * self.block
        step = max(1, sizes.CHUNK_ELEMENTS // max(per_block, 1))
        return [(c0, min(c0 + step, self.q_blocks)) for c0 in range(0, self.q_blocks, step)]

    def _run_chunks(self, count: list[int], batch_heads: int) -> list[tuple[int, int]]:
        """Query-block ranges whose gathered scores (``count`` key blocks per query
        block) hold at most ``sizes.CHUNK_ELEMENTS`` elements; one wide row (a global
        query block attending everything) does not shorten the others' chunks."""
        per_slot = batch_heads * self.block * self.block
        out, start, width = [], 0, 0
        for c in range(self.q_blocks):
            width = max(width, count[c])
            if c > start and per_slot * width * (c - start + 1) > sizes.CHUNK_ELEMENTS:
                out.append((start, c))
                start, width = c, count[c]
        out.append((start, self.q_blocks))
        return out

    def runs(self, batch_heads: int) -> list[Run]:
        """Chunks of query blocks, each visiting at most ``Run.used`` key blocks (cached).

        Valid slots come first in every row, so a chunk only gathers the slots
        that some query block of it uses: border blocks that see more keys do
        not make every other block pay for padding.
        """

        def make():
            count = self.kv_valid.sum(dim=-1).amax(dim=(0, 1)).clamp(min=1).tolist()
            # rows whose first key block is one further than the previous row's
            # (a sliding band) are kept apart from the others
            first = self.kv_indices[..., 0].amax(dim=(0, 1))
            slide = [False, *(first[1:] == first[:-1] + 1).tolist()]
            out = []
            for c0, c1 in self._run_chunks(count, batch_heads):
                start = c0
                for c in range(c0 + 1, c1 + 1):
                    if (
                        c == c1
                        or count[c] != count[start]
                        or (c > start + 1 and slide[c] != slide[c - 1])
                    ):
                        used = int(max(count[start:c]))
                        plain = bool(self.kv_full[:, :, start:c, :used].all())
                        # per run: the whole token mask is built only where a path needs it
                        sees = self.token_mask(start, c).any(dim=-1, keepdim=True)
                        seen = bool(self.real_rows(sees, start).all())
                        out.append(Run(start, c, used, plain, seen))
                        start = c
            return out

        return self.cached(f"runs-{batch_heads}", make)

    def real_rows(self, x: torch.Tensor, c0: int) -> torch.Tensor:
        """[Bl, Hl, c·bq, *] rows of x [Bl, Hl, c, bq, *] (query blocks from c0) that are
        real queries, not padding beyond Nq."""
        return x.flatten(2, 3)[:, :, : self.nq - c0 * self.block]

    def positions(self, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query positions [c, bq, 1] and gathered key positions [Bl, Hl, c, 1, S*bk]."""
        device = self.kv_indices.device
        ar = torch.arange(self.block, device=device)
        qpos = (torch.arange(c0, c1, device=device)[:, None] * self.block + ar)[..., None]
        kpos = self.kv_indices[:, :, c0:c1, :, None] * self.block + ar
        bl, hl = kpos.shape[:2]
        return qpos, kpos.reshape(bl, hl, c1 - c0, 1, -1)

    def token_mask(self, c0: int, c1: int) -> torch.Tensor:
        """Bool [Bl, Hl, c, bq, S*bk]: which gathered pairs of query blocks c0..c1 are allowed.

        Padded queries and keys (beyond Nq, Nk) and padding slots are never allowed.
        """
        qpos, kpos = self.positions(c0, c1)
        valid = self.kv_valid[:, :, c0:c1, :, None].expand(-1, -1, -1, -1, self.block)
        valid = valid.reshape(valid.shape[0], valid.shape[1], c1 - c0, 1, -1)
        return self.allowed_at(qpos, kpos) & valid

    def allowed_at(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Bool [Bl, Hl, c, bq, K]: the token rule at query positions [c, bq, 1] and key
        positions [Bl|1, Hl|1, c, 1, K]; padded queries and keys are never allowed."""
        allowed = (qpos < self.nq) & (kpos < self.nk)
        if self.mask_mod is not None:
            bl, hl = self.kv_indices.shape[:2]
            device = self.kv_indices.device
            b = torch.arange(bl, device=device).view(bl, 1, 1, 1, 1)
            h = torch.arange(hl, device=device).view(1, hl, 1, 1, 1)
            rule = self.mask_mod(b, h, qpos.clamp(max=self.nq - 1), kpos.clamp(max=self.nk - 1))
            allowed = allowed & rule
        shape = torch.broadcast_shapes(allowed.shape, (1, 1, qpos.shape[0], self.block, 1))
        return allowed.expand(shape)

    def cached(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` computed once per layout under ``name``."""
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def allowed(self) -> torch.Tensor:
        """The whole token mask [Bl, Hl, Nq/block, bq, S*bk], computed once per layout.

        Kept as [1, 1, ...] when it is the same for every batch entry and head.
        """

        def make():
            whole = torch.cat([self.token_mask(a, b) for a, b in self._chunks(1)], dim=2)
            if whole.shape[0] * whole.shape[1] > 1 and bool((whole == whole[:1, :1]).all()):
                return whole[:1, :1].clone()
            return whole

        return self.cached("allowed", make)

    def run_bias(self, c0: int, c1: int, used: int, dtype: torch.dtype):
        """(bias [Bl, Hl, c, bq, used·bk] (0 allowed, -inf not), seen [Bl, Hl, c, bq, 1]: the
        queries that have a key) of query blocks c0..c1, cached per run and dtype; kept as
        [1, 1, ...] when the same for every batch entry and head. Only the runs that need
        a bias build one (a whole-layout bias was several times the N x N scores' size)."""

        def make():
            allowed = self.token_mask(c0, c1)[..., : used * self.block]
            if allowed.shape[0] * allowed.shape[1] > 1 and bool((allowed == allowed[:1, :1]).all()):
                allowed = allowed[:1, :1]
            return additive_bias(allowed, dtype)

        return self.cached(f"run-bias-{c0}-{c1}-{used}-{dtype}", make)

    def shared_bias(self, c0: int, c1: int, used: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Bias [1, 1, bq, used*bk] when every batch entry, head and query block of
        c0..c1 has the same token mask and every query sees a key, else None (cached)."""

        def make():
            allowed = self.token_mask(c0, c1)[..., : used * self.block]
            first = allowed[:1, :1, :1]
            if not bool((allowed == first).all()) or not bool(first.any(dim=-1).all()):
                return None
            return additive_bias(first[0], dtype)[0]

        return self.cached(f"shared-{c0}-{c1}-{used}-{dtype}", make)

    def pairs(self) -> float:
        """Allowed (query, key) pairs, averaged over the layout's batch and heads."""

        def make():
            bl, hl = self.kv_indices.shape[:2]
            total = sum(int(self.token_mask(a, b).sum()) for a, b in self._chunks(bl * hl))
            return total / (bl * hl)

        return self.cached("pairs", make)

    def density(self) -> float:
        """Allowed pairs over all Nq x Nk pairs (full causal attention has (N+1)/2N)."""
        return self.pairs() / (self.nq * self.nk)


def ranges_to_candidates(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Candidate key blocks ``lo <= j < hi`` per query block as [..., C] with -1 padding."""
    width = max(1, int((hi - lo).max()))
    idx = lo[..., None] + torch.arange(width, device=lo.device)
    return torch.where(idx < hi[..., None], idx, -1)


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive score bias (0 or -inf) and the rows that see a key.

    A row that sees nothing gets a zero bias (a harmless uniform softmax, never
    NaN); its output is multiplied by ``seen`` = 0 afterwards.
    """
    seen = allowed.any(dim=-1, keepdim=True)
    blocked = ~allowed & seen
    bias = torch.zeros(blocked.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(blocked, float("-inf")), seen
