"""The block engine's inference speed paths give the dense answer (tiny shapes)."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnlab
import attnlab.core.blocks.autograd as block_autograd
import attnlab.core.blocks.sizes as block_sizes
import attnlab.core.blocks.trainable as trainable
from attnlab.core.blocks import band_runs
from attnlab.core.reference import reference_attention


def _dense(mech, n, nk, causal, heads):
    """The mechanism's own token rule as a dense bool mask [1, H, n, nk]."""
    rule = mech.rule(n, nk, causal, heads)
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.arange(heads).view(1, heads, 1, 1)
    i, j = torch.arange(n).view(1, 1, n, 1), torch.arange(nk).view(1, 1, 1, nk)
    dense = rule(b, h, i, j).expand(1, heads, n, nk)
    return dense & (j <= i + nk - n) if causal else dense


def _band_calls(monkeypatch):
    """Record the runs that go through the band + log-sum-exp merge path."""
    calls = []
    inner = trainable._band_and_extras

    def spy(*args, **kwargs):
        calls.append(args[6])  # the run's BandSplit
        return inner(*args, **kwargs)

    monkeypatch.setattr(trainable, "_band_and_extras", spy)
    # every chunk counts as large, so tiny shapes take the fused kernels
    monkeypatch.setattr(block_sizes, "FUSED_MIN_ELEMENTS", 0)
    return calls


@pytest.mark.parametrize(("n", "nk"), [(96, 96), (90, 90), (60, 100)])
@pytest.mark.parametrize("causal", [False, True])
def test_band_plus_gathered_blocks_equal_dense(monkeypatch, n, nk, causal):
    """Local band read in place, global and random blocks gathered, merged by their
    log-sum-exps: the dense answer, also with padded last blocks and cross shapes."""
    calls = _band_calls(monkeypatch)
    # one query block per gathered piece, two per band call
    monkeypatch.setattr(block_sizes, "BAND_GATHER_BYTES", 1)
    monkeypatch.setattr(block_sizes, "BAND_BYTES", 2 * 2 * 3 * 8 * 8 * 8)
    heads = 3
    mech = attnlab.get("blocksparse", local=2, global_blocks=1, random=2, block=8, backend="torch")
    q = torch.randn(2, heads, n, 8, dtype=torch.float64)
    k, v = (torch.randn(2, heads, nk, 8, dtype=torch.float64) for _ in range(2))
    want = reference_attention(q, k, v, mask=_dense(mech, n, nk, causal, heads))
    with torch.no_grad():
        got = mech(q, k, v, causal=causal)
    torch.testing.assert_close(got, want)
    if causal or nk % 8 == 0:
        # (without causality, rows whose band reaches a padded last key block step aside)
        assert any(band.extra.shape[-1] > 0 for band in calls), "nothing gathered"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_band_path_in_low_precision(monkeypatch, dtype):
    """float32 and bfloat16 inputs: the merged answer within the dtype's tolerance."""
    calls = _band_calls(monkeypatch)
    n, heads = 64, 2
    mech = attnlab.get("blocksparse", local=2, global_blocks=1, random=1, block=8, backend="torch")
    q, k, v = (torch.randn(1, heads, n, 16) for _ in range(3))
    want = reference_attention(
        q.double(), k.double(), v.double(), mask=_dense(mech, n, n, True, heads)
    )
    with torch.no_grad():
        got = mech(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert calls and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_gradients_and_gqa_keep_the_gathered_path(monkeypatch):
    """With gradients, and with fewer key heads, the band path steps aside: the same
    answer, and backward works."""
    calls = _band_calls(monkeypatch)
    n, heads = 48, 4
    mech = attnlab.get("blocksparse", local=2, global_blocks=1, random=1, block=8, backend="torch")
    q = torch.randn(1, heads, n, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, heads, n, 8, dtype=torch.float64) for _ in range(2))
    want = reference_attention(q, k, v, mask=_dense(mech, n, n, True, heads))
    got = mech(q, k, v, causal=True)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert not calls
    kg, vg = k[:, ::2].contiguous(), v[:, ::2].contiguous()
    with torch.no_grad():
        got = mech(q, kg, vg, causal=True)
        assert not calls
        rep = mech(q, kg.repeat_interleave(2, 1), vg.repeat_interleave(2, 1), causal=True)
    torch.testing.assert_close(got, rep)


def test_runs_are_not_shortened_by_one_wide_row(monkeypatch):
    """A global query block that attends every key block has its own run; the other
    query blocks are chunked by what they visit, not by the widest row."""
    mech = attnlab.get("blocksparse", local=2, global_blocks=1, random=1, block=4)
    layout = mech.layout(256, 256, False, 2)
    # a chunk holds the scores of one query block over every key block
    monkeypatch.setattr(block_sizes, "CHUNK_ELEMENTS", 2 * 4 * 4 * layout.k_blocks)
    runs = layout.runs(2)
    assert (runs[0].c0, runs[0].c1, runs[0].used) == (0, 1, layout.k_blocks)
    assert len(runs) < layout.q_blocks // 4
    assert runs[-1].c1 == layout.q_blocks
    assert all(a.c1 == b.c0 for a, b in itertools.pairwise(runs))
    # the band path (no per-run memory bound) joins the runs one band split covers
    joined = band_runs(layout, 2, torch.float32)
    assert len(joined) < len(runs) and joined[-1].c1 == layout.q_blocks
    assert all(a.c1 == b.c0 for a, b in itertools.pairwise(joined))


@pytest.mark.parametrize("causal", [False, True])
def test_strided_and_neighborhood_through_the_band_path(monkeypatch, causal):
    """Other static patterns whose runs split into a band and further blocks agree too."""
    calls = _band_calls(monkeypatch)
    n, heads = 80, 4
    for name, config in (
        ("strided", {"local": 2, "stride": 3, "block": 8}),
        ("neighborhood", {"kernel": 41, "block": 8}),
    ):
        mech = attnlab.get(name, **config, backend="torch")
        q, k, v = (torch.randn(1, heads, n, 8, dtype=torch.float64) for _ in range(3))
        want = reference_attention(q, k, v, mask=_dense(mech, n, n, causal, heads))
        with torch.no_grad():
            torch.testing.assert_close(mech(q, k, v, causal=causal), want)
        if name == "strided" and causal:
            # heads visit different numbers of shard blocks: padded slots are hidden
            assert any(band.extra_bias is not None for band in calls)


@pytest.mark.parametrize("causal", [False, True])
def test_joined_runs_with_padded_further_blocks_equal_dense(monkeypatch, causal):
    """Runs cut by the memory bound are joined again on the band path, their further
    blocks' padding masks concatenated (strided: heads visit different numbers)."""
    calls = _band_calls(monkeypatch)
    monkeypatch.setattr(block_sizes, "CHUNK_ELEMENTS", 4 * 64 * 8)
    n, heads = 256, 4
    mech = attnlab.get("strided", local=2, stride=3, block=8, backend="torch")
    layout = mech.layout(n, n, causal, heads)
    assert len(band_runs(layout, heads, torch.float64)) < len(layout.runs(heads))
    q, k, v = (torch.randn(1, heads, n, 8, dtype=torch.float64) for _ in range(3))
    want = reference_attention(q, k, v, mask=_dense(mech, n, n, causal, heads))
    with torch.no_grad():
        torch.testing.assert_close(mech(q, k, v, causal=causal), want)
    assert any(band.extra_bias is not None and band.extra.shape[2] > 1 for band in calls)


@pytest.mark.parametrize("piece_bytes", [1, 1 << 30])
@pytest.mark.parametrize("causal", [False, True])
def test_gradient_pieces_equal_dense_gradients(monkeypatch, piece_bytes, causal):
    """The trainable path (fused kernel forward and backward per piece, bands read
    through sliding views, other blocks gathered, a band and further blocks merged by
    their log-sum-exps): output and dq, dk, dv equal the dense reference's, with
    partial last blocks, cross shapes with queries that see nothing, fewer key heads,
    one block per piece and whole runs per piece."""
    for size in ("GRAD_BYTES", "BAND_BYTES", "GATHER_BYTES"):
        monkeypatch.setattr(block_sizes, size, piece_bytes)
    seen_pieces = []
    inner = block_autograd.BlockPieces.apply

    def spy(q, k, v, forward, backward, *args):
        seen_pieces.extend(forward + backward)
        return inner(q, k, v, forward, backward, *args)

    monkeypatch.setattr(block_autograd.BlockPieces, "apply", spy)
    heads = 4
    cases = [
        ("window", {"window": 9, "block": 4}, 30, 30, 4),
        ("window", {"window": 9, "block": 4}, 30, 30, 2),
        ("window", {"window": 6, "block": 4}, 22, 35, 4),
        ("window", {"window": 6, "block": 4}, 30, 18, 4),
        ("neighborhood", {"kernel": 11, "block": 4}, 42, 42, 4),
        ("blocksparse", {"local": 2, "global_blocks": 1, "random": 1, "block": 4}, 26, 26, 2),
        ("blocksparse", {"local": 2, "global_blocks": 1, "random": 2, "block": 4}, 38, 38, 4),
    ]
    for name, config, n, nk, kv_heads in cases:
        mech = attnlab.get(name, **config, backend="torch")
        q = torch.randn(2, heads, n, 8, dtype=torch.float64, requires_grad=True)
        k, v = (
            torch.randn(2, kv_heads, nk, 8, dtype=torch.float64, requires_grad=True)
            for _ in range(2)
        )
        rep = heads // kv_heads
        kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        want = reference_attention(q, kr, vr, mask=_dense(mech, n, nk, causal, heads))
        got = mech(q, k, v, causal=causal)
        torch.testing.assert_close(got, want)
        g = torch.randn_like(want)
        for a, b in zip(
            torch.autograd.grad(got, (q, k, v), g),
            torch.autograd.grad(want, (q, k, v), g),
            strict=True,
        ):
            torch.testing.assert_close(a, b)
    parts = [part for piece in seen_pieces for part in piece.parts]
    bands = [p for p in seen_pieces if p.parts[0].start is not None]
    assert any(p.c1 - p.c0 > 1 for p in bands) == (piece_bytes > 1)
    assert bands, "no band read in place"
    assert any(part.rows is not None for part in parts), "nothing gathered"
    assert any(len(p.parts) == 2 for p in seen_pieces), "no band merged with further blocks"
    assert any(p.seen is not None for p in seen_pieces), "no query that sees nothing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_pieces_in_low_precision(dtype):
    """float32 and bfloat16 gradients of the trainable path (key and value gradients
    summed over pieces in float32) within the dtype's tolerance of the fp64 ones."""
    n, heads = 40, 2
    mech = attnlab.get("window", window=9, block=4, backend="torch")
    q, k, v = (torch.randn(1, heads, n, 16) for _ in range(3))
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    got = mech(*low, causal=True)
    want = reference_attention(*ref, mask=_dense(mech, n, n, True, heads))
    g = torch.randn(want.shape, dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    for a, b in zip(
        torch.autograd.grad(got, low, g.to(dtype)),
        torch.autograd.grad(want, ref, g),
        strict=True,
    ):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)
