"""Exact softmax attention computed explicitly, block by block, for probes and edits.

When a capture is running, an edit needs probabilities, or the caller asked for
``output_attentions``, attnlab's attention hook does not call a fused kernel:
it computes exact softmax attention one block of query rows at a time
(:func:`attnlab.core.softmax_blocks.attention_blocks`), hands each block to the
active probes, lets the edits change it, and writes the block's ``P @ V``. No
layer's N x N map is kept unless the weights were asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnlab.core.errors import AttnInputError
from attnlab.core.mechanism import Mechanism
from attnlab.core.softmax_blocks import attention_blocks, default_block

from .probes import AttentionEdit, AttentionProbe


@dataclass
class Capture:
    """What the attention hook does with each layer during a captured pass."""

    probes: list[AttentionProbe]
    block: int | None = None
    keep: dict[int, list[int] | None] = field(default_factory=dict)  # layer -> q heads
    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    progress: Any = None


def explicit_attention(
    mechanism: Mechanism | None,
    capture: Capture | None,
    edits: Sequence[AttentionEdit],
    layer: int | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float | None,
    keep_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact softmax attention by blocks of query rows, feeding probes and edits.

    q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], mask bool broadcastable
    to [B, 1|Hq, Nq, Nk] (True = may attend), causal bottom-right. Returns the
    output [B, Hq, Nq, Dv] in q's dtype and, with ``keep_weights``, the attention
    weights [B, Hq, Nq, Nk] in q's dtype (as edited; None otherwise).
    ``mechanism`` must be exact softmax (or None, meaning softmax).
    """
    if mechanism is not None and not mechanism.spec.exact:
        raise AttnInputError(
            f"mechanism: capture and probability edits measure exact softmax attention; "
            f"{mechanism.spec.name!r} is not exact (leave attnlab.use(...) for the capture)"
        )
    if layer is None and (capture is not None or edits):
        raise AttnInputError("layer: the model's attention module has no layer_idx")
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)
    offset = nk - nq
    probes = capture.probes if capture is not None else []
    block = (capture.block if capture is not None else None) or default_block(b, hq, nk)
    if mask is not None and mask.dim() != 4:
        raise AttnInputError(f"attention_mask: expected a 4-d bool mask, got {tuple(mask.shape)}")
    prob_edits = [e for e in edits if e.needs_probs or e.has_probs]
    out_edits = [e for e in edits if not (e.needs_probs or e.has_probs)]
    for e in prob_edits:
        e.prepare(layer, q, k, causal=causal, mask=mask, scale=scale)
    out = torch.empty(b, hq, nq, v.shape[-1], dtype=torch.float32, device=q.device)
    weights = torch.zeros(b, hq, nq, nk, dtype=q.dtype, device=q.device) if keep_weights else None
    vf = v.float()
    for r0, r1, kend, probs, logits in attention_blocks(
        q, k, causal=causal, mask=mask, scale=scale, block=block
    ):
        rows = r1 - r0
        for e in prob_edits:
            probs = e.probs(layer, probs, r0 + offset)
        if prob_edits:
            logits = None  # the edited weights are no longer a softmax of these scores
        if probes:
            sl = slice(r0 + offset, r1 + offset)
            for probe in probes:
                if probe.uses_logits:
                    probe.update(layer, probs, sl, logits=logits)
                else:
                    probe.update(layer, probs, sl)
        if weights is not None:
            weights[:, :, r0:r1, :kend] = probs
        pv = torch.matmul(probs.reshape(b, hkv, g * rows, kend), vf[:, :, :kend])
        out[:, :, r0:r1] = pv.view(b, hq, rows, -1)
        del probs, logits, pv
    if capture is not None and layer in capture.keep:
        _keep_qkv(capture, layer, q, k, v)
    out = out.to(q.dtype)
    for e in out_edits:
        out = e.output(layer, out, q, k, v)
    if capture is not None and capture.progress is not None:
        capture.progress.update(1)
    return out, weights


def _keep_qkv(cap: Capture, layer: int, q, k, v) -> None:
    hq, hkv = q.shape[1], k.shape[1]
    heads = cap.keep[layer]
    heads = list(range(hq)) if heads is None else list(heads)
    kv_heads = [h // (hq // hkv) for h in heads]
    cap.kept[f"layer{layer}.q"] = q[:, heads].detach().float().cpu().contiguous()
    cap.kept[f"layer{layer}.k"] = k[:, kv_heads].detach().float().cpu().contiguous()
    cap.kept[f"layer{layer}.v"] = v[:, kv_heads].detach().float().cpu().contiguous()
