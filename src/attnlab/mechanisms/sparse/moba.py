"""MoBA: Mixture of Block Attention (Lu et al., arXiv:2502.13189).

The registered mechanism, its gate (:func:`moba_select`) and the choice of path; the
paths live apart: the compiled kernel (:func:`attnlab.core.native.moba`), the tiled
flash-kernel path (:mod:`._moba_tiled`), token blocks of the shared routed engine
(:func:`._routed.token_block_attention`) and FlexAttention (:mod:`._moba_flex`).

Compared with MoonshotAI/MoBA (moba_attn_varlen_naive, its reference): the same gate
q·mean(K_b), the own block always taken and counted in top_k, other blocks only when
wholly in the past, one softmax over the chosen keys, per head; the authors define only
the causal form, and the non-causal form here (any other block may be chosen) is
attnlab's extension.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Mechanism, Spec, native, register
from attnlab.core.blocks import BACKENDS, check_backend, flex_unsupported
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv
from attnlab.core.mechanism import KVCacheDecode

from ._moba_flex import flex_moba
from ._moba_tiled import TiledMoBA, tiled_applies, tiled_moba
from ._routed import NEG_INF, pool_blocks, token_block_attention

# queries gated at a time in moba_others (their gate rows stay in cache)
_GATE_ROWS = 2048


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

    Paths (``backend``): for inference on CPU in float32 without a mask (Dv a
    multiple of 16), ``"auto"`` runs the compiled kernel ``csrc/moba.c``
    (:func:`attnlab.core.native.moba`: gate, top-k and each query's one
    online softmax over its blocks, fused; its speed against SDPA is recorded
    in ``benchmarks/speed-cpu.json``) where it was built.
    Otherwise, on CPU in float32/float64, with no mask and whole blocks of as
    many queries as keys, ``"auto"`` takes :func:`._moba_tiled.tiled_moba`,
    head by head: each query's own block in one fused
    flash-kernel call per sub-block, then, for every key block, all queries
    that chose it in one call reading the block in place, merged by
    log-sum-exp; with gradients the same tiles run the kernel's backward
    (:func:`._moba_tiled.tiled_moba_backward`, exact given the merged log-sum-exp), so it
    is the trainable path and the inference path where the compiled kernel
    does not apply. Otherwise ``"auto"`` and ``"torch"`` sort the (query,
    block) choices by key block into tiles of ``block`` queries sharing one
    block, run all tiles as one batch and merge each query's partial
    softmaxes by log-sum-exp: in the fused kernel where it applies
    (``"auto"``), else in plain PyTorch ops (trainable by autograd).
    ``"flex"`` runs FlexAttention over the union of the blocks each query
    block chose, with a per-token rule (:mod:`._moba_flex`; inference only;
    compiled per shape, slower than ``"auto"`` on CPU).
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
    backends: ClassVar[tuple[str, ...]] = BACKENDS

    @dataclass
    class Config:
        block: int = 512
        top_k: int = 3
        backend: str = "auto"

        def __post_init__(self):
            check_positive_int("block", self.block)
            check_positive_int("top_k", self.top_k)
            check_backend(self.backend)

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if self.config.backend == "flex":
            reasons += flex_unsupported(q, k, v)
        return reasons

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        cfg = self.config
        if cfg.backend == "auto" and native.moba_applies(q, k, v, mask=mask):
            return native.moba(
                q, k, v, block=cfg.block, top_k=cfg.top_k, causal=causal, scale=scale
            )
        if cfg.backend == "auto" and tiled_applies(q, k, v, block=cfg.block, mask=mask):
            other = moba_others(q, k, block=cfg.block, top_k=cfg.top_k, causal=causal)
            grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
            if grad:
                return TiledMoBA.apply(q, k, v, other, cfg.block, scale, causal)
            return tiled_moba(q, k, v, other, block=cfg.block, scale=scale, causal=causal)
        sel = moba_select(q, k, block=cfg.block, top_k=cfg.top_k, causal=causal)
        if cfg.backend == "flex":
            return flex_moba(q, k, v, sel, block=cfg.block, scale=scale, causal=causal, mask=mask)
        out = token_block_attention(
            q,
            k,
            v,
            sel,
            block=cfg.block,
            scale=scale,
            causal=causal,
            mask=mask,
            fused=cfg.backend == "auto",
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
