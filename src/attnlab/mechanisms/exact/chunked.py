"""Memory-efficient exact attention after Rabe & Staats (arXiv:2112.05682).

Compared with the paper's own JAX listing (_query_chunk_attention with summarize_chunk,
jax.checkpoint and a stop-gradient on the chunk maximum, reproduced in many
repositories): the same chunk summaries and log-sum-exp merge; on purpose the backward
recomputes each score chunk from the saved per-row log-sum-exp, where the listing
checkpoints each chunk summary, to the same memory bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Mechanism, Spec, register
from attnlab.core.masks import divide_or_zero, repeat_kv, seen, slice_mask
from attnlab.core.mechanism import KVCacheDecode


def _chunk_allowed(mask, causal, qs, ks, offset, device):
    """The bool mask of one (query chunk, key chunk) pair, or None when all is allowed."""
    allowed = slice_mask(mask, qs, ks)
    if causal and ks.stop - 1 > qs.start + offset:
        rows = torch.arange(qs.start, qs.stop, device=device).unsqueeze(1)
        cols = torch.arange(ks.start, ks.stop, device=device).unsqueeze(0)
        horizon = cols <= rows + offset
        allowed = horizon if allowed is None else allowed & horizon
    return allowed


def _key_chunks(nk, q_chunk, causal, offset, key_chunk):
    """Key chunk slices that a query chunk can see (future chunks skipped when causal)."""
    last = nk if not causal else min(nk, q_chunk.stop + offset)
    return [slice(k0, min(k0 + key_chunk, last)) for k0 in range(0, max(last, 0), key_chunk)]


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half-precision inputs, else the input's own."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _scores(q, k, scale, allowed):
    s = (q @ k.transpose(-1, -2)).to(_acc(q)) * scale
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


class _ChunkedAttention(torch.autograd.Function):
    """Forward by chunk summaries, backward by recomputing each chunk's scores.

    Forward keeps only the output and the per-row log-sum-exp; backward
    recomputes every (query chunk, key chunk) score block from them, so no
    N x N matrix is ever stored (the paper uses checkpointing to the same end).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, query_chunk, key_chunk):
        nq, nk = q.shape[2], k.shape[2]
        offset = nk - nq
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(*q.shape[:3], 1, dtype=_acc(q), device=q.device)
        for q0 in range(0, nq, query_chunk):
            qs = slice(q0, min(q0 + query_chunk, nq))
            q_c = q[:, :, qs]
            # one summary per key chunk: (values weighted by exp, sum of exp, max)
            values, sums, maxes = [], [], []
            for ks in _key_chunks(nk, qs, causal, offset, key_chunk):
                s = _scores(
                    q_c, k[:, :, ks], scale, _chunk_allowed(mask, causal, qs, ks, offset, q.device)
                )
                m = s.amax(dim=-1, keepdim=True)
                e = torch.exp(s - m.masked_fill(torch.isinf(m), 0.0))
                values.append((e.to(v.dtype) @ v[:, :, ks]).to(_acc(q)))
                sums.append(e.sum(dim=-1, keepdim=True))
                maxes.append(m)
            if not maxes:  # no key is visible to this query chunk
                out[:, :, qs] = 0
                lse[:, :, qs] = float("-inf")
                continue
            m_all = torch.stack(maxes).amax(dim=0)
            m_safe = m_all.masked_fill(torch.isinf(m_all), 0.0)
            total_v = sum(val * torch.exp(m - m_safe) for val, m in zip(values, maxes, strict=True))
            total_s = sum(sm * torch.exp(m - m_safe) for sm, m in zip(sums, maxes, strict=True))
            out[:, :, qs] = divide_or_zero(total_v, total_s).to(q.dtype)
            lse[:, :, qs] = torch.where(
                seen(total_s),
                m_safe + torch.log(total_s.clamp_min(torch.finfo(total_s.dtype).tiny)),
                float("-inf"),
            )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.causal, ctx.scale = mask, causal, scale
        ctx.chunks = (query_chunk, key_chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        mask, causal, scale = ctx.mask, ctx.causal, ctx.scale
        query_chunk, key_chunk = ctx.chunks
        nq, nk = q.shape[2], k.shape[2]
        offset = nk - nq
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # delta_i = sum_d dO_id O_id, the row term of the softmax Jacobian
        acc = _acc(q)
        delta = (grad_out.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True)
        lse_safe = lse.masked_fill(torch.isinf(lse), float("inf"))
        for q0 in range(0, nq, query_chunk):
            qs = slice(q0, min(q0 + query_chunk, nq))
            q_c, do_c = q[:, :, qs], grad_out[:, :, qs].to(acc)
            for ks in _key_chunks(nk, qs, causal, offset, key_chunk):
                s = _scores(
                    q_c, k[:, :, ks], scale, _chunk_allowed(mask, causal, qs, ks, offset, q.device)
                )
                p = torch.exp(s - lse_safe[:, :, qs])  # exact probabilities of this block
                dv[:, :, ks] += (p.transpose(-1, -2) @ do_c).to(v.dtype)
                dp = do_c @ v[:, :, ks].to(acc).transpose(-1, -2)
                ds = p * (dp - delta[:, :, qs]) * scale
                dq[:, :, qs] += (ds @ k[:, :, ks].to(acc)).to(q.dtype)
                dk[:, :, ks] += (ds.transpose(-1, -2) @ q_c.to(acc)).to(k.dtype)
        return dq, dk, dv, None, None, None, None, None


@register
class Chunked(KVCacheDecode, Mechanism):
    """Exact attention in O(N) memory: "Self-attention Does Not Need O(n²) Memory".

    Rabe & Staats (arXiv:2112.05682): queries are split into chunks; for each,
    the keys and values are processed chunk by chunk into summaries (weighted
    values, sum of exponentials, chunk maximum) that are combined with a
    log-sum-exp rescaling. The backward pass recomputes each chunk's scores
    from the saved log-sum-exp instead of storing the attention matrix.
    """

    spec = Spec(
        name="chunked",
        family="exact",
        title="Memory-efficient chunked attention (Rabe & Staats)",
        paper="arXiv:2112.05682",
        exact=True,
        decode=True,
        complexity="O(N²·D) time, O(N) memory",
    )
    tiny_config: ClassVar[dict] = {"query_chunk": 7, "key_chunk": 5}

    @dataclass
    class Config:
        query_chunk: int = 1024
        key_chunk: int = 4096

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return _ChunkedAttention.apply(
            q, k, v, mask, causal, scale, self.config.query_chunk, self.config.key_chunk
        )
