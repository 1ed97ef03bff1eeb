"""The streaming reducers on synthetic attention: known patterns are found, and
streaming in blocks equals one pass over the full matrix."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.analysis.distance import AttentionDistance, FutureInfluence
from attnlab.analysis.entropy import Entropy
from attnlab.analysis.offline import analyse_maps
from attnlab.analysis.patterns import TokenPatterns, repeated_random_tokens
from attnlab.analysis.sinks import Sinks

from .synthetic import (
    causal_uniform,
    random_causal,
    shifted_diagonal,
    stack_heads,
    to_position,
)

N = 40


def value(rows, metric, layer=0, head=0, **match):
    hits = [
        r
        for r in rows
        if r["metric"] == metric
        and r["layer"] == layer
        and r["head"] == head
        and all(r.get(k) == v for k, v in match.items())
    ]
    assert len(hits) == 1, (metric, layer, head, hits)
    return hits[0]["value"]


def test_all_to_first_token_is_found_as_sink():
    maps = [stack_heads(to_position(N, 0), to_position(N, 0), causal_uniform(N))]
    rows = analyse_maps(maps, [Sinks()])
    assert value(rows, "first_token_attention", head=0) == pytest.approx(1.0)
    assert value(rows, "first_token_attention", head=2) < 0.2
    sink = [r for r in rows if r["metric"] == "sink" and r["rank"] == 0]
    assert sink[0]["position"] == 0 and sink[0]["kind"] == "first" and sink[0]["heads"] == 2
    assert value(rows, "sink_rate", head=None) == pytest.approx(2 / 3)


def test_secondary_sink_later_in_the_sequence_is_found_and_named():
    n = 80
    first, ninth = to_position(n, 0), to_position(n, 9)
    maps = [stack_heads(first, ninth, first, ninth)]
    tokens = [f"t{i}" for i in range(n)]
    tokens[9] = "."
    rows = analyse_maps(maps, [Sinks()], tokens=tokens)
    sinks = {r["position"]: r for r in rows if r["metric"] == "sink" and r["is_sink"]}
    assert set(sinks) == {0, 9}
    assert sinks[9]["kind"] == "secondary" and sinks[9]["token"] == "."
    assert sinks[9]["heads"] == 2 and sinks[9]["ratio"] > 10
    top = next(r for r in rows if r["metric"] == "top_attention" and r["head"] == 1)
    assert top["position"] == 9 and top["value"] == pytest.approx(1.0)


def test_sink_massive_activations_are_reported():
    maps = [stack_heads(to_position(N, 0), to_position(N, 0))]
    hidden = torch.randn(1, N, 16) * 0.1
    hidden[0, 0, 5] = 500.0
    rows = analyse_maps(maps, [Sinks()], hidden_states=(hidden, hidden))
    mass = [r for r in rows if r["metric"] == "massive_activation"]
    assert mass[0]["position"] == 0 and mass[0]["dim"] == 5 and mass[0]["massive"]


def test_shifted_diagonal_is_a_previous_token_head():
    maps = [stack_heads(shifted_diagonal(N, 1), shifted_diagonal(N, 2), causal_uniform(N))]
    rows = analyse_maps(maps, [TokenPatterns(), AttentionDistance()])
    assert value(rows, "previous_token", head=0) == pytest.approx(1.0)
    assert value(rows, "previous_token", head=1) == pytest.approx(0.0)
    assert value(rows, "mean_distance", head=0) == pytest.approx(1.0)
    # row 1 of the shift-2 pattern attends to itself
    assert value(rows, "mean_distance", head=1) == pytest.approx(2 * (N - 2) / (N - 1))


def test_induction_and_duplicate_heads_on_repeated_random_tokens():
    t = 16
    ids = repeated_random_tokens(1000, t, batch=2, bos=1)
    n = ids.shape[1]
    dup = torch.zeros(n, n)
    ind = torch.zeros(n, n)
    for i in range(n):
        back = i - t if i > t else i  # the earlier copy of the same token (bos at 0)
        dup[i, back] = 1.0
        ind[i, back + 1 if i > t else i] = 1.0
    maps = [stack_heads(dup, ind, shifted_diagonal(n), batch=2)]
    rows = analyse_maps(maps, [TokenPatterns()], input_ids=ids)
    assert value(rows, "duplicate_token", head=0) == pytest.approx(1.0)
    assert value(rows, "induction", head=1) == pytest.approx(1.0)
    assert value(rows, "induction", head=0) == pytest.approx(0.0)
    assert value(rows, "previous_token", head=2) == pytest.approx(1.0)


def test_entropy_of_uniform_and_one_hot_rows():
    maps = [stack_heads(causal_uniform(N), to_position(N, 0))]
    rows = analyse_maps(maps, [Entropy()])
    mean_log = sum(math.log(i + 1) for i in range(N)) / N
    assert value(rows, "entropy", head=0) == pytest.approx(mean_log, rel=1e-5)
    assert value(rows, "normalized_entropy", head=0) == pytest.approx(1.0, rel=1e-5)
    assert value(rows, "entropy", head=1) == pytest.approx(0.0, abs=1e-6)


def test_waad_clips_the_distance_at_the_window():
    maps = [stack_heads(to_position(N, 0), shifted_diagonal(N, 3))]
    rows = analyse_maps(maps, [AttentionDistance(window=10)])
    # rows 1..9 look back i <= 9 tokens, later rows are clipped at 10
    expected = (sum(range(1, 10)) + 10 * (N - 10)) / (N - 1)
    assert value(rows, "waad", head=0) == pytest.approx(expected)
    assert value(rows, "waad", head=1) == pytest.approx(3 * (N - 3) / (N - 1))
    assert value(rows, "mean_distance", head=0) == pytest.approx(sum(range(N)) / (N - 1))


def test_future_attention_influence_finds_the_anchor_token():
    maps = [stack_heads(to_position(N, 7), causal_uniform(N))]
    rows = analyse_maps(maps, [FutureInfluence()])
    peak = next(r for r in rows if r["metric"] == "fai_peak" and r["head"] == 0)
    assert peak["position"] == 7 and peak["value"] == pytest.approx(1.0)
    # uniform rows: the first token gets 1/(t+1) from each later row t
    expected = sum(1 / (t + 1) for t in range(1, N)) / (N - 1)
    assert value(rows, "fai_first", head=1) == pytest.approx(expected)


@pytest.mark.parametrize("block", [1, 7, 16])
def test_streaming_in_blocks_equals_the_full_matrix(block):
    maps = [random_causal(2, 3, 33) for _ in range(2)]
    ids = torch.randint(0, 5, (2, 33))  # small vocabulary: many duplicates

    def run(b):
        analyses = [Sinks(), Entropy(), AttentionDistance(), FutureInfluence(), TokenPatterns()]
        return analyse_maps(maps, analyses, input_ids=ids, block=b)

    full, streamed = run(None), run(block)
    assert len(full) == len(streamed)
    for a, b in zip(full, streamed, strict=True):
        assert a.keys() == b.keys()
        for key, va in a.items():
            if isinstance(va, float):
                assert b[key] == pytest.approx(va, rel=1e-5, abs=1e-7), key
            else:
                assert b[key] == va, key


def test_rows_are_tidy():
    maps = [random_causal(1, 2, 12)]
    rows = analyse_maps(
        maps, [Sinks(), Entropy(), AttentionDistance(), FutureInfluence(), TokenPatterns()]
    )
    for r in rows:
        assert {"analysis", "layer", "head", "metric", "value"} <= set(r)


def test_uniform_and_local_attention_have_no_sinks():
    maps = [stack_heads(causal_uniform(N), shifted_diagonal(N, 1), shifted_diagonal(N, 2))]
    rows = analyse_maps(maps, [Sinks()])
    sinks = [r for r in rows if r["metric"] == "sink"]
    assert sinks and not any(r["is_sink"] for r in sinks)
    assert all(r["ratio"] < 2 for r in sinks)
