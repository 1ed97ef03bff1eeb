"""Attention sinks: which key positions draw the most attention, layer by layer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._stream import column_sums
from .base import Analysis, CaptureInfo, register_analysis


@register_analysis
class Sinks(Analysis):
    """Attention sinks, found (not assumed) per layer, with the sink tokens' massive activations.

    Attention received (Gu et al. 2024, "When Attention Sink Emerges in Language
    Models", arXiv:2410.10781): for head ``h`` of layer ``l`` and key ``k``,
    ``alpha_k = mean_{t >= k} A_tk``, the mean weight that the queries able to see
    ``k`` put on it. Convention here: the first ``skip_rows`` query rows (default
    4) are left out of every mean, because a query that sees only a handful of
    keys gives each a large share trivially (row 0 must put all its weight on
    token 0). A head sinks into ``k`` when ``alpha_k > epsilon`` (the paper's
    ``epsilon = 0.3``); the paper's sink rate is the share of heads with
    ``alpha_0 > epsilon``.

    Sinks later in the sequence (Yu et al. 2024, "Unveiling and Harnessing Hidden
    Attention Sinks", arXiv:2406.15765; Wong et al. 2025, "On the Existence and
    Behaviour of Secondary Attention Sinks", arXiv:2512.22213) are found by
    ranking every key position by its head-mean ``alpha_k`` in each layer. Only
    keys seen by at least ``max(min_observers, N / 4)`` queries compete (so the
    last tokens, attended by a few neighbours, are not crowned on their word).
    The ``top_k`` positions per layer are reported with their tokens, the number
    of heads with ``alpha_k > epsilon`` (``heads``) and ``ratio``: ``alpha_k``
    over what uniform causal attention would give that key
    (``mean_t 1 / (t + 1)``). Following Yu et al., who call a token a sink when
    it draws far more than its uniform share, a position is a sink
    (``is_sink``) when ``ratio >= ratio_min`` (default 10); a sink other than
    position 0 is a secondary sink. Secondary sinks draw less than the first
    token (Wong et al.), so the ratio, not Gu's absolute ``epsilon``, decides.

    Massive activations (Sun et al. 2024, "Massive Activations in Large Language
    Models", arXiv:2402.17762): for every sink found, the largest-magnitude
    dimensions of that token's hidden state entering the layer, with their
    ratio to the median magnitude of the layer's hidden states; the paper calls
    an activation massive when it exceeds 100 and 1000x the median.

    Rows: per (layer, head) ``first_token_attention`` (``alpha_0``) and
    ``top_attention`` (the largest ``alpha_k``, with ``position``/``token``); per
    layer (``head=None``) ``sink_rate`` and ``sink`` (``rank``, ``position``,
    ``token``, ``heads``, ``ratio``, ``kind`` = first|secondary, ``is_sink``); per sink and
    layer ``massive_activation`` (``position``, ``dim``, ``value``, ``ratio``,
    ``massive``). :attr:`alpha` keeps ``alpha`` as float [layers, heads, N].
    """

    name = "sinks"
    default = True
    needs_hidden_states = True

    def __init__(
        self,
        epsilon: float = 0.3,
        top_k: int = 3,
        skip_rows: int = 4,
        min_observers: int = 16,
        massive_dims: int = 3,
        ratio_min: float = 10.0,
    ):
        self.ratio_min = ratio_min
        self.epsilon = epsilon
        self.top_k = top_k
        self.skip_rows = skip_rows
        self.min_observers = min_observers
        self.massive_dims = massive_dims

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        self.received = None  # [L, H, Nk] float64
        self.batch = int(info.input_ids.shape[0]) if info.input_ids is not None else 1

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        _, h, r, nk = probs.shape
        if self.received is None or self.received.shape[-1] < nk:
            grown = torch.zeros(self.info.n_layers, h, nk, dtype=torch.float64)
            if self.received is not None:
                grown[..., : self.received.shape[-1]] = self.received
            self.received = grown
        start = 0 if rows.start is None else rows.start
        cut = max(0, self.skip_rows - start)  # rows are consecutive positions
        if cut >= r:
            return
        s = column_sums(probs[:, :, cut:] if cut else probs)  # [H, Nk], shared by block
        self.received[layer, :, :nk] += s.to(torch.float64).cpu()

    def _observers(self, n: int) -> torch.Tensor:
        """How many (batch, query) pairs the mean for each key runs over."""
        j = torch.arange(n)
        n_rows = self.info.seq_len if self.info.seq_len else n
        if self.info.causal:
            first = torch.clamp(j, min=self.skip_rows)
        else:
            first = torch.full_like(j, self.skip_rows)
        return (n_rows - first).clamp_min(0).to(torch.float64) * self.batch

    def _uniform(self, n: int) -> torch.Tensor:
        """Each key's ``alpha`` under uniform attention over the visible keys."""
        n_rows = self.info.seq_len if self.info.seq_len else n
        if not self.info.causal:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        inv = 1.0 / torch.arange(1, n_rows + 1, dtype=torch.float64)  # row t gives 1/(t+1)
        inv[: self.skip_rows] = 0.0
        tail = inv.flip(0).cumsum(0).flip(0)  # sum_{t >= j} 1/(t+1)
        obs = self._observers(n) / self.batch
        return tail[:n] / obs.clamp_min(1.0)

    def finish(self) -> list[dict[str, Any]]:
        if self.received is None:
            return []
        n = self.received.shape[-1]
        obs = self._observers(n)
        alpha = self.received / obs.clamp_min(1.0)
        self.alpha = alpha.float()
        need = min(max(self.min_observers, n // 4), max(1, n // 2)) * self.batch
        uniform = self._uniform(n)
        eligible = obs >= need
        tokens = self.info.tokens or []

        def tok(pos: int):
            return tokens[pos] if pos < len(tokens) else None

        out: list[dict[str, Any]] = []
        n_layers, n_heads = alpha.shape[:2]
        masked = torch.where(eligible, alpha, torch.full_like(alpha, -1.0))
        for layer in range(n_layers):
            for head in range(n_heads):
                out.append(
                    {
                        "analysis": self.name,
                        "layer": layer,
                        "head": head,
                        "metric": "first_token_attention",
                        "value": float(alpha[layer, head, 0]),
                    }
                )
                pos = int(masked[layer, head].argmax())
                out.append(
                    {
                        "analysis": self.name,
                        "layer": layer,
                        "head": head,
                        "metric": "top_attention",
                        "value": float(alpha[layer, head, pos]),
                        "position": pos,
                        "token": tok(pos),
                    }
                )
            rate = float((alpha[layer, :, 0] > self.epsilon).double().mean())
            out.append(
                {
                    "analysis": self.name,
                    "layer": layer,
                    "head": None,
                    "metric": "sink_rate",
                    "value": rate,
                    "epsilon": self.epsilon,
                }
            )
            score = masked[layer].mean(0)  # head-mean alpha, ineligible keys < 0
            k = min(self.top_k, int(eligible.sum()))
            for rank, pos in enumerate(score.topk(k).indices.tolist()):
                heads = int((alpha[layer, :, pos] > self.epsilon).sum())
                ratio = float(score[pos] / uniform[pos])
                out.append(
                    {
                        "analysis": self.name,
                        "layer": layer,
                        "head": None,
                        "metric": "sink",
                        "value": float(score[pos]),
                        "rank": rank,
                        "position": pos,
                        "token": tok(pos),
                        "heads": heads,
                        "ratio": ratio,
                        "is_sink": ratio >= self.ratio_min,
                        "kind": "first" if pos == 0 else "secondary",
                    }
                )
        out.extend(self._massive(out))
        out.append(
            {
                "analysis": self.name,
                "layer": None,
                "head": None,
                "metric": "sink_rate",
                "value": float((alpha[:, :, 0] > self.epsilon).double().mean()),
                "epsilon": self.epsilon,
            }
        )
        return out

    def _massive(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        hs = self.info.hidden_states
        if not hs:
            return []
        out = []
        medians: dict[int, float] = {}  # layer -> median magnitude of its hidden states
        for row in rows:
            if row["metric"] != "sink" or not row["is_sink"] or row["layer"] >= len(hs):
                continue
            h = hs[row["layer"]][0].float()  # [N, D] entering the layer
            if row["layer"] not in medians:
                medians[row["layer"]] = _median_abs(h) or 1e-12
            median = medians[row["layer"]]
            x = h[row["position"]]
            top = x.abs().topk(min(self.massive_dims, x.numel())).indices.tolist()
            for dim in top:
                value = float(x[dim])
                ratio = abs(value) / median
                out.append(
                    {
                        "analysis": self.name,
                        "layer": row["layer"],
                        "head": None,
                        "metric": "massive_activation",
                        "value": value,
                        "position": row["position"],
                        "token": row["token"],
                        "dim": dim,
                        "ratio": ratio,
                        "massive": abs(value) > 100 and ratio > 1000,
                    }
                )
        return out


def _median_abs(h: torch.Tensor) -> float:
    """The median of ``|h|`` (the lower one for an even count, as :func:`torch.median`),
    by a linear-time partition (several times faster than sorting on CPU)."""
    a = np.abs(h.detach().cpu().numpy()).ravel()  # a fresh array: partitioned in place
    k = (a.size - 1) // 2
    a.partition(k)
    return float(a[k])
