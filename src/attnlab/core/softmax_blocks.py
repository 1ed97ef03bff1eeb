"""Exact softmax attention weights computed one block of query rows at a time.

The kernel behind attnlab's streaming capture (``attnlab.models.capture``), the
probability edits (``attnlab.interventions``) and ``output_attentions=True``
under an exact mechanism: the softmax of ``scale * q k^T`` (masked, causal
bottom-right) is produced block by block, so a caller that reduces each block
and drops it never holds an N x N matrix. Grouped-query heads are computed
without repeating keys.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# elements of one probability block (B * Hq * rows * Nk): about 15M floats (60 MiB).
# Each block's scores and probabilities are written into two buffers allocated once
# per call, so the block may exceed glibc's 32 MiB mmap threshold; larger blocks mean
# fewer calls into the consumers of each block.
BLOCK_ELEMENTS = 15 << 20

# what hidden keys score: finite, so `p * logit` is 0 (not NaN) where p == 0, and
# exp(NEG - max) underflows to exactly 0 whenever a row sees any key
NEG = torch.finfo(torch.float32).min


def default_block(batch: int, heads: int, nk: int) -> int:
    """Query rows per block: about :data:`BLOCK_ELEMENTS` floats of probabilities per block,
    a multiple of 64 rows (at least 64)."""
    return max(64, BLOCK_ELEMENTS // max(1, batch * heads * nk)) // 64 * 64


def _causal_hidden(rows: int, kend: int, tail: int, first_row: int, device) -> torch.Tensor:
    """Bool [rows, tail]: is key ``kend - tail + j`` after query ``first_row + i`` (absolute)."""
    q_pos = torch.arange(first_row, first_row + rows, device=device).unsqueeze(1)
    k_pos = torch.arange(kend - tail, kend, device=device).unsqueeze(0)
    return k_pos > q_pos


def attention_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float,
    block: int,
) -> Iterator[tuple[int, int, int, torch.Tensor, torch.Tensor]]:
    """Exact softmax by blocks of query rows: yields ``(r0, r1, kend, probs, logits)``.

    q [B, Hq, Nq, D], k [B, Hkv, Nk, D] (Hq a multiple of Hkv), ``mask`` bool
    broadcastable to [B, 1|Hq, Nq, Nk] (True = may attend), ``causal``
    bottom-right aligned. ``probs`` is float32 [B, Hq, r1 - r0, kend]: the
    attention of query rows ``r0:r1`` over keys ``0:kend`` (keys past ``kend``
    are causally hidden from every row of the block). ``logits`` (same shape)
    are the scaled scores the softmax was taken of, with :data:`NEG` (float32's
    lowest finite value) where a key is hidden or masked. Grouped-query heads
    are computed without repeating keys (query head h reads key/value head
    h // (Hq / Hkv)). Rows that see no key are zero. Without autograd both
    tensors live in buffers reused by the next block: they are only valid until
    the next block.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    offset = nk - nq
    qf = q.float() * scale
    # keys as [B, Hkv, D, Nk], contiguous once per call: each block's scores read a
    # prefix of its columns, a faster right-hand side than a transposed view
    kt = k.float().transpose(-1, -2).contiguous()
    # without gradients, every block's scores and probabilities are written into two
    # buffers sized for the largest block (no allocation per block); with gradients
    # each block has its own tensors (autograd may keep them, e.g. for an edit's backward)
    grad = torch.is_grad_enabled()
    size = 0 if grad else b * hq * min(block, nq) * nk
    s_buf = torch.empty(size, dtype=torch.float32, device=q.device)
    p_buf = torch.empty(size, dtype=torch.float32, device=q.device)
    triangle = None
    for r0 in range(0, nq, block):
        r1 = min(nq, r0 + block)
        rows = r1 - r0
        kend = min(nk, r1 + offset) if causal else nk
        qb = qf[:, :, r0:r1].reshape(b, hkv, g * rows, d)
        if grad:
            scores = torch.matmul(qb, kt[..., :kend])
        else:
            scores = s_buf[: b * hq * rows * kend].view(b, hkv, g * rows, kend)
            torch.matmul(qb, kt[..., :kend], out=scores)
        scores = scores.view(b, hkv, g, rows, kend)
        if causal:
            # only the last `rows` columns of a causal block hold hidden keys; where they
            # start at the block's first query they hide the same strict upper triangle
            tail = min(rows, kend)
            if tail == rows and kend - tail == r0 + offset:
                if triangle is None or triangle.shape[0] != rows:
                    triangle = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)
                hidden = triangle
            else:
                hidden = _causal_hidden(rows, kend, tail, r0 + offset, q.device)
            scores[..., kend - tail :].masked_fill_(hidden, NEG)
        if mask is not None:
            mb = mask[:, :, r0:r1, :kend] if mask.shape[-2] != 1 else mask[..., :kend]
            if mb.shape[1] == 1:
                mb = mb.unsqueeze(2)  # [B, 1, 1, rows, kend]
            else:
                mb = mb.reshape(mb.shape[0], hkv, g, mb.shape[2], kend)
            scores.masked_fill_(~mb, NEG)
        if grad:
            probs = torch.softmax(scores, dim=-1)
        else:
            probs = p_buf[: scores.numel()].view(scores.shape)
            torch.ops.aten._softmax.out(scores, -1, False, out=probs)
        probs = probs.view(b, hq, rows, kend)
        logits = scores.view(b, hq, rows, kend)
        if mask is not None:
            # a row that sees nothing has every logit at NEG (softmax made it uniform)
            dead = logits.amax(dim=-1, keepdim=True) <= NEG
            if bool(dead.any()):
                probs = probs.masked_fill(dead, 0.0) if grad else probs.masked_fill_(dead, 0.0)
        yield r0, r1, kend, probs, logits
        del scores, logits, probs
