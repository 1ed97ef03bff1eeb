"""What both block-sparse CPU paths compute with: a piece's keys and values (a sliding
view of a band, or gathered blocks) and the merge of two partial softmaxes by their
log-sum-exps (the fused CPU flash kernel returns them)."""

from __future__ import annotations

import torch

from ..checks import FLOAT_DTYPES


def pad_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, H, N, D] zero-padded to ``n`` tokens."""
    if x.shape[2] == n:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


def blocked(x: torch.Tensor, blocks: int, block: int) -> torch.Tensor:
    """x [B, H, N, D] padded to ``blocks`` whole blocks as [B, H, blocks, block, D], its
    tokens contiguous (what the strided band views assume)."""
    x = pad_to(x, blocks * block)
    if x.stride()[2:] != (x.shape[-1], 1):
        x = x.contiguous()
    return x.unflatten(2, (blocks, block))


def sliding_view(x: torch.Tensor, start: int, count: int, length: int, step: int):
    """[B, H, count, length, D] view of blocked [B, H, nb, bs, D] whose row i starts at
    token (start + i)·step; no copy when x is contiguous along its tokens."""
    b, h, _, bs, d = x.shape
    if x.stride()[2:] != (bs * d, d, 1):
        x = x.contiguous()
    s = x.stride()
    offset = x.storage_offset() + start * bs * d
    return x.as_strided((b, h, count, length, d), (s[0], s[1], step * d, d, 1), offset)


def piece_keys(kb, vb, c0, c1, start, rows, used, bh):
    """Keys and values [B·H, c, used·bk, D] of query blocks c0..c1 from blocked ``kb``,
    ``vb`` [B, Hkv, nb, bk, D]: the sliding band of ``used`` blocks from key block
    ``start`` (a view), or, where ``start`` is None, the blocks ``rows`` of the flattened
    [B·Hkv·nb] key blocks (gathered)."""
    bs = kb.shape[3]
    if start is None:
        return (
            x.reshape(-1, bs, x.shape[-1]).index_select(0, rows).view(bh, c1 - c0, used * bs, -1)
            for x in (kb, vb)
        )
    return (sliding_view(x, start, c1 - c0, used * bs, bs).flatten(0, 1) for x in (kb, vb))


def lse_merge(o_a, lse_a, o_b, lse_b, out=None):
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


def lse_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the CPU flash kernel that also returns log-sum-exps takes these inputs."""
    return q.device.type == "cpu" and q.dtype in FLOAT_DTYPES and k.shape[-1] == v.shape[-1]
