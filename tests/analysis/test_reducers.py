"""The streaming reducers on synthetic attention: known patterns are found, and
streaming in blocks equals one pass over the full matrix."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.analysis.distance import AttentionDistance, FutureInfluence
from attnlab.analysis.entropy import Entropy
from attnlab.analysis.offline import analyze_maps
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
    rows = analyze_maps(maps, [Sinks()])
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
    rows = analyze_maps(maps, [Sinks()], tokens=tokens)
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
    rows = analyze_maps(maps, [Sinks()], hidden_states=(hidden, hidden))
    mass = [r for r in rows if r["metric"] == "massive_activation"]
    assert mass[0]["position"] == 0 and mass[0]["dim"] == 5 and mass[0]["massive"]


def test_shifted_diagonal_is_a_previous_token_head():
    maps = [stack_heads(shifted_diagonal(N, 1), shifted_diagonal(N, 2), causal_uniform(N))]
    rows = analyze_maps(maps, [TokenPatterns(), AttentionDistance()])
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
    rows = analyze_maps(maps, [TokenPatterns()], input_ids=ids)
    assert value(rows, "duplicate_token", head=0) == pytest.approx(1.0)
    assert value(rows, "induction", head=1) == pytest.approx(1.0)
    assert value(rows, "induction", head=0) == pytest.approx(0.0)
    assert value(rows, "previous_token", head=2) == pytest.approx(1.0)


def test_entropy_of_uniform_and_one_hot_rows():
    maps = [stack_heads(causal_uniform(N), to_position(N, 0))]
    rows = analyze_maps(maps, [Entropy()])
    mean_log = sum(math.log(i + 1) for i in range(N)) / N
    assert value(rows, "entropy", head=0) == pytest.approx(mean_log, rel=1e-5)
    assert value(rows, "normalized_entropy", head=0) == pytest.approx(1.0, rel=1e-5)
    assert value(rows, "entropy", head=1) == pytest.approx(0.0, abs=1e-6)


def test_waad_clips_the_distance_at_the_window():
    maps = [stack_heads(to_position(N, 0), shifted_diagonal(N, 3))]
    rows = analyze_maps(maps, [AttentionDistance(window=10)])
    # rows 1..9 look back i <= 9 tokens, later rows are clipped at 10
    expected = (sum(range(1, 10)) + 10 * (N - 10)) / (N - 1)
    assert value(rows, "waad", head=0) == pytest.approx(expected)
    assert value(rows, "waad", head=1) == pytest.approx(3 * (N - 3) / (N - 1))
    assert value(rows, "mean_distance", head=0) == pytest.approx(sum(range(N)) / (N - 1))


def test_future_attention_influence_finds_the_anchor_token():
    maps = [stack_heads(to_position(N, 7), causal_uniform(N))]
    rows = analyze_maps(maps, [FutureInfluence()])
    peak = next(r for r in rows if r["metric"] == "fai_peak" and r["head"] == 0)
    assert peak["position"] == 7 and peak["value"] == pytest.approx(1.0)
    # uniform rows: the first token gets 1/(t+1) from each row t in its horizon 10..100
    expected = sum(1 / (t + 1) for t in range(10, N)) / (N - 10)
    assert value(rows, "fai_first", head=1) == pytest.approx(expected)


def test_fai_counts_only_the_horizon_and_averages_the_global_heads():
    # head 0 looks 3 back (inside no horizon 10..100), head 1 at token 7, head 2 at token 0
    maps = [stack_heads(shifted_diagonal(N, 3), to_position(N, 7), to_position(N, 0))]
    fi = FutureInfluence(quantile=0.34)  # one head of three: the farthest-looking
    rows = analyze_maps(maps, [fi])
    assert value(rows, "fai_peak", head=0) == pytest.approx(0.0)
    # the global head is head 2 (mean distance ~N/2): its anchor is token 0
    assert float(fi.fai[0]) == pytest.approx(1.0) and torch.isnan(fi.fai[-1])
    anchors = [r for r in rows if r["metric"] == "fai_anchor"]
    assert anchors and anchors[0]["layer"] is None and anchors[0]["rank"] == 0
    fi = FutureInfluence(h_lo=1, h_hi=5, quantile=0.34)
    analyze_maps(maps, [fi])
    # token s gets weight 1 from row s + 3 of head 0 only: FAI 1/5 per head
    assert float(fi.fai_heads[0, 0, 10]) == pytest.approx(1 / 5)


def test_waad_series_of_the_local_heads():
    maps = [stack_heads(shifted_diagonal(N, 2), to_position(N, 0), causal_uniform(N))]
    dist = AttentionDistance(window=10, quantile=0.34)
    rows = analyze_maps(maps, [dist], block=7)
    groups = {r["head"]: r["group"] for r in rows if r["metric"] == "mean_distance"}
    assert groups == {0: "local", 1: "global", 2: None}
    # the local head looks exactly 2 back from row 2 on
    assert torch.allclose(dist.waad[2:], torch.full((N - 2,), 2.0, dtype=torch.float64))
    assert float(dist.waad_heads[0, 1, 30]) == pytest.approx(10.0)


def test_distances_without_a_causal_mask():
    n = 12
    full = torch.softmax(torch.randn(1, 2, n, n), -1)
    i = torch.arange(n, dtype=torch.float32)
    d = i[:, None] - i[None, :]
    for block in (None, 5):
        rows = analyze_maps([full], [AttentionDistance(window=3)], causal=False, block=block)
        for h in range(2):
            p = full[0, h, 1:]
            mean_d = float((p * d[1:].abs()).sum(-1).mean())
            waad = float((p * d[1:].clamp(0, 3)).sum(-1).mean())
            assert value(rows, "mean_distance", head=h) == pytest.approx(mean_d, rel=1e-5)
            assert value(rows, "waad", head=h) == pytest.approx(waad, rel=1e-5)


@pytest.mark.parametrize("block", [1, 7, 16])
def test_streaming_in_blocks_equals_the_full_matrix(block):
    maps = [random_causal(2, 3, 33) for _ in range(2)]
    ids = torch.randint(0, 5, (2, 33))  # small vocabulary: many duplicates

    def run(b):
        analyses = [Sinks(), Entropy(), AttentionDistance(), FutureInfluence(), TokenPatterns()]
        return analyze_maps(maps, analyses, input_ids=ids, block=b)

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
    rows = analyze_maps(
        maps, [Sinks(), Entropy(), AttentionDistance(), FutureInfluence(), TokenPatterns()]
    )
    for r in rows:
        assert {"analysis", "layer", "head", "metric", "value"} <= set(r)


def test_uniform_and_local_attention_have_no_sinks():
    maps = [stack_heads(causal_uniform(N), shifted_diagonal(N, 1), shifted_diagonal(N, 2))]
    rows = analyze_maps(maps, [Sinks()])
    sinks = [r for r in rows if r["metric"] == "sink"]
    assert sinks and not any(r["is_sink"] for r in sinks)
    assert all(r["ratio"] < 2 for r in sinks)


@pytest.mark.parametrize("causal,masked", [(True, False), (True, True), (False, True)])
def test_entropy_from_the_scores_equals_minus_p_log_p(causal, masked):
    from attnlab.analysis._stream import row_entropy
    from attnlab.core.softmax_blocks import attention_blocks

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 30, 8, generator=g) * 2, torch.randn(2, 3, 30, 8, generator=g) * 2
    mask = None
    if masked:
        mask = torch.rand(2, 1, 30, 30, generator=g) > 0.5
        mask[0, :, 3] = False  # a row that sees nothing
    for _, _, _, p, s in attention_blocks(q, k, causal=causal, mask=mask, scale=0.3, block=5):
        h, alive = row_entropy(p, s)
        h_ref, alive_ref = row_entropy(p)
        assert torch.equal(alive, alive_ref)
        torch.testing.assert_close(h, h_ref, rtol=0, atol=2e-5)
        p64 = p.double()
        exact = -(p64 * p64.clamp_min(1e-300).log()).sum(-1)
        torch.testing.assert_close(h.double(), exact, rtol=0, atol=2e-5)


def test_row_dot_with_a_remainder_of_rows():
    from attnlab.analysis._stream import _row_dot

    a, b = torch.randn(1, 3, 7, 50), torch.randn(1, 3, 7, 50)
    torch.testing.assert_close(_row_dot(a, b), (a * b).sum(-1), rtol=1e-5, atol=1e-5)


def test_median_abs_equals_torch_median():
    from attnlab.analysis.sinks import _median_abs

    g = torch.Generator().manual_seed(0)
    for shape in [(6, 5), (7, 3), (1, 1)]:
        h = torch.randn(*shape, generator=g)
        assert _median_abs(h) == float(h.abs().median())


def test_causal_distance_moments_from_row_and_column_sums():
    from attnlab.analysis._stream import distance_moments

    g = torch.Generator().manual_seed(1)
    b, h, first, r = 2, 3, 5, 4
    nk = first + r
    s = torch.randn(b, h, r, nk, generator=g)
    i = torch.arange(first, first + r)[:, None]
    j = torch.arange(nk)[None, :]
    p = torch.softmax(s.masked_fill(j > i, float("-inf")), -1)
    mass, dist = distance_moments(p, first, True)
    p64 = p.double()
    torch.testing.assert_close(mass.double(), p64.sum(-1), rtol=0, atol=1e-6)
    ref = (p64 * (i - j).abs()).sum((0, 2, 3))
    torch.testing.assert_close(dist, ref, rtol=1e-6, atol=1e-5)
