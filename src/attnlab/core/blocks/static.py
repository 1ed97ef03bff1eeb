"""Fixed block-sparse patterns as mechanisms: :class:`StaticBlockSparse` and the
:class:`LayoutCache` it plans its layouts in."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..mechanism import KVCacheDecode, Mechanism
from .flex import flex_unsupported
from .layout import BlockLayout, MaskMod
from .paths import BACKENDS, block_sparse_attention


class LayoutCache:
    """A small least-recently-used cache of layouts keyed by shape and options."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, key, make: Callable[[], BlockLayout]) -> BlockLayout:
        """The layout under ``key``, made by ``make()`` on a miss (the oldest one leaves
        once more than ``size`` are held)."""
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
    padding); their ``Config`` has ``block`` (the tile size) and ``backend``
    (``"auto"``, ``"torch"`` or ``"flex"``). Queries are aligned bottom-right:
    query ``i`` sits at absolute position ``i + Nk - Nq``, so a decoding step
    with a KV cache sees what the last row of the parallel pass sees.
    """

    backends: ClassVar[tuple[str, ...]] = BACKENDS
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
        """Long [Bl, Hl, Nq/block, C]: a superset of the key blocks each query block needs
        (-1: none)."""
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
        if self.config.backend == "flex":
            reasons += flex_unsupported(q, k, v)
        return reasons

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        layout = self.layout(q.shape[2], k.shape[2], causal, q.shape[1], q.device)
        return block_sparse_attention(
            q, k, v, layout, scale=scale, mask=mask, path=self.config.backend
        )
