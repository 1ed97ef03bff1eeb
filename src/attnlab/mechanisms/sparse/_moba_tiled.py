"""MoBA's tiled CPU path (Lu et al., arXiv:2502.13189): each query's own key block
and the blocks it chose, attended by torch's fused CPU flash kernel and merged by
log-sum-exp, with a backward by the same tiles (:class:`TiledMoBA`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from attnlab.core.masks import causal_mask

from ._routed import NEG_INF

# dtypes of the tiled path (the fused CPU flash kernel returns the log-sum-exp in the
# same dtype, so partial results merge without a cast)
TILED_DTYPES = (torch.float32, torch.float64)
# queries per causal sub-block of the own key block: the fused kernel computes a whole
# [queries, keys] tile, so a 512-query causal square costs a full square; sub-blocks
# attending their prefix compute 5/8 of it
_OWN_TILE = 128
# runs of at least this many queries against one key block go into the fused kernel
# as two halves, so that its two threads get equal work
_SPLIT_RUN = 1024


def tiled_applies(q, k, v, *, block: int, mask) -> bool:
    """Whether :func:`tiled_moba` takes these inputs: CPU in float32 or float64, no
    mask, Dv = D, as many queries as keys, whole blocks (with or without gradients)."""
    n = q.shape[2]
    return (
        mask is None
        and q.device.type == "cpu"
        and q.dtype in TILED_DTYPES
        and v.shape[-1] == q.shape[-1]
        and k.shape[2] == n
        and n % block == 0
    )


def _causal_bias(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Bias [1, 1, rows, cols]: row r sees columns c <= r + cols - rows (0, else -inf)."""
    bias = torch.zeros(rows, cols, dtype=dtype, device=device)
    return bias.masked_fill_(~causal_mask(rows, cols, device), NEG_INF)[None, None]


@dataclass(frozen=True, eq=False)
class _Tiles:
    """What the tiled forward and backward share: ``rows`` = B·H query heads,
    ``blocks`` key blocks per head, the other blocks per head ``other`` [B·H, N, slots]
    (from :func:`attnlab.mechanisms.sparse.moba.moba_others`), and the own block's
    sub-blocks of ``sub`` queries with their causal ``biases`` (None: no bias)."""

    rows: int
    heads: int
    kv_heads: int
    blocks: int
    other: torch.Tensor
    sub: int
    biases: list[torch.Tensor | None]

    def kv_row(self, t: int) -> int:
        """The [B·Hkv] key row that query row ``t`` of [B·H] reads (grouped-query heads)."""
        h, hkv = self.heads, self.kv_heads
        return (t // h) * hkv + (t % h) // (h // hkv)


def _tiles(q, k, other, block: int, causal: bool) -> _Tiles:
    """The :class:`_Tiles` of a call."""
    b, h, n = q.shape[:3]
    other = other.reshape(b * h, n, other.shape[3])
    sub = _OWN_TILE if causal and block > _OWN_TILE and block % _OWN_TILE == 0 else block
    biases = [
        _causal_bias(sub, s0 + sub, q.dtype, q.device) if causal and s0 else None
        for s0 in range(0, block, sub)
    ]
    return _Tiles(b * h, h, k.shape[1], n // block, other, sub, biases)


def _pairs(chosen: torch.Tensor, nb: int):
    """One head's chosen (query, slot) pairs [N, slots] sorted by key block (by
    query within one): the flat index ``query * slots + slot`` of each pair,
    empty slots first, and the number of empty slots followed by the number of
    pairs per key block (a list)."""
    flat = chosen.reshape(-1)
    order = flat.argsort(stable=True)  # empty slots (-1) first
    counts = torch.bincount(flat.long() + 1, minlength=nb + 1).tolist()
    return order, counts


def tiled_moba(q, k, v, other, *, block: int, scale: float, causal: bool, lse=None):
    """MoBA attention in torch's fused CPU flash kernel, head by head.

    Inputs as :func:`tiled_applies` accepts; ``other`` from
    :func:`attnlab.mechanisms.sparse.moba.moba_others` (the blocks besides the own
    one). One head at a time, so that every temporary is a few MiB (reused by
    malloc, never page-faulted afresh):

    - the own block: all blocks of the head in one call per sub-block;
      under the causal rule cut into sub-blocks of ``_OWN_TILE`` queries,
      each attending only the prefix of its block up to itself (the kernel
      computes whole tiles of up to 512 keys, masked or not), written
      straight into the output, scaled by its log-sum-exp weight;
    - the other blocks (:func:`_other_blocks`): the head's (query, slot)
      choices sorted by key block, the queries gathered once in that order,
      and every query that chose key block j, in any slot, in one call
      against block j, read in place (no key gather); added to the output
      by their log-sum-exp weights in one sparse product.

    ``lse`` [B*H, N], if given, receives each query's log-sum-exp over all
    its keys (what the backward needs).
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    b, _, n, d = q.shape
    tiles = _tiles(q, k, other, block, causal)
    bh, nb, other, sub, biases = tiles.rows, tiles.blocks, tiles.other, tiles.sub, tiles.biases
    slots = other.shape[2]
    qh = q.reshape(bh, n, d)
    kb, vb = (x.reshape(b * tiles.kv_heads, nb, block, d) for x in (k, v))
    out = q.new_empty(bh, n, d)
    # per head, reused: the own blocks' log-sum-exps; the merge's buffers
    own_lse = q.new_empty(nb, block)
    merge = _Merge(q, slots, n) if slots else None
    for t in range(bh):
        kv = tiles.kv_row(t)
        qt, ot = qh[t].view(1, nb, block, d), out[t].view(nb, block, d)
        owns = []  # (rows of each block, output [1, nb, rows, D]) per sub-block
        for i, s0 in enumerate(range(0, block, sub)):
            rs, keys = slice(s0, s0 + sub), slice(0, s0 + sub if causal else block)
            o1, l1 = flash(
                qt[:, :, rs],
                kb[kv, None, :, keys],
                vb[kv, None, :, keys],
                0.0,
                causal and s0 == 0,
                attn_mask=biases[i],
                scale=scale,
            )
            owns.append((rs, o1))
            own_lse[:, rs] = l1[0]
        w_own = None
        if slots:
            w_own = _other_blocks(
                flash, qh[t], kb[kv], vb[kv], other[t], scale, own_lse.view(n), merge
            )
        for rs, o1 in owns:  # the own block's share, weighted where others merge in
            if w_own is None:
                ot[:, rs] = o1[0]
            else:
                torch.mul(o1[0], w_own.view(nb, block, 1)[:, rs], out=ot[:, rs])
        if w_own is not None:
            merge.add_others(out[t])
        if lse is not None:
            lse[t] = own_lse.view(n)
    return out.view(q.shape)


class _Merge:
    """Buffers of :func:`_other_blocks`, reused from head to head: the gathered
    queries (then their results) and log-sum-exps in call order, and, per
    (query, slot), the log-sum-exp (then weight) and position in call order;
    and the head's pending sum of the others' results (:meth:`add_others`)."""

    def __init__(self, q: torch.Tensor, slots: int, n: int):
        self.sorted_q = q.new_empty(slots * n, q.shape[-1])
        self.sorted_l = q.new_empty(slots * n)
        self.lse = q.new_empty(n, slots)
        self.pos = torch.empty(n, slots, dtype=torch.long, device=q.device)
        self.calls = torch.arange(slots * n, device=q.device)
        self.crow = torch.arange(0, slots * n + 1, slots, device=q.device)
        self.weights = None
        self.results = None

    def add_others(self, out: torch.Tensor) -> None:
        """``out`` [N, D] += the pending weighted sum of the other blocks' results."""
        out.addmm_(self.weights, self.results)
        self.weights = self.results = None


def _other_blocks(flash, q, kb, vb, chosen, scale, own_lse, merge):
    """One head's attention over the blocks other than its own, by key block, and
    the weights that merge it with the own block's result.

    ``q`` [N, D], ``kb``/``vb`` [nb, block, D], ``chosen`` [N, slots] (-1:
    none), ``own_lse`` [N]: the own block's log-sum-exp; ``merge`` a
    :class:`_Merge`. The chosen (query, slot) pairs are sorted by key block
    and their queries gathered once in that order; every query that chose key
    block j, in any slot, is then one contiguous run attending block j in one
    call (:func:`_attend_run`), its result written over its queries.
    Each query's results merge by log-sum-exp: the others' are weighted and
    summed by one sparse [N, pairs] x [pairs, D] product (a query's row holds
    the weights of its slots at their results' positions), left pending in
    ``merge``; ``own_lse`` becomes the log-sum-exp over all the query's keys
    and the own block's weight [N] is returned (None: no other block chosen).
    """
    n, d = q.shape
    nb = kb.shape[0]
    order, counts = _pairs(chosen, nb)
    empty, pair, counts = order[: counts[0]], order[counts[0] :], counts[1:]
    pairs = pair.numel()
    if pairs == 0:
        return None
    sq, sl = merge.sorted_q[:pairs], merge.sorted_l[:pairs]
    torch.index_select(q, 0, pair // chosen.shape[1], out=sq)
    # views made in one call each: the runs (queries, log-sum-exps), the key blocks
    runs_q = sq.view(1, 1, pairs, d).split(counts, dim=2)
    runs_l = sl.view(1, 1, pairs).split(counts, dim=2)
    keys, values = (x.view(nb, 1, 1, -1, d).unbind(0) for x in (kb, vb))
    for count, qj, lj, kj, vj in zip(counts, runs_q, runs_l, keys, values, strict=True):
        if count:
            _attend_run(flash, qj, lj, kj, vj, scale)
    # weights against each query's largest log-sum-exp (the own block's is finite);
    # an empty slot weighs 0 at position 0
    lse, pos = merge.lse, merge.pos
    lse.view(-1).index_copy_(0, pair, sl).index_fill_(0, empty, NEG_INF)
    pos.view(-1).index_copy_(0, pair, merge.calls[:pairs]).index_fill_(0, empty, 0)
    top = torch.maximum(own_lse, lse.amax(dim=1))
    w_own = own_lse.sub(top).exp_()
    w = lse.sub_(top[:, None]).exp_()
    total = w.sum(dim=1).add_(w_own)
    own_lse.copy_(top).add_(total.log())
    total.reciprocal_()
    vals = w.mul_(total[:, None]).view(-1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        merge.weights = torch.sparse_csr_tensor(
            merge.crow, pos.view(-1), vals, (n, pairs), check_invariants=False
        )
    merge.results = sq
    return w_own.mul_(total)


def _attend_run(flash, q, lse, kb, vb, scale):
    """One run of queries ``q`` [1, 1, count, D] attends one key block ``kb``/``vb``
    [1, 1, block, D]; the result is written over ``q`` (while still in cache), the
    log-sum-exp into ``lse`` [1, 1, count].

    A long run goes in as two halves (the batch of the call; for an odd count they
    share one row), so that the kernel's two threads get equal work: it splits
    a call into tiles of up to 256 queries and hands each thread a contiguous share
    of them, which for a single run leaves the last, short tile unbalanced.
    """
    count, d = q.shape[2:]
    if count < _SPLIT_RUN:
        o, l1 = flash(q, kb, vb, scale=scale)
        q.copy_(o)
        lse.copy_(l1)
        return
    half, second = -(-count // 2), count // 2
    q2 = q.as_strided((2, 1, half, d), (second * d, d, d, 1))
    o, l2 = flash(q2, kb.expand(2, 1, -1, d), vb.expand(2, 1, -1, d), scale=scale)
    q[:, :, :half].copy_(o[:1])  # o [2, 1, half, D], l2 [2, 1, half]
    q[:, :, second:].copy_(o[1:])
    lse[:, :, :half].copy_(l2[:1])
    lse[:, :, second:].copy_(l2[1:])


def tiled_moba_backward(
    q, k, v, other, out, lse, grad_out, *, block: int, scale: float, causal: bool
):
    """Gradients (dq, dk, dv) of :func:`tiled_moba`, by the same tiles.

    Every tile calls the fused kernel's backward with the merged output and
    log-sum-exp ``lse`` [B*H, N] of its queries: the probabilities it
    recomputes, exp(s - lse), are then those of the query's whole softmax
    over its chosen keys, so the tiles' gradients add up to the exact one.
    """
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    b, _, n, d = q.shape
    tiles = _tiles(q, k, other, block, causal)
    bh, nb, other, sub, biases = tiles.rows, tiles.blocks, tiles.other, tiles.sub, tiles.biases
    qh, oh, gh = (x.reshape(bh, n, d) for x in (q, out, grad_out.contiguous()))
    kb, vb = (x.reshape(b * tiles.kv_heads, nb, block, d) for x in (k, v))
    dq = torch.zeros_like(qh)
    dk, dv = torch.zeros_like(kb), torch.zeros_like(vb)
    for t in range(bh):
        kv = tiles.kv_row(t)
        qt, ot, gt = (x[t].view(1, nb, block, d) for x in (qh, oh, gh))
        lt, dqt = lse[t].view(1, nb, block), dq[t].view(nb, block, d)
        for i, s0 in enumerate(range(0, block, sub)):
            rs, keys = slice(s0, s0 + sub), slice(0, s0 + sub if causal else block)
            g_q, g_k, g_v = bwd(
                gt[:, :, rs],
                qt[:, :, rs],
                kb[kv, None, :, keys],
                vb[kv, None, :, keys],
                ot[:, :, rs],
                lt[:, :, rs].contiguous(),
                0.0,
                causal and s0 == 0,
                attn_mask=biases[i],
                scale=scale,
            )
            dqt[:, rs] += g_q[0]
            dk[kv, :, keys] += g_k[0]
            dv[kv, :, keys] += g_v[0]
        if other.shape[2] == 0:
            continue
        order, counts = _pairs(other[t], nb)
        pair, counts = order[counts[0] :], counts[1:]
        if pair.numel() == 0:
            continue
        rows = pair // other.shape[2]
        sq, so, sg = (x[t].index_select(0, rows) for x in (qh, oh, gh))
        sl = lse[t].index_select(0, rows)
        start = 0
        for j, count in enumerate(counts):
            if count == 0:
                continue
            span = slice(start, start + count)
            start += count
            g_q, g_k, g_v = bwd(
                sg[None, None, span],
                sq[None, None, span],
                kb[kv, j, None, None],
                vb[kv, j, None, None],
                so[None, None, span],
                sl[None, None, span],
                0.0,
                False,
                scale=scale,
            )
            sq[span] = g_q[0, 0]  # the queries' slots now hold their gradients
            dk[kv, j] += g_k[0, 0]
            dv[kv, j] += g_v[0, 0]
        dq[t].index_add_(0, rows, sq)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


class TiledMoBA(torch.autograd.Function):
    """:func:`tiled_moba` forward, :func:`tiled_moba_backward` backward."""

    @staticmethod
    def forward(ctx, q, k, v, other, block, scale, causal):
        lse = q.new_empty(q.shape[0] * q.shape[1], q.shape[2])
        out = tiled_moba(q, k, v, other, block=block, scale=scale, causal=causal, lse=lse)
        ctx.save_for_backward(q, k, v, other, out, lse)
        ctx.args = (block, scale, causal)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, other, out, lse = ctx.saved_tensors
        block, scale, causal = ctx.args
        grads = tiled_moba_backward(
            q, k, v, other, out, lse, grad_out, block=block, scale=scale, causal=causal
        )
        return (*grads, None, None, None, None)
