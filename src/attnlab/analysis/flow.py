"""Attention rollout and attention flow (Abnar & Zuidema 2020)."""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
from networkx.algorithms.flow import boykov_kolmogorov, build_residual_network

from .base import Analysis, CaptureInfo, register_analysis


def residual_attention(mean_attention: torch.Tensor) -> torch.Tensor:
    """``0.5 A + 0.5 I`` with rows renormalized: attention plus the residual path."""
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


def attention_graph(layers: list[torch.Tensor]) -> nx.DiGraph:
    """The attention graph of Abnar & Zuidema 2020: node ``(l, j)`` is position ``j`` before
    layer ``l`` (``l = 0..L``); the edge ``(l, j) -> (l + 1, i)`` has capacity ``Ã_l[i, j]``
    (:func:`residual_attention` of ``layers[l]``, head-averaged [N, N])."""
    graph = nx.DiGraph()
    n = layers[0].shape[-1]
    graph.add_nodes_from((l_idx, j) for l_idx in range(len(layers) + 1) for j in range(n))
    for l_idx, a in enumerate(layers):
        a = residual_attention(a).tolist()
        graph.add_weighted_edges_from(
            (
                ((l_idx, j), (l_idx + 1, i), a[i][j])
                for i in range(n)
                for j in range(n)
                if a[i][j] > 0
            ),
            weight="capacity",
        )
    return graph


def attention_flow(layers: list[torch.Tensor], targets: list[int] | None = None) -> torch.Tensor:
    """Attention flow: float64 [len(targets), N], max-flow from each input token to each
    target position of the last layer.

    The value from input ``j`` to output ``i`` is the maximum flow from node ``(0, j)`` to
    node ``(L, i)`` of :func:`attention_graph`, computed by ``networkx.maximum_flow_value``
    (Boykov-Kolmogorov). For each target, only the nodes that reach it carry flow to it,
    so each target's problems run on that subgraph and share one residual network; an
    input that does not reach the target (a later token in a causal model) has flow 0.
    """
    n = layers[0].shape[-1]
    targets = list(range(n)) if targets is None else targets
    graph = attention_graph(layers)
    top = len(layers)
    out = torch.zeros(len(targets), n, dtype=torch.float64)
    for t_idx, i in enumerate(targets):
        sink = (top, i)
        reaching = graph.subgraph(nx.ancestors(graph, sink) | {sink})
        residual = build_residual_network(reaching, "capacity")
        for j in range(n):
            if (0, j) in reaching:
                out[t_idx, j] = nx.maximum_flow_value(
                    reaching,
                    (0, j),
                    sink,
                    capacity="capacity",
                    flow_func=boykov_kolmogorov,
                    residual=residual,
                )
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


@register_analysis
class Rollout(_LayerMaps):
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in
    Transformers", arXiv:2005.00928).

    Heads are averaged, the residual connection is added as ``0.5 A + 0.5 I``
    (rows renormalized), and the layers are multiplied:
    ``R_l = Ã_l Ã_{l-1} ... Ã_1``. ``R_l[i, j]`` is the share of position ``i``'s
    representation after layer ``l`` that traces back to input token ``j``; rows
    sum to 1. Rows: ``rollout`` per (layer, query, key) for the query positions
    ``targets`` (default: all). Meant for encoders (MiniLM) and short inputs.
    """

    name = "rollout"
    own_run = True

    def __init__(self, targets: list[int] | None = None):
        self.targets = targets

    def finish(self) -> list[dict[str, Any]]:
        targets = self.targets if self.targets is not None else list(range(self.info.seq_len))
        out = []
        for layer, r in enumerate(rollout(self.layers)):
            out.extend(self._rows("rollout", layer, r[targets], targets))
        return out


@register_analysis
class Flow(_LayerMaps):
    """Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in
    Transformers", arXiv:2005.00928).

    The layers form a graph with one node per (layer, token); the edge from
    token ``j`` below layer ``l`` to token ``i`` above it has capacity
    ``Ã_l[i, j]`` (head-averaged attention plus the residual, as in rollout).
    The flow from input ``j`` to output ``i`` is the maximum flow between the two
    nodes (:func:`attention_flow`, through networkx). Unlike rollout, which multiplies
    weights along all paths, flow is bounded by each path's narrowest edge.
    Rows: ``flow`` per (query, key) after the last layer, for the query
    positions ``targets`` (default: all); N^2 max-flow problems, so keep inputs
    short (the default limit is 32 tokens).
    """

    name = "flow"
    own_run = True
    max_tokens = 32

    def __init__(self, targets: list[int] | None = None):
        self.targets = targets

    def finish(self) -> list[dict[str, Any]]:
        targets = self.targets if self.targets is not None else list(range(self.info.seq_len))
        self.flow = attention_flow(self.layers, targets)
        return self._rows("flow", len(self.layers) - 1, self.flow, targets)
