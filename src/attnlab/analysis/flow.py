"""Attention rollout and attention flow (Abnar & Zuidema 2020)."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from .base import Analysis, CaptureInfo


def max_flow(capacity: list[dict[int, float]], source: int, sink: int) -> float:
    """Maximum flow from ``source`` to ``sink`` (Dinic's algorithm).

    ``capacity[u][v]``: capacity of the directed edge ``u -> v``. Small graphs
    only (pure Python): attention graphs of a few layers and a few dozen tokens.
    """
    n = len(capacity)
    residual = [dict(edges) for edges in capacity]
    for u in range(n):
        for v in capacity[u]:
            residual[v].setdefault(u, 0.0)
    eps = 1e-12
    total = 0.0
    while True:
        level = [-1] * n
        level[source] = 0
        queue = deque([source])
        while queue:
            u = queue.popleft()
            for v, c in residual[u].items():
                if c > eps and level[v] < 0:
                    level[v] = level[u] + 1
                    queue.append(v)
        if level[sink] < 0:
            return total
        it = [list(residual[u]) for u in range(n)]
        pos = [0] * n

        def push(u: int, limit: float, level=level, it=it, pos=pos) -> float:
            if u == sink:
                return limit
            while pos[u] < len(it[u]):
                v = it[u][pos[u]]
                c = residual[u][v]
                if c > eps and level[v] == level[u] + 1:
                    pushed = push(v, min(limit, c))
                    if pushed > eps:
                        residual[u][v] -= pushed
                        residual[v][u] += pushed
                        return pushed
                pos[u] += 1
            return 0.0

        while True:
            pushed = push(source, float("inf"))
            if pushed <= eps:
                break
            total += pushed


def residual_attention(mean_attention: torch.Tensor) -> torch.Tensor:
    """``0.5 A + 0.5 I`` with rows renormalised: attention plus the residual path."""
    n = mean_attention.shape[-1]
    a = 0.5 * mean_attention.double() + 0.5 * torch.eye(n, dtype=torch.float64)
    return a / a.sum(-1, keepdim=True).clamp_min(1e-30)


def rollout(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Attention rollout after each layer: ``R_l = Ã_l R_{l-1}``, ``R_0 = I``.

    ``layers[l]``: head-averaged attention [N, N] of layer ``l``; ``Ã`` adds the
    residual path (:func:`residual_attention`). ``R_l[i, j]``: how much of
    token ``j``'s input reaches position ``i`` after layer ``l``.
    """
    out, r = [], None
    for a in layers:
        a = residual_attention(a)
        r = a if r is None else a @ r
        out.append(r)
    return out


def attention_flow(layers: list[torch.Tensor], targets: list[int] | None = None) -> torch.Tensor:
    """Attention flow: float64 [len(targets), N], max-flow from each input token to each
    target position of the last layer.

    The attention graph (Abnar & Zuidema 2020) has a node per (layer, position);
    an edge from position ``j`` before layer ``l`` to position ``i`` after it
    carries capacity ``Ã_l[i, j]`` (:func:`residual_attention`). The flow value
    from input ``j`` to output ``i`` is the max-flow between the two nodes.
    """
    n = layers[0].shape[-1]
    targets = list(range(n)) if targets is None else targets
    graph: list[dict[int, float]] = [{} for _ in range((len(layers) + 1) * n)]
    for l_idx, a in enumerate(layers):
        a = residual_attention(a).tolist()
        for i in range(n):
            for j in range(n):
                if a[i][j] > 0:
                    graph[l_idx * n + j][(l_idx + 1) * n + i] = a[i][j]
    top = len(layers) * n
    out = torch.zeros(len(targets), n, dtype=torch.float64)
    for t_idx, i in enumerate(targets):
        for j in range(n):
            out[t_idx, j] = max_flow(graph, j, top + i)
    return out


class _LayerMaps(Analysis):
    """Collects each layer's head-averaged attention of the first sequence ([N, N])."""

    max_tokens = 128

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        if info.seq_len > self.max_tokens:
            raise ValueError(
                f"tokens: {self.name} keeps each layer's N x N map and is meant for short "
                f"inputs (at most {self.max_tokens} tokens), got {info.seq_len}"
            )
        self.layers = [torch.zeros(info.seq_len, info.seq_len) for _ in range(info.n_layers)]

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        self.layers[layer][rows, : probs.shape[-1]] = probs[0].float().mean(0).cpu()

    def _rows(self, metric: str, layer: int, m: torch.Tensor, targets: list[int]):
        tokens = self.info.tokens or []
        return [
            {
                "analysis": self.name,
                "layer": layer,
                "head": None,
                "metric": metric,
                "value": float(m[t_idx, j]),
                "query": i,
                "key": j,
                "query_token": tokens[i] if i < len(tokens) else None,
                "key_token": tokens[j] if j < len(tokens) else None,
            }
            for t_idx, i in enumerate(targets)
            for j in range(m.shape[1])
        ]


class Rollout(_LayerMaps):
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in
    Transformers", arXiv:2005.00928).

    Heads are averaged, the residual connection is added as ``0.5 A + 0.5 I``
    (rows renormalised), and the layers are multiplied:
    ``R_l = Ã_l Ã_{l-1} ... Ã_1``. ``R_l[i, j]`` is the share of position ``i``'s
    representation after layer ``l`` that traces back to input token ``j``; rows
    sum to 1. Rows: ``rollout`` per (layer, query, key) for the query positions
    ``targets`` (default: all). Meant for encoders (MiniLM) and short inputs.
    """

    name = "rollout"

    def __init__(self, targets: list[int] | None = None):
        self.targets = targets

    def finish(self) -> list[dict[str, Any]]:
        targets = self.targets if self.targets is not None else list(range(self.info.seq_len))
        out = []
        for layer, r in enumerate(rollout(self.layers)):
            out.extend(self._rows("rollout", layer, r[targets], targets))
        return out


class Flow(_LayerMaps):
    """Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in
    Transformers", arXiv:2005.00928).

    The layers form a graph with one node per (layer, token); the edge from
    token ``j`` below layer ``l`` to token ``i`` above it has capacity
    ``Ã_l[i, j]`` (head-averaged attention plus the residual, as in rollout).
    The flow from input ``j`` to output ``i`` is the maximum flow between the two
    nodes (Dinic's algorithm, :func:`max_flow`). Unlike rollout, which multiplies
    weights along all paths, flow is bounded by each path's narrowest edge.
    Rows: ``flow`` per (query, key) after the last layer, for the query
    positions ``targets`` (default: all); N^2 max-flow problems, so keep inputs
    short (the default limit is 32 tokens).
    """

    name = "flow"
    max_tokens = 32

    def __init__(self, targets: list[int] | None = None):
        self.targets = targets

    def finish(self) -> list[dict[str, Any]]:
        targets = self.targets if self.targets is not None else list(range(self.info.seq_len))
        self.flow = attention_flow(self.layers, targets)
        return self._rows("flow", len(self.layers) - 1, self.flow, targets)
