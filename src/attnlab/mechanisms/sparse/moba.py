"""MoBA: Mixture of Block Attention (Lu et al., arXiv:2502.13189).

Compared with MoonshotAI/MoBA (moba_attn_varlen_naive, its reference): the same gate
q·mean(K_b), the own block always taken and counted in top_k, other blocks only when
wholly in the past, one softmax over the chosen keys, per head; the authors define only
the causal form, and the non-causal form here (any other block may be chosen) is
attnlab's extension.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Mechanism, Spec, native, register
from attnlab.core.blocks import (
    BlockLayout,
    flex_block_attention,
    flex_unsupported,
    ranges_to_candidates,
)
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import causal_mask, repeat_kv
from attnlab.core.mechanism import KVCacheDecode

from ._routed import NEG_INF, pool_blocks, token_block_attention

# dtypes of the tiled inference path (the fused CPU flash kernel returns the
# log-sum-exp in the same dtype, so partial results merge without a cast)
TILED_DTYPES = (torch.float32, torch.float64)
# queries per causal sub-block of the own key block in the tiled path: the fused
# kernel computes a whole [queries, keys] tile, so a 512-query causal square costs
# a full square; sub-blocks attending their prefix compute 5/8 of it
_OWN_TILE = 128
# runs of at least this many queries against one key block go into the fused kernel
# as two halves (balanced over its two threads; measured 10-30% faster from ~1000 on)
_SPLIT_RUN = 1024
# queries gated at a time in moba_others
_GATE_ROWS = 2048

FORMS = ("auto", "torch", "flex")


def check_form(form: object) -> str:
    if form not in FORMS:
        raise AttnInputError(f"form: expected one of {', '.join(FORMS)}, got {form!r}")
    return form


def own_blocks(nq: int, nk: int, block: int, causal: bool, device) -> torch.Tensor:
    """Long [Nq]: the key block holding each query's aligned position i + Nk - Nq (-1: none)."""
    pos = torch.arange(nq, device=device) + (nk - nq)
    own = pos.clamp(0, nk - 1) // block
    return torch.where(pos < 0, -1, own) if causal else own


def moba_select(q, k, *, block: int, top_k: int, causal: bool) -> torch.Tensor:
    """Long [B, H, Nq, top_k]: the key blocks each query attends under MoBA's gate.

    The gate of query i for key block j is ``q_i · mean(K_j)``. The block that
    holds the query's own position is always taken; the other ``top_k - 1``
    are the highest-gated blocks among those wholly in the query's past
    (causal) or among all others (non-causal). Empty slots hold -1.
    """
    b, h, nq, _ = q.shape
    own = own_blocks(nq, k.shape[2], block, causal, q.device)
    sel_own = own.view(1, 1, nq, 1).expand(b, h, nq, 1)
    other = moba_others(q, k, block=block, top_k=top_k, causal=causal)
    if other.shape[3] == 0:
        return sel_own
    return torch.cat([sel_own, other.long()], dim=-1)


def moba_others(q, k, *, block: int, top_k: int, causal: bool) -> torch.Tensor:
    """[B, H, Nq, slots]: the key blocks each query takes besides its own under
    MoBA's gate (:func:`moba_select` without the own block), in int16 where the
    block count allows (else long); empty slots hold -1.

    The gate is computed for ``_GATE_ROWS`` queries at a time (cache-sized) and
    the top blocks taken per run of queries sharing their own block: those
    blocks' eligible blocks are the same (the past ones, causal; all but the
    own one, non-causal), so no gate entry is masked, and a run with at most
    ``slots`` eligible blocks takes them all without a top-k.
    """
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    nkb = -(-nk // block)
    n_other = min(top_k - 1, nkb - 1)
    dtype = torch.int16 if nkb < 2**15 else torch.long
    other = torch.full((b, h, nq, max(0, n_other)), -1, dtype=dtype, device=q.device)
    if n_other <= 0:
        return other
    own = own_blocks(nq, nk, block, causal, q.device)
    values, counts = torch.unique_consecutive(own, return_counts=True)
    runs, r0 = [], 0  # (first query, end, own block) of each run of one own block
    for o, c in zip(values.tolist(), counts.tolist(), strict=True):
        runs.append((r0, r0 + c, o))
        r0 += c
    with torch.no_grad():
        # block means, transposed once (the gate's product reads them contiguous)
        means = repeat_kv(pool_blocks(k, block), h // k.shape[1]).transpose(-1, -2).contiguous()
        means = means.reshape(b * h, -1, nkb)
        buf = q.new_empty(b * h * min(nq, _GATE_ROWS) * nkb)  # the gate, reused
        for c0 in range(0, nq, _GATE_ROWS):
            c1 = min(c0 + _GATE_ROWS, nq)
            parts = [(max(r0, c0), min(r1, c1), o) for r0, r1, o in runs if r0 < c1 and r1 > c0]
            # causal: blocks from the chunk's last own block on are never eligible
            if causal and max(o for *_, o in parts) <= 0:
                continue
            gate = buf[: b * h * (c1 - c0) * nkb].view(b * h, c1 - c0, nkb)
            torch.bmm(q[:, :, c0:c1].reshape(b * h, c1 - c0, -1), means, out=gate)
            gate = gate.view(b, h, c1 - c0, nkb)
            for r0, r1, o in parts:
                eligible = o if causal else nkb - 1
                if eligible <= 0:
                    continue
                if eligible <= n_other:  # all of them
                    cols = torch.arange(nkb, device=q.device)
                    cols = cols[:o] if causal else cols[cols != o]
                    other[:, :, r0:r1, :eligible] = cols.to(dtype)
                    continue
                g = gate[:, :, r0 - c0 : r1 - c0]
                if causal:
                    g = g[..., :o]
                else:
                    g[..., o] = NEG_INF
                other[:, :, r0:r1] = g.topk(n_other, dim=-1, sorted=False).indices
    return other


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


def _tiles(q, k, other, block: int, causal: bool):
    """What the tiled forward and backward share: the head layout, the other blocks
    per head [B*H, N, slots] (from :func:`moba_others`) and the own block's
    sub-blocks (their size and causal biases)."""
    b, h, n = q.shape[:3]
    hkv = k.shape[1]
    nb = n // block
    other = other.reshape(b * h, n, other.shape[3])
    sub = _OWN_TILE if causal and block > _OWN_TILE and block % _OWN_TILE == 0 else block
    biases = [
        _causal_bias(sub, s0 + sub, q.dtype, q.device) if causal and s0 else None
        for s0 in range(0, block, sub)
    ]
    return b * h, nb, h, hkv, other, sub, biases


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

    Inputs as :func:`tiled_applies` accepts; ``other`` from :func:`moba_others`
    (the blocks besides the own one). One head at a time, so that every temporary is a
    few MiB (reused by malloc, never page-faulted afresh):

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
    bh, nb, h, hkv, other, sub, biases = _tiles(q, k, other, block, causal)
    slots = other.shape[2]
    qh = q.reshape(bh, n, d)
    kb, vb = (x.reshape(b * hkv, nb, block, d) for x in (k, v))
    out = q.new_empty(bh, n, d)
    # per head, reused: the own blocks' log-sum-exps; the merge's buffers
    own_lse = q.new_empty(nb, block)
    merge = _Merge(q, slots, n) if slots else None
    for t in range(bh):
        kv = (t // h) * hkv + (t % h) // (h // hkv)
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
    return out.view(b, h, n, d)


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
    bh, nb, h, hkv, other, sub, biases = _tiles(q, k, other, block, causal)
    qh, oh, gh = (x.reshape(bh, n, d) for x in (q, out, grad_out.contiguous()))
    kb, vb = (x.reshape(b * hkv, nb, block, d) for x in (k, v))
    dq = torch.zeros_like(qh)
    dk, dv = torch.zeros_like(kb), torch.zeros_like(vb)
    for t in range(bh):
        kv = (t // h) * hkv + (t % h) // (h // hkv)
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


class _TiledMoBA(torch.autograd.Function):
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


def selection_layout(sel: torch.Tensor, nq: int, nk: int, block: int, causal: bool) -> BlockLayout:
    """The shared engine's layout for per-query block choices.

    Each query block visits the union of the blocks its queries chose; the
    token rule keeps, for each query, only its own choices (and the causal rule).
    """
    b, h = sel.shape[:2]
    nkb, nqb = -(-nk // block), -(-nq // block)
    chosen = torch.zeros(b, h, nq, nkb + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(-1, torch.where(sel >= 0, sel, nkb), True)
    chosen = chosen[..., :nkb]
    rows = torch.nn.functional.pad(chosen, (0, 0, 0, nqb * block - nq))
    union = rows.unflatten(2, (nqb, block)).any(dim=3)  # [B, H, nqb, nkb]
    lo = torch.zeros(b, h, nqb, dtype=torch.long, device=sel.device)
    cand = ranges_to_candidates(lo, lo + nkb)
    cand = torch.where(union.gather(-1, cand.clamp_min(0)) & (cand >= 0), cand, -1)
    offset = nk - nq

    def mask_mod(bi, hi, q_idx, kv_idx):
        ok = chosen[bi, hi, q_idx, kv_idx // block]
        return ok & (kv_idx <= q_idx + offset) if causal else ok

    return BlockLayout.build(mask_mod, cand, nq, nk, block)


@register
class MoBA(KVCacheDecode, Mechanism):
    """Mixture of Block Attention, after "MoBA: Mixture of Block Attention for
    Long-Context LLMs" (Lu et al., arXiv:2502.13189).

    Keys are cut into blocks of ``block``; each query gates every block by the
    dot product of the query with the block's mean-pooled key and attends,
    with one softmax, to the ``top_k`` blocks it keeps: its own block (the one
    holding its aligned position, causal inside) always, plus the ``top_k - 1``
    best-gated blocks wholly in its past (causal) or anywhere else (non-causal).
    As in the paper the gate is per query token, so the mechanism stays
    causal; the gate itself is not differentiated (gradients flow through the
    attention over the chosen blocks).

    Paths (``form``): for inference on CPU in float32 without a mask (Dv a
    multiple of 16), ``"auto"`` runs the compiled kernel ``csrc/moba.c``
    (:func:`attnlab.core.native.moba`: gate, top-k and each query's one
    online softmax over its blocks, fused; at N=16384 causal, block 256,
    top_k 5, B1 H8 D64 it runs 6.4-6.6x faster than SDPA, 87-90% of the FLOP
    bound) where it was built. Otherwise, on CPU in float32/float64, with no
    mask and whole blocks of as many queries as keys, ``"auto"`` takes
    :func:`tiled_moba`, head by head: each query's own block in one fused
    flash-kernel call per sub-block, then, for every key block, all queries
    that chose it in one call reading the block in place, merged by
    log-sum-exp; with gradients the same tiles run the kernel's backward
    (:func:`tiled_moba_backward`, exact given the merged log-sum-exp), so it
    is the trainable path and the inference path where the compiled kernel
    does not apply. Otherwise ``"auto"`` and ``"torch"`` sort the (query,
    block) choices by key block into tiles of ``block`` queries sharing one
    block, run all tiles as one batch and merge each query's partial
    softmaxes by log-sum-exp: in the fused kernel where it applies
    (``"auto"``), else in plain PyTorch ops (trainable by autograd).
    ``"flex"`` runs FlexAttention over the union of the blocks each query
    block chose, with a per-token rule (inference only; compiled per shape,
    slower than ``"auto"`` on CPU).
    """

    spec = Spec(
        name="moba",
        family="sparse",
        title="MoBA: mixture of block attention (top-k gated key blocks)",
        paper="arXiv:2502.13189",
        exact=False,
        cross=True,
        decode=True,
        complexity="O(N·k·B·D + N²/B·D)",
    )
    tiny_config: ClassVar[dict] = {"block": 4, "top_k": 2}
    forms: ClassVar[tuple[str, ...]] = FORMS

    @dataclass
    class Config:
        block: int = 512
        top_k: int = 3
        form: str = "auto"

        def __post_init__(self):
            check_positive_int("block", self.block)
            check_positive_int("top_k", self.top_k)
            check_form(self.form)

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if self.config.form == "flex":
            reasons += flex_unsupported(q, k, v)
        return reasons

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        cfg = self.config
        if cfg.form == "auto" and native.moba_applies(q, k, v, mask=mask):
            return native.moba(
                q, k, v, block=cfg.block, top_k=cfg.top_k, causal=causal, scale=scale
            )
        if cfg.form == "auto" and tiled_applies(q, k, v, block=cfg.block, mask=mask):
            other = moba_others(q, k, block=cfg.block, top_k=cfg.top_k, causal=causal)
            grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
            if grad:
                return _TiledMoBA.apply(q, k, v, other, cfg.block, scale, causal)
            return tiled_moba(q, k, v, other, block=cfg.block, scale=scale, causal=causal)
        sel = moba_select(q, k, block=cfg.block, top_k=cfg.top_k, causal=causal)
        if cfg.form == "flex":
            layout = selection_layout(sel, q.shape[2], k.shape[2], cfg.block, causal)
            return flex_block_attention(q, k, v, layout, scale=scale, mask=mask)
        out = token_block_attention(
            q,
            k,
            v,
            sel,
            block=cfg.block,
            scale=scale,
            causal=causal,
            mask=mask,
            fused=cfg.form == "auto",
        )
        return out.to(q.dtype)

    def limit(self, n):
        """Every block kept: ``top_k`` = the number of key blocks."""
        return dataclasses.replace(self.config, top_k=max(1, -(-n // self.config.block)))

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """Fraction of the Nq x Nk pairs computed (exact when Nk is a multiple of ``block``)."""
        bs, top_k = self.config.block, self.config.top_k
        nkb = -(-nk // bs)
        pos = torch.arange(nq, dtype=torch.float64) + (nk - nq)
        if causal:
            own = (pos.clamp_min(0) // bs).floor()
            seen = (pos - own * bs + 1) + torch.minimum(own, torch.tensor(top_k - 1.0)) * bs
            seen = torch.where(pos < 0, 0.0, seen)
        else:
            seen = torch.full_like(pos, float(min(top_k, nkb) * bs))
        return float(seen.clamp(max=nk).sum()) / (nq * nk)
