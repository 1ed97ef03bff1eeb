"""Attention rollout and attention flow: the max-flow solver and the two analyses."""

from __future__ import annotations

import pytest
import torch

from attnlab.analysis.flow import Flow, Rollout, attention_flow, max_flow, residual_attention
from attnlab.analysis.offline import analyse_maps

from .synthetic import random_causal


def test_max_flow_on_a_textbook_graph():
    # CLRS figure 26.1: max flow 23
    edges = {
        (0, 1): 16,
        (0, 2): 13,
        (1, 3): 12,
        (2, 1): 4,
        (2, 4): 14,
        (3, 2): 9,
        (3, 5): 20,
        (4, 3): 7,
        (4, 5): 4,
    }
    graph = [{} for _ in range(6)]
    for (u, v), c in edges.items():
        graph[u][v] = float(c)
    assert max_flow(graph, 0, 5) == pytest.approx(23.0)
    assert max_flow(graph, 5, 0) == 0.0


def test_max_flow_agrees_with_networkx_on_random_graphs():
    nx = pytest.importorskip("networkx")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        n = 9
        cap = torch.rand(n, n, generator=g) * (torch.rand(n, n, generator=g) < 0.4)
        graph = [
            {v: float(cap[u, v]) for v in range(n) if cap[u, v] > 0 and u != v} for u in range(n)
        ]
        ref = nx.DiGraph()
        for u in range(n):
            for v, c in graph[u].items():
                ref.add_edge(u, v, capacity=c)
        ref.add_nodes_from(range(n))
        assert max_flow(graph, 0, n - 1) == pytest.approx(
            nx.maximum_flow_value(ref, 0, n - 1), abs=1e-9
        )


def test_rollout_of_identity_attention_is_identity_and_rows_sum_to_one():
    n = 6
    eye = torch.eye(n)[None, None]
    rows = analyse_maps([eye, eye], [Rollout()], causal=False)
    r = torch.zeros(n, n)
    for row in rows:
        if row["layer"] == 1:
            r[row["query"], row["key"]] = row["value"]
    assert torch.allclose(r, torch.eye(n))
    maps = [random_causal(1, 2, n) for _ in range(3)]
    rows = analyse_maps(maps, [Rollout(targets=[n - 1])])
    last = [r["value"] for r in rows if r["layer"] == 2]
    assert sum(last) == pytest.approx(1.0)


def test_flow_through_a_single_layer_is_the_edge_capacity():
    a = random_causal(1, 1, 5)[0, 0]
    flow = attention_flow([a])
    assert torch.allclose(flow, residual_attention(a), atol=1e-9)


def test_flow_is_bounded_by_the_narrowest_layer():
    n = 4
    everything_to_0 = torch.zeros(n, n)
    everything_to_0[:, 0] = 1.0
    uniform = torch.full((n, n), 1 / n)
    flow = attention_flow([uniform, everything_to_0])
    # output 3 keeps 0.5 of itself and takes 0.5 from token 0; input j reaches each of
    # those two through an edge of 0.125 (plus the residual 0.5 when j is that token)
    expected = torch.tensor([0.625, 0.25, 0.25, 0.625], dtype=torch.float64)
    assert torch.allclose(flow[3], expected)
    rows = analyse_maps([uniform[None, None], everything_to_0[None, None]], [Flow()], causal=False)
    assert len(rows) == n * n and all(r["metric"] == "flow" for r in rows)


def test_flow_refuses_long_inputs():
    maps = [random_causal(1, 1, 40)]
    with pytest.raises(ValueError, match="tokens:"):
        analyse_maps(maps, [Flow()])
