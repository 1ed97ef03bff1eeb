"""Entropy of each head's attention rows."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._stream import PerHead, query_positions, row_entropy
from .base import Analysis, CaptureInfo, register_analysis


@register_analysis
class Entropy(Analysis):
    """Shannon entropy of each attention row, averaged per (layer, head).

    For query row ``i`` with weights ``p_ij`` over the keys it may see,
    ``H_i = -sum_j p_ij log p_ij`` (nats). Reported per head as the mean over
    the query rows and the batch:

    - ``entropy``: mean ``H_i``; 0 for a head that always looks at one key.
    - ``normalized_entropy``: mean of ``H_i / log(n_i)``, where ``n_i`` is the
      number of keys row ``i`` may see (``i + 1`` when causal), over rows with
      ``n_i >= 2``; 1 for uniform attention, so heads are comparable across
      positions and lengths (as in the head surveys of Clark et al. 2019,
      "What Does BERT Look At?", arXiv:1906.04341, and Vig & Belinkov 2019).

    Rows that see nothing (all-zero weights, e.g. padding) are left out. In a
    capture the entropy comes from the scores, ``H_i = lse_i - sum_j p_ij s_ij``
    (the same quantity without a logarithm over the block).
    """

    name = "entropy"
    default = True
    uses_logits = True

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        self.acc = PerHead(info.n_layers, info.n_heads, "entropy")
        self.norm = PerHead(info.n_layers, info.n_heads, "normalized_entropy")

    def update(
        self, layer: int, probs: torch.Tensor, rows: slice, logits: torch.Tensor | None = None
    ) -> None:
        h, alive = row_entropy(probs, logits)  # [B, H, r]
        n_keys = probs.shape[-1]
        pos = query_positions(rows, probs.shape[-2], probs.device)
        n_vis = (pos + 1).clamp(max=n_keys) if self.info.causal else torch.full_like(pos, n_keys)
        log_n = torch.log(n_vis.to(torch.float32))
        wide = (n_vis >= 2)[None, None, :] & alive
        self.acc.add(layer, alive.sum((0, 2)).to(torch.float64), entropy=(h * alive).sum((0, 2)))
        hn = torch.where(wide, h / log_n.clamp_min(1e-12), 0.0)
        self.norm.add(layer, wide.sum((0, 2)).to(torch.float64), normalized_entropy=hn.sum((0, 2)))

    def finish(self) -> list[dict[str, Any]]:
        ent, nent = self.acc.mean("entropy"), self.norm.mean("normalized_entropy")
        out = []
        for layer in range(ent.shape[0]):
            for head in range(ent.shape[1]):
                for metric, t in (("entropy", ent), ("normalized_entropy", nent)):
                    value = float(t[layer, head])
                    out.append(
                        {
                            "analysis": self.name,
                            "layer": layer,
                            "head": head,
                            "metric": metric,
                            "value": value if math.isfinite(value) else None,
                        }
                    )
        return out
