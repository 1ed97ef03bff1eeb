"""Block-sparse attention: one layout, two paths, one answer.

A :class:`BlockLayout` says, for every query block of ``block`` queries, which
key blocks it attends (``kv_indices``, padded slots flagged by ``kv_valid``),
which of those are fully visible (``kv_full``), and a token rule ``mask_mod``
for the pairs inside partially visible blocks. ``mask_mod(b, h, q_idx, kv_idx)``
follows the FlexAttention convention (Dong et al., "Flex Attention: A
Programming Model for Generating Optimized Attention Kernels",
arXiv:2412.05496): it returns True where query ``q_idx`` may attend key
``kv_idx``, and it is written with broadcasting tensor operations only, so
that the same function serves both paths.

- :func:`torch_block_attention`: plain PyTorch, trainable. Each query block
  gathers its key and value blocks (sliding bands of consecutive blocks are
  read in place through strided views) and attends them with the fused
  ``scaled_dot_product_attention`` (batched matmul, online softmax, a
  backward on every device), the token mask as an additive bias; small
  chunks use explicit matmuls. With gradients on CPU (no user mask, equal
  key and value widths) one autograd function computes it piece by piece
  with the fused flash kernel's forward and backward (:class:`_BlockPieces`).
  It never builds an N x N tensor: scores exist only for the gathered blocks.
- :func:`flex_block_attention`: ``torch.nn.attention.flex_attention`` compiled
  by ``torch.compile`` with a ``BlockMask`` built from the same layout (cached
  on the layout; below ``FLEX_COMPILE_MIN_PAIRS`` it runs uncompiled).
  Inference only on CPU, where FlexAttention has no backward.
- :func:`block_sparse_attention` picks the path (``"auto"``, see
  :func:`choose_path`): the trainable one when gradients flow, the dtype has
  no flex kernel, the shape is small, or on CPU where it is the faster one;
  flex on GPUs for large shapes.

:class:`StaticBlockSparse` turns a fixed mask (window, neighborhood, fixed
block patterns, ...) into a registered mechanism with both paths, a layout
cache, ``density`` and KV-cache decoding.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .checks import FLOAT_DTYPES
from .mechanism import KVCacheDecode, Mechanism

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

PATHS = ("auto", "torch", "flex")
# dtypes that FlexAttention's CPU kernel computes in
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "auto" uses flex on these devices, from this many (query, key) pairs of full
# attention upwards; below it the compiled kernel's fixed costs exceed what it saves
FLEX_FAST_DEVICES = ("cuda",)
FLEX_MIN_PAIRS = 1024 * 1024
# below this many padded (query, key) pairs the flex path runs FlexAttention
# uncompiled: compiling one kernel costs far longer than such a call
FLEX_COMPILE_MIN_PAIRS = 64 * 64
# score elements from which a chunk goes to the fused SDPA kernel
_FUSED_MIN_ELEMENTS = 1 << 16
# elements of one gathered score chunk in the trainable path
_CHUNK_ELEMENTS = 1 << 24
# bytes of gathered keys and values per piece (inference): below glibc's 32 MiB mmap
# threshold the allocator reuses them (larger ones are page-faulted afresh on every
# call); fewer, larger SDPA calls measured faster (blocksparse at N=16384: 8 MiB best,
# 16 MiB and head-by-head pieces within noise of it, 1 MiB clearly slower)
_GATHER_BYTES = 1 << 23
# the band + gathered-blocks path (inference): bytes of band output per call, and of
# gathered further keys and values per piece (blocksparse at N=16384, side by side:
# 16 MiB pieces ~8% faster than 8 MiB; band pieces of 4, 8 or 16 MiB within noise)
_BAND_BYTES = 1 << 23
_BAND_GATHER_BYTES = 1 << 24
# keys and values per piece of the trainable (gradient) path, whose backward's key and
# value gradients per piece are as large
_GRAD_BYTES = 1 << 23


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
        own batch x heads) hold at most ~16M elements."""
        per_block = batch_heads * self.block * self.slots * self.block
        step = max(1, _CHUNK_ELEMENTS // max(per_block, 1))
        return [(c0, min(c0 + step, self.q_blocks)) for c0 in range(0, self.q_blocks, step)]

    def _run_chunks(self, count: list[int], batch_heads: int) -> list[tuple[int, int]]:
        """Query-block ranges whose gathered scores (``count`` key blocks per query
        block) hold at most ~16M elements; one wide row (a global query block
        attending everything) does not shorten the others' chunks."""
        per_slot = batch_heads * self.block * self.block
        out, start, width = [], 0, 0
        for c in range(self.q_blocks):
            width = max(width, count[c])
            if c > start and per_slot * width * (c - start + 1) > _CHUNK_ELEMENTS:
                out.append((start, c))
                start, width = c, count[c]
        out.append((start, self.q_blocks))
        return out

    def runs(self, batch_heads: int) -> list[tuple[int, int, int, bool, bool]]:
        """(c0, c1, slots, plain, seen): chunks of query blocks visiting at most ``slots`` blocks.

        Valid slots come first in every row, so a chunk only gathers the slots
        that some query block of it uses: border blocks that see more keys do
        not make every other block pay for padding. ``plain``: every pair of
        the chunk's slots is allowed, so no mask is needed; ``seen``: every
        query of the chunk has a key to attend (padding queries beyond Nq are
        dropped from the output and do not count).
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
                        seen = bool(self._real(sees, start).all())
                        out.append((start, c, used, plain, seen))
                        start = c
            return out

        return self._cached(f"runs-{batch_heads}", make)

    def band_runs(self, batch_heads: int, dtype: torch.dtype, min_elements: int = 0):
        """[(c0, c1, slots, plain, seen, band)]: :meth:`runs` with the :meth:`band_split`
        of each run that is no sliding band, where every query sees a key and whose
        scores hold at least ``min_elements`` (else None); consecutive runs whose bands
        continue each other are joined (cached). The band path computes in pieces of
        bounded size, so it needs no per-run memory bound; fewer, longer runs measured
        faster."""

        def make():
            out = []
            for r0, r1, used, plain, seen in self.runs(batch_heads):
                band = None
                large = batch_heads * (r1 - r0) * self.block**2 * used >= min_elements
                if seen and large and self.sliding_start(r0, r1, used) is None:
                    band = self.band_split(r0, r1, used, dtype)
                joined = _join_bands(out[-1], (r0, r1, used, band)) if out else None
                if joined is not None:
                    out[-1] = (out[-1][0], r1, used, out[-1][3] and plain, True, joined)
                else:
                    out.append((r0, r1, used, plain, seen, band))
            return out

        return self._cached(f"band-runs-{batch_heads}-{dtype}-{min_elements}", make)

    def sliding_start(self, c0: int, c1: int, used: int) -> int | None:
        """The first key block of query block c0 when blocks c0..c1 visit consecutive key
        blocks, one further per query block (a sliding band), else None (cached)."""

        def make():
            if self.kv_indices.shape[:2] != (1, 1) or not bool(
                self.kv_valid[..., c0:c1, :used].all()
            ):
                return None
            idx = self.kv_indices[0, 0, c0:c1, :used]
            start = int(idx[0, 0])
            rows = torch.arange(c1 - c0, device=idx.device)[:, None]
            band = start + rows + torch.arange(used, device=idx.device)
            if start + (c1 - c0 - 1) + used > self.k_blocks or not torch.equal(idx, band):
                return None
            return start

        return self._cached(f"sliding-{c0}-{c1}-{used}", make)

    def band_split(self, c0: int, c1: int, used: int, dtype: torch.dtype):
        """A run as a sliding band plus further blocks, or None (cached).

        ``(first, width, bias, extra, extra_bias)`` when every batch entry and
        head of query block c0 + i visits the consecutive key blocks first + i
        ... first + i + width - 1 under one shared token mask (``bias`` [1, 1, bq,
        width·bk], None when fully visible) in which every query sees a key, and
        besides them fully visible key blocks: ``extra`` [Bl, Hl, c, E] (E may be
        0). Rows with fewer than E of them (heads that visit different numbers
        of blocks) are padded with block 0, which ``extra_bias`` [Bl, Hl, c, 1,
        E·bk] hides (-inf; None when no row is padded); every row has at least
        one real further block when E > 0.
        """

        def make():
            idx = self.kv_indices[..., c0:c1, :used]
            valid = self.kv_valid[..., c0:c1, :used]
            rows = torch.arange(c0, c1, device=idx.device)[:, None]
            off = idx - rows
            lo, hi = int(off[valid].min()), int(off[valid].max())
            span = hi - lo + 1
            present = torch.zeros(*off.shape[:-1], span + 1, dtype=torch.bool, device=idx.device)
            present.scatter_(-1, torch.where(valid, off - lo, span), True)
            common = present[..., :span].flatten(0, 2).all(dim=0)
            # the longest run of consecutive offsets that every row and head visits
            best, width, run = 0, 0, 0
            for d, ok in enumerate(common.tolist()):
                run = run + 1 if ok else 0
                if run > width:
                    best, width = d - run + 1, run
            if width == 0:
                return None
            d0 = lo + best
            rest = valid & ~((off >= d0) & (off < d0 + width))
            count = rest.sum(dim=-1)
            e = int(count.max())
            if e > 0 and int(count.min()) == 0:
                return None
            order = torch.where(rest, 0, 1).argsort(dim=-1, stable=True)[..., :e]
            real = rest.gather(-1, order)
            extra = torch.where(real, idx.gather(-1, order), 0)
            qpos, _ = self.positions(c0, c1)
            ar = torch.arange(self.block, device=idx.device)
            kpos = (extra[..., None] * self.block + ar).flatten(-2)[..., None, :]
            hidden = ~real[..., None].expand(*real.shape, self.block).flatten(-2)[..., None, :]
            if not bool(self._real(self._allowed_at(qpos, kpos) | hidden, c0).all()):
                return None
            extra_bias = None
            if not bool(real.all()):
                extra_bias = torch.zeros(hidden.shape, dtype=dtype, device=idx.device)
                extra_bias.masked_fill_(hidden, float("-inf"))
            ar = torch.arange(width * self.block, device=idx.device)
            kpos = ((rows + d0) * self.block + ar)[None, None, :, None, :]
            allowed = self._allowed_at(qpos, kpos)
            first = allowed[:1, :1, :1]
            same = self._real(allowed == first, c0)
            if not bool(same.all()) or not bool(first.any(dim=-1).all()):
                return None
            bias = None if bool(first.all()) else _bias(first[0], dtype)[0]
            return c0 + d0, width, bias, extra, extra_bias

        return self._cached(f"band-{c0}-{c1}-{used}-{dtype}", make)

    def _real(self, x: torch.Tensor, c0: int) -> torch.Tensor:
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
        return self._allowed_at(qpos, kpos) & valid

    def _allowed_at(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
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

    def _cached(self, name: str, make: Callable[[], Any]) -> Any:
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

        return self._cached("allowed", make)

    def run_bias(self, c0: int, c1: int, used: int, dtype: torch.dtype):
        """(bias [Bl, Hl, c, bq, used·bk] (0 allowed, -inf not), seen [Bl, Hl, c, bq, 1]: the
        queries that have a key) of query blocks c0..c1, cached per run and dtype; kept as
        [1, 1, ...] when the same for every batch entry and head. Only the runs that need
        a bias build one (a whole-layout bias was several times the N x N scores' size)."""

        def make():
            allowed = self.token_mask(c0, c1)[..., : used * self.block]
            if allowed.shape[0] * allowed.shape[1] > 1 and bool((allowed == allowed[:1, :1]).all()):
                allowed = allowed[:1, :1]
            return _bias(allowed, dtype)

        return self._cached(f"run-bias-{c0}-{c1}-{used}-{dtype}", make)

    def shared_bias(self, c0: int, c1: int, used: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Bias [1, 1, bq, used*bk] when every batch entry, head and query block of
        c0..c1 has the same token mask and every query sees a key, else None (cached)."""

        def make():
            allowed = self.token_mask(c0, c1)[..., : used * self.block]
            first = allowed[:1, :1, :1]
            if not bool((allowed == first).all()) or not bool(first.any(dim=-1).all()):
                return None
            return _bias(first[0], dtype)[0]

        return self._cached(f"shared-{c0}-{c1}-{used}-{dtype}", make)

    def pairs(self) -> float:
        """Allowed (query, key) pairs, averaged over the layout's batch and heads."""
        if "pairs" not in self._cache:
            bl, hl = self.kv_indices.shape[:2]
            total = sum(int(self.token_mask(a, b).sum()) for a, b in self._chunks(bl * hl))
            self._cache["pairs"] = total / (bl * hl)
        return self._cache["pairs"]

    def block_pairs(self) -> float:
        """Pairs inside the visited blocks (the work done), averaged over batch and heads."""
        bl, hl = self.kv_indices.shape[:2]
        return int(self.kv_valid.sum()) * self.block * self.block / (bl * hl)

    def density(self) -> float:
        """Allowed pairs over all Nq x Nk pairs (full causal attention has (N+1)/2N)."""
        return self.pairs() / (self.nq * self.nk)


def ranges_to_candidates(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Candidate key blocks ``lo <= j < hi`` per query block as [..., C] with -1 padding."""
    width = max(1, int((hi - lo).max()))
    idx = lo[..., None] + torch.arange(width, device=lo.device)
    return torch.where(idx < hi[..., None], idx, -1)


def _pad_to(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[2] == n:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


def _user_mask_at(mask: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, nq: int, nk: int):
    """The user's [B|1, H|1, Nq|1, Nk|1] mask at gathered positions (b, h, q, k)."""
    bm, hm, qm, km = mask.shape
    b = torch.arange(bm, device=mask.device).view(bm, 1, 1, 1, 1)
    h = torch.arange(hm, device=mask.device).view(1, hm, 1, 1, 1)
    q = qpos.clamp(max=nq - 1) if qm > 1 else torch.zeros_like(qpos)
    k = kpos.clamp(max=nk - 1) if km > 1 else torch.zeros_like(kpos)
    return mask[b, h, q, k]


def torch_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse softmax attention in plain PyTorch (the trainable path).

    For a chunk of query blocks, the listed key and value blocks are gathered
    into [B, H, c, S*block, D] and each query block attends its gathered keys
    with ``scaled_dot_product_attention`` (batched matmul with an online
    softmax, fused; it has a backward on every device), the token mask and
    the user's mask entering as an additive -inf bias. Rows that see nothing
    give zeros. Half precision accumulates in float32 inside the kernel.

    Where every query block of a run has the same token mask, one
    [bq, S*bk] bias serves them all. Without gradients the results are
    written into one preallocated output, and gathers are cut into pieces
    of about ``_GATHER_BYTES``, small enough for the allocator to reuse (a
    fresh large buffer is page-faulted on first touch). With gradients on CPU
    (no user mask, equal key and value widths) :class:`_BlockPieces` computes
    it: the fused flash kernel's forward and backward per piece, whose key and
    value gradients it adds back into their blocks (autograd's backward of the
    overlapping band views was several times slower than the attention's).
    """
    b, hq, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    bs, nqb, nkb = layout.block, layout.q_blocks, layout.k_blocks
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and mask is None and _lse_kernel(q, k, v):
        forward, backward = _grad_pieces(layout, b, hq, hkv, k.shape[-1], q.dtype)
        return _BlockPieces.apply(q, k, v, forward, backward, bs, scale)
    qb = _pad_to(q, nqb * bs).unflatten(2, (nqb, bs))
    kb = _pad_to(k, nkb * bs).unflatten(2, (nkb, bs))
    vb = _pad_to(v, nkb * bs).unflatten(2, (nkb, bs))
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    hi = (torch.arange(hq, device=q.device) // (hq // hkv)).view(1, hq, 1, 1)
    out = None if grad else q.new_empty(b, hq, nqb, bs, dv)
    outs = []
    row_bytes = b * hq * bs * (k.shape[-1] + dv) * k.element_size()
    lse = out is not None and mask is None and hq == hkv and _lse_kernel(q, k, v)
    if lse:
        runs = layout.band_runs(b * hq, q.dtype, _FUSED_MIN_ELEMENTS)
    else:
        runs = [(*run, None) for run in layout.runs(b * hq)]
    for r0, r1, used, plain, all_seen, band in runs:
        plain = plain and mask is None
        if band is not None:
            if kb.stride()[2:] != (bs * kb.shape[-1], kb.shape[-1], 1):
                kb = kb.contiguous()
            if vb.stride()[2:] != (bs * dv, dv, 1):
                vb = vb.contiguous()
            rows = (bi * hkv + hi) * nkb
            _band_and_extras(qb, kb, vb, out, r0, r1, band, rows, row_bytes, scale)
            continue
        start = layout.sliding_start(r0, r1, used) if hq == hkv else None
        step = r1 - r0
        if start is None and out is not None:
            # gathered pieces only without gradients: with them autograd keeps every piece
            step = max(1, _GATHER_BYTES // (row_bytes * used))
        shared = None
        if not plain and mask is None:
            shared = layout.shared_bias(r0, r1, used, q.dtype)
        for c0 in range(r0, r1, step):
            c1 = min(c0 + step, r1)
            rows, s0 = None, None
            if start is None:
                # one row index per gathered block: index_select copies whole blocks
                rows = ((bi * hkv + hi) * nkb + layout.kv_indices[:, :, c0:c1, :used]).flatten()
            else:
                # query block c0 + i visits key blocks start + i ... start + i + used - 1:
                # overlapping strided views of k and v, no copy
                s0 = start + c0 - r0
            kg, vg = _piece_keys(kb, vb, c0, c1, s0, rows, used, b * hq)  # [B·H, c, used·bs, D]
            keys = slice(0, used * bs)
            bias, seen = None, None
            if not plain:
                if shared is not None:
                    bias = shared
                elif mask is None:
                    run_bias, run_seen = layout.run_bias(r0, r1, used, q.dtype)
                    bias = run_bias[:, :, c0 - r0 : c1 - r0]
                    seen = None if all_seen else run_seen[:, :, c0 - r0 : c1 - r0]
                else:
                    qpos, kpos = layout.positions(c0, c1)
                    user = _user_mask_at(mask, qpos, kpos[..., keys], nq, nk)
                    bias, seen = _bias(layout.allowed()[:, :, c0:c1, :, keys] & user, q.dtype)
                if bias.dim() == 5:
                    bias = bias.expand(b, hq, -1, -1, -1).flatten(0, 1)
            qc = qb[:, :, c0:c1].flatten(0, 1)
            o = _attend(qc, kg, vg, bias, scale).unflatten(0, (b, hq))
            if seen is not None:
                o = o * seen.to(o.dtype)
            if out is None:
                outs.append(o)
            else:
                out[:, :, c0:c1].copy_(o)
    if out is None:
        out = torch.cat(outs, dim=2)
    return out.view(b, hq, nqb * bs, dv)[:, :, :nq]


def _grad_pieces(layout: BlockLayout, b: int, hq: int, hkv: int, d: int, dtype: torch.dtype):
    """(forward, backward): the pieces :class:`_BlockPieces` computes a layout in (cached).

    A run that is a sliding band (and shares no key heads) is read through sliding
    views; consecutive such runs that continue each other under the same shared
    mask are joined. A run that :meth:`BlockLayout.band_split` splits is a band read
    in place plus gathered further blocks (two parts merged by their log-sum-exps).
    Other runs gather their blocks, with the run's token mask as a bias. Forward
    pieces hold about ``_BAND_BYTES`` of band output and ``_GATHER_BYTES`` of
    gathered keys and values; backward pieces about ``_GRAD_BYTES`` of keys and
    values, as large as the key and value gradients the kernel returns per piece
    (smaller pieces measured faster there, larger ones in the forward: window at
    N=16384, 8 vs 32 MiB: backward ~10% faster, forward ~15% slower).
    """
    sizes = (_BAND_BYTES, _GATHER_BYTES, _GRAD_BYTES)

    def make():
        device = layout.kv_indices.device
        bs, nkb = layout.block, layout.k_blocks
        bi = torch.arange(b, device=device).view(b, 1, 1, 1)
        hi = (torch.arange(hq, device=device) // (hq // hkv)).view(1, hq, 1, 1)
        per_block = b * hq * bs * d * torch.empty((), dtype=dtype).element_size()

        def gathered(idx):
            return ((bi * hkv + hi) * nkb + idx).flatten()

        if hq == hkv:
            runs = layout.band_runs(b * hq, dtype)
        else:
            runs = [(*run, None) for run in layout.runs(b * hq)]
        segments = []
        for r0, r1, used, plain, all_seen, split in runs:
            start = None
            if split is None and hq == hkv:
                start = layout.sliding_start(r0, r1, used)
            shared = None if plain or split is not None else layout.shared_bias(r0, r1, used, dtype)
            if segments and start is not None and (plain or shared is not None):
                p0, p1, pstart, pused, pplain, pshared, _, _ = segments[-1]
                if (
                    pstart is not None
                    and pused == used
                    and pstart + p1 - p0 == start
                    and pplain == plain
                    and (plain or (pshared is not None and torch.equal(pshared, shared)))
                ):
                    segments[-1] = (p0, r1, pstart, used, plain, pshared, True, None)
                    continue
            segments.append((r0, r1, start, used, plain, shared, all_seen, split))

        def cut(band_bytes, kv_bytes):
            pieces = []
            for r0, r1, start, used, plain, shared, all_seen, split in segments:
                if split is not None:
                    first, width, band_bias, extra, extra_bias = split
                    e = extra.shape[-1]
                    if band_bytes:
                        step = min(band_bytes // per_block, kv_bytes // (2 * per_block * max(e, 1)))
                    else:
                        step = kv_bytes // (2 * per_block * (width + e))
                    for c0 in range(r0, r1, max(1, step)):
                        c1 = min(c0 + max(1, step), r1)
                        parts = [(first + c0 - r0, None, width, band_bias)]
                        if e > 0:
                            hide = extra_bias
                            if hide is not None:
                                hide = _per_row(hide[:, :, c0 - r0 : c1 - r0], b, hq)
                            rows = gathered(extra[:, :, c0 - r0 : c1 - r0])
                            parts.append((None, rows, e, hide))
                        pieces.append((c0, c1, tuple(parts), None))
                    continue
                step = kv_bytes // (2 * per_block * used)
                if start is not None and band_bytes:
                    step = band_bytes // per_block
                step = max(1, step)
                for c0 in range(r0, r1, step):
                    c1 = min(c0 + step, r1)
                    rows, first, bias, seen = None, None, None, None
                    if start is None:
                        rows = gathered(layout.kv_indices[:, :, c0:c1, :used])
                    else:
                        first = start + c0 - r0
                    if shared is not None:
                        bias = shared
                    elif not plain:
                        run_bias, run_seen = layout.run_bias(r0, r1, used, dtype)
                        bias = _per_row(run_bias[:, :, c0 - r0 : c1 - r0], b, hq)
                        if not all_seen:
                            seen = _per_row(run_seen[:, :, c0 - r0 : c1 - r0], b, hq).to(dtype)
                    pieces.append((c0, c1, ((first, rows, used, bias),), seen))
            return pieces

        return cut(_BAND_BYTES, _GATHER_BYTES), cut(0, _GRAD_BYTES)

    return layout._cached(f"grad-pieces-{b}-{hq}-{hkv}-{d}-{dtype}-{sizes}", make)


def _per_row(x: torch.Tensor, b: int, hq: int) -> torch.Tensor:
    """[Bl, Hl, c, bq, *] as the fused kernel's [1 | B·H, c, bq, *] (c as its heads)."""
    if x.shape[0] * x.shape[1] > 1:
        x = x.expand(b, hq, *x.shape[2:])
    return x.flatten(0, 1)


def _join_bands(prev: tuple, run: tuple):
    """The band split of two consecutive runs as one, or None where they do not continue
    each other (same band width, mask and number of further blocks)."""
    p0, _, pused, _, _, a = prev
    r0, _, used, bnd = run
    if a is None or bnd is None or used != pused:
        return None
    (fa, wa, ba, ea, xa), (fb, wb, bb, eb, xb) = a, bnd
    if wa != wb or fb != fa + r0 - p0 or ea.shape[-1] != eb.shape[-1]:
        return None
    if ea.shape[:2] != eb.shape[:2] or (ba is None) != (bb is None):
        return None
    if ba is not None and not torch.equal(ba, bb):
        return None
    hide = None
    if xa is not None or xb is not None:
        bl, hl, _, _, keys = (xa if xa is not None else xb).shape
        xa, xb = (
            x
            if x is not None
            else torch.zeros(bl, hl, e.shape[2], 1, keys, dtype=y.dtype, device=y.device)
            for x, e, y in ((xa, ea, xb), (xb, eb, xa))
        )
        hide = torch.cat([xa, xb], dim=2)
    return fa, wa, ba, torch.cat([ea, eb], dim=2), hide


def _lse_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the CPU flash kernel that also returns log-sum-exps takes these inputs."""
    return q.device.type == "cpu" and q.dtype in FLOAT_DTYPES and k.shape[-1] == v.shape[-1]


def _band_and_extras(qb, kb, vb, out, r0, r1, band, rows, row_bytes, scale):
    """Query blocks r0..r1 of a run that :meth:`BlockLayout.band_split` splits (no autograd).

    The band is read in place through a sliding view, about ``_BAND_BYTES`` of
    band output per call; the further blocks, all fully visible, are gathered
    in pieces of about ``_BAND_GATHER_BYTES`` and attended without a mask (but for
    the padding slots of rows with fewer of them). The two partial softmaxes
    are merged by their log-sum-exps into ``out``:
    o = o_x + (o_band - o_x)·sigmoid(lse_band - lse_x).
    """
    first, width, bias, extra, extra_bias = band
    b, hq, _, bs, d = qb.shape
    used = extra.shape[-1]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    band_step = max(1, _BAND_BYTES // (b * hq * bs * d * qb.element_size()))
    step = max(1, _BAND_GATHER_BYTES // (row_bytes * max(used, 1)))
    for p0 in range(r0, r1, band_step):
        p1 = min(p0 + band_step, r1)
        keys = _piece_keys(kb, vb, p0, p1, first + p0 - r0, None, width, b * hq)
        qp = qb[:, :, p0:p1].flatten(0, 1)
        ob, lb = flash(qp, *keys, attn_mask=bias, scale=scale)
        if used == 0:
            out[:, :, p0:p1].copy_(ob.unflatten(0, (b, hq)))
            continue
        for c0 in range(p0, p1, step):
            c1 = min(c0 + step, p1)
            ids = (rows + extra[:, :, c0 - r0 : c1 - r0]).flatten()
            kg, vg = _piece_keys(kb, vb, c0, c1, None, ids, used, b * hq)
            hide = None
            if extra_bias is not None:
                hide = extra_bias[:, :, c0 - r0 : c1 - r0].expand(b, hq, -1, -1, -1).flatten(0, 1)
            ox, lx = flash(qp[:, c0 - p0 : c1 - p0], kg, vg, attn_mask=hide, scale=scale)
            cut = slice(c0 - p0, c1 - p0)
            _lse_merge(ob[:, cut], lb[:, cut], ox, lx, out=out[:, :, c0:c1].flatten(0, 1))


def _lse_merge(o_a, lse_a, o_b, lse_b, out=None):
    """The softmax over two key sets from each set's result o [..., D] and log-sum-exp
    lse [...]: o_b + (o_a - o_b)·sigmoid(lse_a - lse_b), in float32 at least (written into
    ``out`` when given)."""
    w = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    merged = (o_b.to(w.dtype), o_a.to(w.dtype), w)
    if out is None:
        return torch.lerp(*merged)
    if out.dtype == w.dtype:
        return torch.lerp(*merged, out=out)
    return out.copy_(torch.lerp(*merged))


def sliding_view(x: torch.Tensor, start: int, count: int, length: int, step: int):
    """[B, H, count, length, D] view of blocked [B, H, nb, bs, D] whose row i starts at
    token (start + i)·step; no copy when x is contiguous along its tokens."""
    b, h, _, bs, d = x.shape
    if x.stride()[2:] != (bs * d, d, 1):
        x = x.contiguous()
    s = x.stride()
    offset = x.storage_offset() + start * bs * d
    return x.as_strided((b, h, count, length, d), (s[0], s[1], step * d, d, 1), offset)


class _BlockPieces(torch.autograd.Function):
    """Block-sparse attention over planned pieces, with a backward by the fused kernel.

    ``pieces`` (of the forward; ``backward_pieces`` of the backward, which cover the
    same query blocks): (c0, c1, parts, seen) per piece of query blocks c0..c1, each
    part (start, rows, used, bias): keys that are the sliding band of ``used`` blocks
    from key block ``start`` + i for query block c0 + i (a strided view, no copy),
    or, where ``start`` is None, the blocks ``rows`` of the flattened [B·Hkv·Nk/bk]
    key blocks (gathered, ``used`` per query block); ``bias`` is the part's additive
    token mask (None: all visible). Two parts (a band and further blocks) are merged
    by their log-sum-exps. ``seen`` zeroes queries that see nothing. The forward
    keeps the log-sum-exps; the backward runs the CPU flash kernel's backward per
    piece and part with the merged output and log-sum-exp (so the parts' gradients
    add up to the whole softmax's) and adds the key and value gradients back into
    their blocks: ``used`` shifted slices for a band, index_add for gathered blocks.
    What autograd does for strided views instead (a generic as_strided backward)
    cost several times the attention's own backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, pieces, backward_pieces, block, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        b, hq, nq, _ = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        nqb, nkb = -(-nq // block), -(-nk // block)
        qb, kb, vb = _blocked(q, nqb, block), _blocked(k, nkb, block), _blocked(v, nkb, block)
        out = q.new_empty(b, hq, nqb, block, dv)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.empty(b * hq, nqb, block, dtype=acc, device=q.device)
        for c0, c1, parts, seen in pieces:
            qp = qb[:, :, c0:c1].flatten(0, 1)
            o, lse_piece = None, None
            for start, rows, used, bias in parts:
                kg, vg = _piece_keys(kb, vb, c0, c1, start, rows, used, b * hq)
                o_part, lse_part = flash(qp, kg, vg, attn_mask=bias, scale=scale)
                if o is None:
                    o, lse_piece = o_part, lse_part
                    continue
                o = _lse_merge(o, lse_piece, o_part, lse_part)
                lse_piece = torch.logaddexp(lse_piece, lse_part)
            if seen is not None:
                o = o * seen
            out[:, :, c0:c1].copy_(o.unflatten(0, (b, hq)))
            lse[:, c0:c1].copy_(lse_piece)
        result = out.view(b, hq, nqb * block, dv)[:, :, :nq]
        ctx.save_for_backward(q, k, v, result)
        ctx.out, ctx.lse, ctx.pieces = out, lse, backward_pieces
        ctx.block, ctx.scale = block, scale
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k, v, _ = ctx.saved_tensors
        out, lse, block = ctx.out, ctx.lse, ctx.block
        b, hq, nq, d = q.shape
        hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
        nqb, nkb = -(-nq // block), -(-nk // block)
        qb, kb, vb = _blocked(q, nqb, block), _blocked(k, nkb, block), _blocked(v, nkb, block)
        gb = _blocked(grad, nqb, block)
        dq = torch.empty_like(qb)
        # half precision: the pieces' key and value gradients add up in float32
        acc = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else k.dtype
        dk = kb.new_zeros(b, hkv, nkb, block, d, dtype=acc)
        dvb = vb.new_zeros(b, hkv, nkb, block, dv, dtype=acc)
        for c0, c1, parts, seen in ctx.pieces:
            g = gb[:, :, c0:c1].flatten(0, 1)
            if seen is not None:
                g = g * seen
            for p, (start, rows, used, bias) in enumerate(parts):
                kg, vg = _piece_keys(kb, vb, c0, c1, start, rows, used, b * hq)
                g_q, g_k, g_v = bwd(
                    g,
                    qb[:, :, c0:c1].flatten(0, 1),
                    kg,
                    vg,
                    out[:, :, c0:c1].flatten(0, 1),
                    lse[:, c0:c1],
                    0.0,
                    False,
                    attn_mask=bias,
                    scale=ctx.scale,
                )
                g_q = g_q.unflatten(0, (b, hq))
                if p == 0:
                    dq[:, :, c0:c1].copy_(g_q)
                else:
                    dq[:, :, c0:c1] += g_q
                if start is None:
                    dk.view(-1, block, d).index_add_(0, rows, g_k.reshape(-1, block, d).to(acc))
                    dvb.view(-1, block, dv).index_add_(0, rows, g_v.reshape(-1, block, dv).to(acc))
                    continue
                # query block c0 + i read key blocks start + i ... start + i + used - 1:
                # add them back row by row or slot by slot, whichever takes fewer adds
                g_k = g_k.view(b, hq, c1 - c0, used, block, d)
                g_v = g_v.view(b, hq, c1 - c0, used, block, dv)
                if c1 - c0 <= used:
                    for i in range(c1 - c0):
                        dk[:, :, start + i : start + i + used] += g_k[:, :, i]
                        dvb[:, :, start + i : start + i + used] += g_v[:, :, i]
                    continue
                for j in range(used):
                    dk[:, :, start + j : start + j + c1 - c0] += g_k[:, :, :, j]
                    dvb[:, :, start + j : start + j + c1 - c0] += g_v[:, :, :, j]
        dq = dq.view(b, hq, nqb * block, d)[:, :, :nq]
        dk = dk.view(b, hkv, nkb * block, d)[:, :, :nk].to(k.dtype)
        dvb = dvb.view(b, hkv, nkb * block, dv)[:, :, :nk].to(v.dtype)
        return dq, dk, dvb, None, None, None, None


def _blocked(x: torch.Tensor, blocks: int, block: int) -> torch.Tensor:
    """x [B, H, N, D] padded to ``blocks`` whole blocks as [B, H, blocks, block, D], its
    tokens contiguous (what the strided band views assume)."""
    x = _pad_to(x, blocks * block)
    if x.stride()[2:] != (x.shape[-1], 1):
        x = x.contiguous()
    return x.unflatten(2, (blocks, block))


def _piece_keys(kb, vb, c0, c1, start, rows, used, bh):
    """Keys and values [B·H, c, used·bk, D] of a piece: a sliding view or gathered blocks."""
    bs = kb.shape[3]
    if start is None:
        return (
            x.reshape(-1, bs, x.shape[-1]).index_select(0, rows).view(bh, c1 - c0, used * bs, -1)
            for x in (kb, vb)
        )
    return (sliding_view(x, start, c1 - c0, used * bs, bs).flatten(0, 1) for x in (kb, vb))


def _attend(q, k, v, bias, scale):
    """Softmax attention of query blocks over their gathered keys, [X, c, bq, *] each.

    Large chunks go to the fused ``scaled_dot_product_attention`` (matmul and
    online softmax in one kernel; (B, H) x query block act as its batch x
    heads). Small ones use explicit matmuls and a max-shifted exponential:
    the fused kernel's parallel region costs more than the work there.
    ``bias`` never leaves a row all -inf (see :func:`_bias`).
    """
    if q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] >= _FUSED_MIN_ELEMENTS:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=scale
        )
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = (q @ k.transpose(-1, -2)).to(acc) * scale
    if bias is not None:
        s = s + bias
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return ((p.to(v.dtype) @ v).to(acc) / p.sum(dim=-1, keepdim=True)).to(q.dtype)


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive score bias (0 or -inf) and the rows that see a key.

    A row that sees nothing gets a zero bias (a harmless uniform softmax, never
    NaN); its output is multiplied by ``seen`` = 0 afterwards.
    """
    seen = allowed.any(dim=-1, keepdim=True)
    blocked = ~allowed & seen
    bias = torch.zeros(blocked.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(blocked, float("-inf")), seen


_FLEX: dict[str, Any] = {}


def _compiled_flex():
    """``flex_attention`` compiled once per process (recompiled per shape by dynamo)."""
    if "fn" not in _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled kernel per shape and mask rule; the default limit of 8
        # would silently fall back to the dense eager implementation
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 256)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def flex_block_mask(layout: BlockLayout, mask: torch.Tensor | None = None):
    """The FlexAttention ``BlockMask`` of a layout (cached on it when there is no user mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    if mask is None and "flex" in layout._cache:
        return layout._cache["flex"]
    nq, nk, bs = layout.nq, layout.nk, layout.block
    rule = layout.mask_mod
    # which key blocks each query block visits, so that the mask_mod alone
    # (as the uncompiled FlexAttention evaluates it) describes the layout
    bl, hl, nqb, _ = layout.kv_indices.shape
    nkb = layout.k_blocks
    # padding slots go to an extra column that is dropped
    cols = torch.where(layout.kv_valid, layout.kv_indices, nkb)
    member = torch.zeros(bl, hl, nqb, nkb + 1, dtype=torch.bool, device=cols.device)
    member = member.scatter_(-1, cols, True)[..., :nkb]

    def mask_mod(b, h, q_idx, kv_idx):
        qc, kc = q_idx.clamp(max=nq - 1), kv_idx.clamp(max=nk - 1)
        ok = (q_idx < nq) & (kv_idx < nk)
        ok = ok & member[b if bl > 1 else 0, h if hl > 1 else 0, qc // bs, kc // bs]
        if rule is not None:
            ok = ok & rule(b, h, qc, kc)
        if mask is not None:
            bm, hm, qm, km = mask.shape
            ok = (
                ok
                & mask[
                    b if bm > 1 else 0, h if hm > 1 else 0, qc if qm > 1 else 0, kc if km > 1 else 0
                ]
            )
        return ok

    valid = layout.kv_valid
    full = layout.kv_full & valid if mask is None else torch.zeros_like(valid)
    partial = valid & ~full

    def pack(sel):
        # FlexAttention reads the key length of the mask from the width of the
        # index tensor: pad it to one column per key block
        order = torch.where(sel, 0, 1).argsort(dim=-1, stable=True)
        idx = layout.kv_indices.gather(-1, order).to(torch.int32)
        idx = torch.nn.functional.pad(idx, (0, max(0, layout.k_blocks - idx.shape[-1])))
        return sel.sum(dim=-1).to(torch.int32), idx

    num, idx = pack(partial)
    full_num, full_idx = pack(full)
    block_mask = BlockMask.from_kv_blocks(
        num,
        idx,
        full_num,
        full_idx,
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(layout.q_blocks * bs, layout.k_blocks * bs),
        compute_q_blocks=False,
    )
    if mask is None:
        layout._cache["flex"] = block_mask
    return block_mask


def flex_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse softmax attention by compiled FlexAttention (inference only on CPU)."""
    nq, bs = q.shape[2], layout.block
    block_mask = flex_block_mask(layout, mask)
    qp = _pad_to(q, layout.q_blocks * bs)
    kp, vp = _pad_to(k, layout.k_blocks * bs), _pad_to(v, layout.k_blocks * bs)
    gqa = q.shape[1] != k.shape[1]
    if qp.shape[2] * kp.shape[2] >= FLEX_COMPILE_MIN_PAIRS:
        out = _compiled_flex()(qp, kp, vp, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    else:
        # a few dozen tokens: FlexAttention's uncompiled (dense) evaluation of the
        # same BlockMask takes milliseconds where compiling takes many seconds
        from torch.nn.attention.flex_attention import flex_attention

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = flex_attention(qp, kp, vp, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return out[:, :, :nq]


def flex_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why the flex path cannot take these inputs (empty when it can)."""
    reasons = []
    if q.dtype not in FLEX_DTYPES:
        reasons.append(
            f"form: 'flex' computes in float32, bfloat16 or float16, got {FLOAT_DTYPES[q.dtype]}; "
            "use form='torch' or 'auto'"
        )
    if q.requires_grad or k.requires_grad or v.requires_grad:
        reasons.append(
            "form: 'flex' has no backward on this device; use form='torch' or 'auto' for training"
        )
    return reasons


def choose_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The path ``"auto"`` takes: flex only where its compiled kernel is the faster one.

    ``"torch"`` when gradients flow, when the dtype has no flex kernel, for
    small shapes, and on CPU, where the fused SDPA kernel over gathered blocks
    beats FlexAttention's CPU kernel (which reaches about half of SDPA's
    throughput even on dense causal attention; see the sparse note).
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad or q.dtype not in FLEX_DTYPES:
        return "torch"
    return "flex" if prefers_flex(q.device.type, q.shape[2] * k.shape[2]) else "torch"


def prefers_flex(device_type: str, pairs: int) -> bool:
    """Whether compiled FlexAttention is the faster inference path on this device and size."""
    return device_type in FLEX_FAST_DEVICES and pairs >= FLEX_MIN_PAIRS


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """Softmax attention restricted to ``layout`` (and ``mask``), by the chosen path."""
    if path == "auto":
        path = choose_path(q, k, v)
    fn = flex_block_attention if path == "flex" else torch_block_attention
    return fn(q, k, v, layout, scale=scale, mask=mask)


class LayoutCache:
    """A small least-recently-used cache of layouts keyed by shape and options."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, key, make: Callable[[], BlockLayout]) -> BlockLayout:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        layout = make()
        self._items[key] = layout
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return layout


class StaticBlockSparse(KVCacheDecode, Mechanism):
    """Base of mechanisms whose sparsity pattern depends only on positions.

    Subclasses give the token rule ``rule(nq, nk, causal, heads)`` (a
    ``mask_mod``) and a superset of the key blocks each query block needs,
    ``candidates(nq, nk, causal, heads)`` ([Bl, Hl, Nq/block, C] with -1
    padding); their ``Config`` has ``block`` (the tile size) and ``form``
    (``"auto"``, ``"torch"`` or ``"flex"``). Queries are aligned bottom-right:
    query ``i`` sits at absolute position ``i + Nk - Nq``, so a decoding step
    with a KV cache sees what the last row of the parallel pass sees.
    """

    forms: ClassVar[tuple[str, ...]] = PATHS
    # the rule depends on the head index: layouts are built per query head
    per_head: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._layouts = LayoutCache()

    def rule(self, nq: int, nk: int, causal: bool, heads: int, device=None) -> MaskMod | None:
        """The token-level mask_mod (None: every pair of the candidate blocks); tensors it
        holds live on ``device``, where the mask is evaluated (and compiled, on the flex path)."""
        raise TypeError(f"{type(self).__name__} must define rule()")

    def candidates(self, nq: int, nk: int, causal: bool, heads: int) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define candidates()")

    def layout(self, nq: int, nk: int, causal: bool, heads: int = 1, device=None) -> BlockLayout:
        """The (cached) block layout of this mechanism for a shape."""
        heads = heads if self.per_head else 1
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (nq, nk, causal, heads, device)

        def make():
            cand = self.candidates(nq, nk, causal, heads).to(device)
            return BlockLayout.build(
                self.rule(nq, nk, causal, heads, device), cand, nq, nk, self.config.block
            )

        return self._layouts.get(key, make)

    def density(self, nq: int, nk: int, causal: bool = False, heads: int = 1) -> float:
        """Fraction of all Nq x Nk (query, key) pairs that it computes (averaged over heads)."""
        return self.layout(nq, nk, causal, heads).density()

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if self.config.form == "flex":
            reasons += flex_unsupported(q, k, v)
        return reasons

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        layout = self.layout(q.shape[2], k.shape[2], causal, q.shape[1], q.device)
        return block_sparse_attention(
            q, k, v, layout, scale=scale, mask=mask, path=self.config.form
        )
