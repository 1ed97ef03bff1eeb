"""Attention rollout and attention flow: the flow values and the two analyses."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnlab.analysis.flow import Flow, Rollout, attention_flow, residual_attention
from attnlab.analysis.offline import analyze_maps

from .synthetic import random_causal


def _min_cut(layers: list[torch.Tensor], source: int, target: int) -> float:
    """The s-t minimum cut of the attention graph, by trying every cut: by max-flow/min-cut
    it equals the maximum flow, computed here with no flow algorithm at all."""
    n, top = layers[0].shape[-1], len(layers)
    caps = [residual_attention(a) for a in layers]
    inner = [(la, p) for la in range(top + 1) for p in range(n)]
    inner.remove((0, source))
    inner.remove((top, target))
    best = math.inf
    for chosen in itertools.product((False, True), repeat=len(inner)):
        side = {(0, source)} | {node for node, s in zip(inner, chosen, strict=True) if s}
        cut = sum(
            float(caps[la][i, j])
            for la in range(top)
            for j in range(n)
            for i in range(n)
            if (la, j) in side and (la + 1, i) not in side
        )
        best = min(best, cut)
    return best


@pytest.mark.parametrize("causal", [True, False])
def test_flow_equals_the_minimum_cut_on_small_graphs(causal):
    """networkx's flow gives the values the hand-written solver gave: the minimum cuts."""
    g = torch.Generator().manual_seed(3)
    n = 3
    if causal:
        layers = [random_causal(1, 1, n)[0, 0] for _ in range(2)]
    else:
        layers = [torch.softmax(torch.randn(n, n, generator=g) * 2, -1) for _ in range(2)]
    flow = attention_flow(layers)
    for i in range(n):
        for j in range(n):
            assert float(flow[i, j]) == pytest.approx(_min_cut(layers, j, i), abs=1e-12)


def test_rollout_of_identity_attention_is_identity_and_rows_sum_to_one():
    n = 6
    eye = torch.eye(n)[None, None]
    rows = analyze_maps([eye, eye], [Rollout()], causal=False)
    r = torch.zeros(n, n)
    for row in rows:
        if row["layer"] == 1:
            r[row["query"], row["key"]] = row["value"]
    assert torch.allclose(r, torch.eye(n))
    maps = [random_causal(1, 2, n) for _ in range(3)]
    rows = analyze_maps(maps, [Rollout(targets=[n - 1])])
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
    rows = analyze_maps([uniform[None, None], everything_to_0[None, None]], [Flow()], causal=False)
    assert len(rows) == n * n and all(r["metric"] == "flow" for r in rows)


def test_flow_refuses_long_inputs():
    maps = [random_causal(1, 1, 40)]
    with pytest.raises(ValueError, match="tokens:"):
        analyze_maps(maps, [Flow()])
