"""How far back heads look: mean attention distance, windowed average attention
distance (WAAD) and future attention influence (FAI)."""

from __future__ import annotations

from typing import Any

import torch

from ._stream import PerHead, distances, query_positions
from .base import Analysis, CaptureInfo


class AttentionDistance(Analysis):
    """Mean attention distance and windowed average attention distance per head.

    For query row ``i`` with weights ``a_ij``:

    - ``mean_distance``: ``sum_j a_ij |i - j|``, the expected distance in tokens
      between a query and the keys it attends (the "mean attention distance" of
      Dosovitskiy et al. 2020, arXiv:2010.11929, in token units).
    - ``waad`` (windowed average attention distance, "Attention Illuminates LLM
      Reasoning", Li et al. 2025, arXiv:2510.13554): ``sum_j a_ij min(i - j, W)``
      over the keys before ``i``: backward attention distance clipped at a window
      ``W`` (default 10), so one glance at a far sink does not swamp the measure.
      Low WAAD marks locally focused heads (the paper's near-diagonal "sawtooth"
      heads), WAAD near ``W`` marks heads that look beyond the window.

    Both are averaged over the query rows ``i >= skip_rows`` (default 1: row 0
    can only see itself) and the batch.
    """

    name = "distance"

    def __init__(self, window: int = 10, skip_rows: int = 1):
        self.window = window
        self.skip_rows = skip_rows

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        self.acc = PerHead(info.n_layers, info.n_heads, "mean_distance", "waad")

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        b, _, r, nk = probs.shape
        keep = query_positions(rows, r, probs.device) >= self.skip_rows  # [r]
        if not bool(keep.any()):
            return
        p = probs[:, :, keep].float()
        d = distances(rows, r, nk, probs.device)[keep]  # [r', Nk]
        mean_d = (p * d.abs()).sum(-1)  # [B, H, r']
        waad = (p * d.clamp(0, self.window)).sum(-1)
        self.acc.add(
            layer,
            float(b * int(keep.sum())),
            mean_distance=mean_d.sum((0, 2)),
            waad=waad.sum((0, 2)),
        )

    def finish(self) -> list[dict[str, Any]]:
        out = []
        for metric in ("mean_distance", "waad"):
            t = self.acc.mean(metric)
            for layer in range(t.shape[0]):
                for head in range(t.shape[1]):
                    row = {
                        "analysis": self.name,
                        "layer": layer,
                        "head": head,
                        "metric": metric,
                        "value": float(t[layer, head]),
                    }
                    if metric == "waad":
                        row["window"] = self.window
                    out.append(row)
        return out


class FutureInfluence(Analysis):
    """Future attention influence (FAI) of each token, per head.

    After "Attention Illuminates LLM Reasoning" (Li et al. 2025,
    arXiv:2510.13554): the influence of token ``s`` on what follows is the
    average attention it receives from the later tokens,
    ``FAI_s = 1 / (N - s - 1) * sum_{t > s} a_ts`` (causal models; the query
    ``t = s`` itself is not counted). Globally focused heads give a few tokens a
    high FAI (the paper's "anchor" tokens).

    Reported per (layer, head) as ``fai_peak``: the highest FAI among the tokens
    ``s >= 1`` that at least ``min_followers`` later tokens see (the first token is
    the attention sink, measured by :class:`~attnlab.analysis.sinks.Sinks`, and the
    last tokens have too few followers to average over), with the token's
    ``position`` and text; and ``fai_first``: the FAI of the first token.
    Per-token values averaged over heads are kept in :attr:`fai` ([layers, N]).
    """

    name = "fai"

    def __init__(self, min_followers: int = 8):
        self.min_followers = min_followers

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        self.received = None  # [L, H, Nk] float64 sums over later queries
        self.batch = int(info.input_ids.shape[0]) if info.input_ids is not None else 1

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        _, h, r, nk = probs.shape
        if self.received is None or self.received.shape[-1] < nk:
            grown = torch.zeros(self.info.n_layers, h, nk, dtype=torch.float64)
            if self.received is not None:
                grown[..., : self.received.shape[-1]] = self.received
            self.received = grown
        later = distances(rows, r, nk, probs.device) > 0  # t > s
        s = (probs.float() * later).sum((0, 2))  # [H, Nk]
        self.received[layer, :, :nk] += s.to(torch.float64).cpu()

    def finish(self) -> list[dict[str, Any]]:
        if self.received is None:
            return []
        n = self.received.shape[-1]
        followers = (n - 1 - torch.arange(n, dtype=torch.float64)) * self.batch
        fai = self.received / followers.clamp_min(1.0)
        self.fai = fai.mean(1)
        tokens = self.info.tokens
        out = []
        eligible = torch.arange(n) >= 1
        eligible &= (n - 1 - torch.arange(n)) >= self.min_followers
        for layer in range(fai.shape[0]):
            for head in range(fai.shape[1]):
                out.append(
                    {
                        "analysis": self.name,
                        "layer": layer,
                        "head": head,
                        "metric": "fai_first",
                        "value": float(fai[layer, head, 0]),
                        "position": 0,
                        "token": tokens[0] if tokens else None,
                    }
                )
                if bool(eligible.any()):
                    vals = torch.where(eligible, fai[layer, head], torch.full_like(fai[0, 0], -1))
                    pos = int(vals.argmax())
                    out.append(
                        {
                            "analysis": self.name,
                            "layer": layer,
                            "head": head,
                            "metric": "fai_peak",
                            "value": float(vals[pos]),
                            "position": pos,
                            "token": tokens[pos] if pos < len(tokens) else None,
                        }
                    )
        return out
