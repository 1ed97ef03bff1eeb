"""The FlexAttention block-sparse path: ``torch.nn.attention.flex_attention`` with a
``BlockMask`` built from a :class:`BlockLayout` (Dong et al., "Flex Attention: A
Programming Model for Generating Optimized Attention Kernels", arXiv:2412.05496)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..checks import FLOAT_DTYPES
from .layout import BlockLayout
from .pieces import pad_to

# dtypes that FlexAttention's CPU kernel computes in
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# below this many padded (query, key) pairs the flex path runs FlexAttention
# uncompiled: compiling one kernel costs far longer than such a call
FLEX_COMPILE_MIN_PAIRS = 64 * 64

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
    if mask is None:
        return layout.cached("flex", lambda: _block_mask(layout, None))
    return _block_mask(layout, mask)


def _block_mask(layout: BlockLayout, mask: torch.Tensor | None):
    from torch.nn.attention.flex_attention import BlockMask

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
    return BlockMask.from_kv_blocks(
        num,
        idx,
        full_num,
        full_idx,
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(layout.q_blocks * bs, layout.k_blocks * bs),
        compute_q_blocks=False,
    )


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
    qp = pad_to(q, layout.q_blocks * bs)
    kp, vp = pad_to(k, layout.k_blocks * bs), pad_to(v, layout.k_blocks * bs)
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
    """Why the flex backend cannot take these inputs (empty when it can)."""
    reasons = []
    if q.dtype not in FLEX_DTYPES:
        reasons.append(
            "backend: 'flex' computes in float32, bfloat16 or float16, got "
            f"{FLOAT_DTYPES[q.dtype]}; use backend='torch' or 'auto'"
        )
    if q.requires_grad or k.requires_grad or v.requires_grad:
        reasons.append(
            "backend: 'flex' has no backward on this device; use backend='torch' or 'auto' "
            "for training"
        )
    return reasons
