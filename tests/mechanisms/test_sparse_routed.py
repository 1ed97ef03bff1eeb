"""Routed sparse mechanisms: what the contract tests do not cover.

Each routed mechanism is checked against a dense definition built from its
own routing decision (same choice, computed as a masked softmax), plus the
properties its paper states (own block kept, exactly k keys, one cluster,
cumulative thresholds, ...).
"""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.masks import causal_mask, repeat_kv
from attnlab.mechanisms.sparse.dhsa import dynamic_chunks
from attnlab.mechanisms.sparse.moba import moba_select, own_blocks
from attnlab.mechanisms.sparse.pyramid import pyramid_levels


def dense(q, k, v, allowed, scale=None):
    """Softmax attention restricted to ``allowed`` [B, H, Nq, Nk], rows with nothing -> 0."""
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // k.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v


def rand(b=1, h=2, n=32, d=8, dtype=torch.float64):
    return [torch.randn(b, h, n, d, dtype=dtype) for _ in range(3)]


def blocks_to_tokens(sel, block, nk):
    """Bool [B, H, Nq, Nk] from per-query key block lists [B, H, Nq, S] (-1 = none)."""
    nkb = -(-nk // block)
    chosen = torch.zeros(*sel.shape[:3], nkb + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(sel >= 0, sel, nkb), True)
    return chosen[..., torch.arange(nk) // block]


@pytest.mark.parametrize("causal", [False, True])
def test_moba_keeps_own_block_and_matches_dense(causal):
    q, k, v = rand(n=40)
    sel = moba_select(q, k, block=8, top_k=3, causal=causal)
    own = own_blocks(40, 40, 8, causal, q.device)
    assert (sel[..., 0] == own).all()
    assert ((sel >= 0).sum(-1) <= 3).all()
    if causal:  # the others are wholly in the past
        assert ((sel[..., 1:] < own[:, None]) | (sel[..., 1:] == -1)).all()
    allowed = blocks_to_tokens(sel, 8, 40)
    if causal:
        allowed = allowed & causal_mask(40, 40)
    want = dense(q, k, v, allowed)
    for backend in ("torch", "auto"):
        got = attnlab.get("moba", block=8, top_k=3, backend=backend)(q, k, v, causal=causal)
        torch.testing.assert_close(got, want)


def test_moba_fused_path_equals_trainable_path_float32():
    q, k, v = rand(b=2, h=4, n=70, d=16, dtype=torch.float32)
    fast = attnlab.get("moba", block=16, top_k=2, backend="auto")
    slow = attnlab.get("moba", block=16, top_k=2, backend="torch")
    with torch.no_grad():
        for causal in (False, True):
            torch.testing.assert_close(
                fast(q, k, v, causal=causal), slow(q, k, v, causal=causal), rtol=1e-5, atol=1e-5
            )


def test_moba_gradient_equals_dense_gradient():
    q, k, v = (t.requires_grad_() for t in rand(n=24))
    mech = attnlab.get("moba", block=4, top_k=2, backend="torch")
    out = mech(q, k, v, causal=True)
    sel = moba_select(q.detach(), k.detach(), block=4, top_k=2, causal=True)
    allowed = blocks_to_tokens(sel, 4, 24) & causal_mask(24, 24)
    want = dense(q, k, v, allowed)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    wants = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(grads, wants, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_moba_fused_backward_equals_plain_backward(causal):
    """The fused kernel's backward, fed the merged log-sum-exp, gives the exact gradient."""
    q = torch.randn(1, 4, 30, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 30, 8, dtype=torch.float64, requires_grad=True) for _ in "kv")
    mask = torch.rand(1, 1, 30, 30) > 0.3
    for m in (None, mask):
        outs = [
            attnlab.get("moba", block=4, top_k=3, backend=backend)(q, k, v, causal=causal, mask=m)
            for backend in ("auto", "torch")
        ]
        g = torch.randn_like(outs[0])
        fused, plain = (torch.autograd.grad(o, (q, k, v), g) for o in outs)
        torch.testing.assert_close(outs[0], outs[1])
        for a, b in zip(fused, plain, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_moba_density_counts_the_selected_pairs(causal):
    q, k, _ = rand(n=64)
    mech = attnlab.get("moba", block=8, top_k=3)
    sel = moba_select(q, k, block=8, top_k=3, causal=causal)
    allowed = blocks_to_tokens(sel, 8, 64)
    if causal:
        allowed = allowed & causal_mask(64, 64)
    assert mech.density(64, 64, causal) == pytest.approx(allowed.double().mean().item())


@pytest.mark.parametrize("causal", [False, True])
def test_topk_keeps_exactly_k_keys(causal):
    q, k, v = rand(n=30)
    mech = attnlab.get("topk", top_k=6, block=7)
    s = q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(~causal_mask(30, 30), float("-inf"))
    kth = s.topk(6, dim=-1).values[..., -1:]
    allowed = (s >= kth) & ~torch.isinf(s)
    visible = torch.arange(1, 31) if causal else torch.full((30,), 30)
    assert (allowed.sum(-1) == visible.clamp(max=6)).all()
    torch.testing.assert_close(mech(q, k, v, causal=causal), dense(q, k, v, allowed))
    assert mech.density(30, 30, causal) == pytest.approx(allowed.double().mean().item())


def test_routing_clusters_and_ema_only_in_training():
    q, k, v = rand(n=20)
    mech = attnlab.get("routing", clusters=3, decay=0.5).eval()
    out = mech(q, k, v)
    frozen = mech.centroids.clone()
    cq, ck = mech.assign(q, frozen), mech.assign(k, frozen)
    torch.testing.assert_close(out, dense(q, k, v, cq[..., :, None] == ck[..., None, :]))
    mech(q, k, v)
    assert torch.equal(mech.centroids, frozen)
    mech.train()(q, k, v)
    assert not torch.equal(mech.centroids, frozen)
    assert torch.allclose(mech.centroids.norm(dim=-1), torch.ones(()).double())


def test_nsa_compressed_branch_is_attention_over_block_means():
    q, k, v = rand(n=16)
    mech = attnlab.get("nsa", block=4, gate_cmp=1.0, gate_slc=0.0, gate_win=0.0)
    kc = k.unflatten(2, (4, 4)).mean(3)
    vc = v.unflatten(2, (4, 4)).mean(3)
    torch.testing.assert_close(mech(q, k, v), dense(q, kc, vc, torch.ones(1, 1, 16, 4).bool()))
    # causal: query i sees the compressed blocks that end at or before i
    ends = torch.arange(4) * 4 + 3
    want = dense(q, kc, vc, (ends[None, :] <= torch.arange(16)[:, None])[None, None])
    torch.testing.assert_close(mech(q, k, v, causal=True), want)


def test_mosa_each_head_chooses_exactly_its_tokens():
    q, k, v = rand(h=3, n=20)
    mech = attnlab.get("mosa", tokens=5)
    out = mech(q, k, v)
    assert ((out.abs().sum(-1) > 0).sum(-1) == 5).all()
    plain = attnlab.get("mosa", tokens=5, router_scale=False)
    plain.router = mech.router
    r = torch.sigmoid(torch.einsum("bhnd,hd->bhn", k, mech.router))
    idx = r.topk(5, dim=-1).indices
    chosen = torch.zeros(1, 3, 20, dtype=torch.bool).scatter(-1, idx, True)
    want = dense(q, k, v, chosen[..., None, :] & chosen[..., :, None]) * chosen[..., None]
    torch.testing.assert_close(plain(q, k, v), want)


def test_biformer_routes_top_regions():
    q, k, v = rand(n=32)
    mech = attnlab.get("biformer", region=8, top_k=2, backend="torch")
    out = mech(q, k, v)
    qr, kr = q.unflatten(2, (4, 8)).mean(3), k.unflatten(2, (4, 8)).mean(3)
    # one routing for all heads, from the affinity over all channels
    idx = (qr @ kr.transpose(-1, -2)).sum(1, keepdim=True).topk(2, dim=-1).indices
    region = torch.zeros(1, 1, 4, 4, dtype=torch.bool).scatter(-1, idx, True)
    allowed = region[:, :, torch.arange(32) // 8][..., torch.arange(32) // 8]
    torch.testing.assert_close(out, dense(q, k, v, allowed))
    assert mech.density(32, 32) == pytest.approx(0.5)


def test_sparge_self_similarity_override():
    q, k, v = rand(n=32)
    # a threshold above any similarity: no block is self-similar, everything is kept
    mech = attnlab.get("sparge", block=8, cdf_threshold=0.1, sim_threshold=2.0)
    torch.testing.assert_close(mech(q, k, v), dense(q, k, v, torch.ones(32, 32).bool()))
    assert mech.density(32, 32) == 1.0
    sparse = attnlab.get("sparge", block=8, cdf_threshold=0.1, sim_threshold=-1.0)
    sparse(q, k, v)
    assert sparse.density(32, 32) < 1.0


def test_pyramid_levels_and_pooled_tokens():
    p = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    assert pyramid_levels(p, (0.5, 0.8)).tolist() == [[1, 0, 1, 2]]
    # keys and values constant over pairs: pooling by 2 loses nothing thanks to the log-count
    q = torch.randn(1, 1, 16, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 8, 8, dtype=torch.float64).repeat_interleave(2, dim=2)
    v = torch.randn(1, 1, 8, 8, dtype=torch.float64).repeat_interleave(2, dim=2)
    full = attnlab.get("pyramid", block=4, thresholds=(1.0, 1.0))(q, k, v)
    pooled = attnlab.get("pyramid", block=4, thresholds=(1e-9, 1.0))(q, k, v)
    torch.testing.assert_close(pooled, full)


@pytest.mark.parametrize("causal", [False, True])
def test_dhsa_budget_and_own_chunk(causal):
    q, k, v = rand(n=48)
    mech = attnlab.get("dhsa", budget=12, min_chunk=2, max_chunk=8, threshold=0.1)
    cid, keep, _ = mech.select(q, k, causal)
    own = torch.nn.functional.one_hot(cid, keep.shape[-1]).bool()
    assert (keep & own).any(-1).all()  # the own chunk is always kept
    allowed = keep.gather(-1, cid[:, :, None, :].expand(-1, -1, 48, -1))
    if causal:
        allowed = allowed & causal_mask(48, 48)
    assert (allowed.sum(-1) < 12 + 8).all()  # the budget, overshot by at most one chunk
    torch.testing.assert_close(mech(q, k, v, causal=causal), dense(q, k, v, allowed))
    assert mech.density(48, 48, causal) == pytest.approx(allowed.double().mean().item())


def test_dhsa_chunks_respect_the_grid():
    k = torch.randn(1, 1, 50, 8)
    cid = dynamic_chunks(k, threshold=2.0, min_chunk=4, max_chunk=12)[0, 0]
    starts = torch.nonzero(torch.diff(cid, prepend=torch.tensor([-1]))).flatten()
    assert (starts % 4 == 0).all()
    lengths = torch.diff(starts, append=torch.tensor([50]))
    assert (lengths <= 12).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("top_k", [2, 4])
def test_moba_tiled_inference_path_matches_dense(monkeypatch, causal, top_k):
    """The tiled inference path (causal sub-blocks of the own block, one call per key
    block, long runs in halves, gate in row chunks) equals the dense answer of its
    selection."""
    import attnlab.mechanisms.sparse._moba_tiled as moba_tiled
    import attnlab.mechanisms.sparse.moba as moba

    monkeypatch.setattr(moba_tiled, "_OWN_TILE", 4)
    monkeypatch.setattr(moba, "_GATE_ROWS", 5)
    monkeypatch.setattr(moba_tiled, "_SPLIT_RUN", 3)  # runs of 3+ queries go in as two halves
    q, k, v = rand(b=2, h=4, n=48)
    k, v = k[:, :2], v[:, :2]  # grouped-query
    assert moba_tiled.tiled_applies(q, k, v, block=8, mask=None)
    sel = moba_select(q, k, block=8, top_k=top_k, causal=causal)
    allowed = blocks_to_tokens(sel, 8, 48)
    if causal:
        allowed = allowed & causal_mask(48, 48)
    got = attnlab.get("moba", block=8, top_k=top_k, backend="auto")(q, k, v, causal=causal)
    torch.testing.assert_close(got, dense(q, k, v, allowed))


@pytest.mark.parametrize("causal", [False, True])
def test_moba_tiled_gradient_equals_dense_gradient(monkeypatch, causal):
    """With gradients the tiled path runs the fused kernel's backward per tile, given
    the merged log-sum-exp: output and gradients equal the dense answer's."""
    import attnlab.mechanisms.sparse._moba_tiled as moba_tiled

    monkeypatch.setattr(moba_tiled, "_OWN_TILE", 4)
    monkeypatch.setattr(moba_tiled, "_SPLIT_RUN", 3)
    q, k, v = rand(b=1, h=4, n=48)
    k, v = k[:, :2], v[:, :2]  # grouped-query
    sel = moba_select(q, k, block=8, top_k=3, causal=causal)
    allowed = blocks_to_tokens(sel, 8, 48)
    if causal:
        allowed = allowed & causal_mask(48, 48)
    g = torch.randn(1, 4, 48, 8, dtype=torch.float64)
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    got = attnlab.get("moba", block=8, top_k=3, backend="auto")(*ins, causal=causal)
    (got * g).sum().backward()
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    want = dense(*ref, allowed)
    (want * g).sum().backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(ins, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
