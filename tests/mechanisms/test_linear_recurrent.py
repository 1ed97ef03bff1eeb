"""Tests of the recurrent-memory and latent mechanisms beyond the contract suite:
long-sequence stability, and the property each paper's mechanism is built for."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.reference import reference_attention
from attnlab.mechanisms.linear.aaren import combine, many_to_many, prefix_scan

MINE = ["latte", "gsa", "aaren", "delta", "titans", "infsa", "flare"]
LONG = 65536


def _long_inputs(n, dtype, *, hq=1, nq=None, spread=8.0):
    """Tiny heads, long sequence, large-magnitude queries and keys to stress normalisers."""
    q = (torch.randn(1, hq, nq or n, 4) * spread).to(dtype)
    k = (torch.randn(1, 1, n, 4) * spread).to(dtype)
    v = torch.randn(1, 1, n, 3).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [n for n in MINE if n != "aaren"])
def test_stable_at_65536_tokens(name, dtype):
    """No overflow in any normaliser or state at N=65536 with tiny D; outputs stay bounded."""
    spec = attnlab.spec(name)
    q, k, v = _long_inputs(LONG, dtype)
    out = attnlab.get(name)(q, k, v, causal=spec.causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if name in ("latte", "gsa", "flare", "infsa"):  # convex mixtures of the values
        assert out.float().abs().max() <= v.float().abs().max() * 1.01
    else:  # delta-rule memories stay bounded with unit keys
        assert out.float().abs().max() < 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_aaren_stable_and_exact_at_65536_keys(dtype):
    """The last queries over 65536 keys: exact causal softmax, bottom-right aligned."""
    q, k, v = _long_inputs(LONG, dtype, nq=8)
    out = attnlab.get("aaren")(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    want = reference_attention(q, k, v, causal=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - want).abs().max() < tol


def test_aaren_many_to_many_equals_causal_softmax():
    """One query shared by all positions: the prefix scan gives causal softmax at every t."""
    q, k, v = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 300, 8), torch.randn(2, 3, 300, 5)
    got = many_to_many(q[:, :, 0], k, v, scale=8**-0.5)
    want = reference_attention(q.expand(-1, -1, 300, -1), k, v, causal=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_aaren_many_to_many_long_bf16():
    """The prefix scan at N=65536 in bfloat16 (float32 inside) against the float64 cumsum."""
    q, k, v = _long_inputs(LONG, torch.bfloat16, nq=1)
    got = many_to_many(q[:, :, 0], k, v, scale=0.5)
    s = (k.double() @ q[:, :, 0].double().unsqueeze(-1)).squeeze(-1) * 0.5
    run = torch.cummax(s, dim=-1).values
    # float64 prefix sums against the global maximum are exact enough here
    e = torch.exp(s - s.max())
    want = (e.unsqueeze(-1) * v.double()).cumsum(-2) / e.cumsum(-1).unsqueeze(-1)
    assert torch.isfinite(got).all() and torch.isfinite(run).all()
    mask = e.cumsum(-1) > 1e-200  # prefixes whose float64 sum did not underflow
    err = (got.double() - want).abs()[mask]
    assert err.max() < 2e-2


def test_aaren_prefix_scan_equals_sequential_fold():
    m, u, w = torch.randn(3, 37), torch.randn(3, 37, 4), torch.rand(3, 37) + 0.1
    m[:, 5] = float("-inf")
    u[:, 5], w[:, 5] = 0.0, 0.0
    _, su, sw = prefix_scan(m, u, w)
    acc = (m[:, 0], u[:, 0], w[:, 0])
    for t in range(1, 37):
        acc = combine(acc, (m[:, t], u[:, t], w[:, t]))
        torch.testing.assert_close(su[:, t] / sw[:, t, None], acc[1] / acc[2][:, None])


def test_delta_retrieves_stored_associations():
    """With beta=1 a written key reads back exactly its value; rewriting replaces it."""
    d = 8
    keys = torch.eye(d)[:3]  # orthonormal keys
    values = torch.randn(3, 5)
    k = torch.cat([keys, keys[:1]]).reshape(1, 1, 4, d)
    v = torch.cat([values, 7 * values[:1]]).reshape(1, 1, 4, 5)
    mech = attnlab.get("delta", beta=1.0)
    state = mech.init_state(1, 1, 1, d, 5)
    for t in range(3):
        _, state = mech.step(
            k[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, scale=1.0
        )
    for t in range(3):
        got, _ = mech.step(
            keys[t].reshape(1, 1, 1, d),
            torch.zeros(1, 1, 1, d),
            torch.zeros(1, 1, 1, 5),
            state,
            scale=1.0,
        )
        torch.testing.assert_close(got[0, 0, 0], values[t])
    _, state = mech.step(k[:, :, 3:], k[:, :, 3:], v[:, :, 3:], state, scale=1.0)
    got, _ = mech.step(
        keys[0].reshape(1, 1, 1, d),
        torch.zeros(1, 1, 1, d),
        torch.zeros(1, 1, 1, 5),
        state,
        scale=1.0,
    )
    torch.testing.assert_close(got[0, 0, 0], 7 * values[0])


def test_delta_retrieval_in_full_pass():
    """The chunked pass reads a stored pair back at a later query, across chunk borders."""
    d, n = 16, 40
    k = torch.randn(1, 1, n, d)
    v = torch.randn(1, 1, n, 4)
    q = torch.zeros(1, 1, n, d)
    q[0, 0, -1] = k[0, 0, 30]  # ask for a key written 9 tokens (two chunks) earlier
    k[0, 0, 31:] = 0.0  # nothing is written after it
    out = attnlab.get("delta", beta=1.0, chunk=4)(q, k, v, causal=True, scale=1.0)
    torch.testing.assert_close(out[0, 0, -1], v[0, 0, 30], rtol=1e-4, atol=1e-4)


def test_titans_without_momentum_or_decay_is_the_delta_rule():
    """eta=0, alpha=0, theta=1, one token per mini-batch: Titans' step is DeltaNet's (beta=1)."""
    q, k, v = torch.randn(2, 4, 23, 8), torch.randn(2, 2, 23, 8), torch.randn(2, 2, 23, 5)
    titans = attnlab.get("titans", alpha=0.0, eta=0.0, theta=1.0, chunk=1)
    delta = attnlab.get("delta", beta=1.0, chunk=5)
    torch.testing.assert_close(
        titans(q, k, v, causal=True), delta(q, k, v, causal=True), rtol=1e-4, atol=1e-5
    )


def test_titans_worst_case_keys_stay_bounded():
    """One key repeated 65536 times (curvature c per mini-batch): the defaults do not diverge."""
    k = torch.randn(1, 1, 1, 4).expand(1, 1, LONG, 4).contiguous()
    v = torch.randn(1, 1, LONG, 3)
    out = attnlab.get("titans")(k, k, v, causal=True)
    assert torch.isfinite(out).all() and out.abs().max() < 10


def test_latte_extreme_logits_match_dense():
    """Logit gaps far beyond exp's range inside a chunk: the chunked form stays exact."""
    q, k, v = torch.randn(1, 2, 50, 4), torch.randn(1, 2, 50, 4) * 200, torch.randn(1, 2, 50, 3)
    mech = attnlab.get("latte", chunk=16)
    want = mech.reference(q.double(), k.double(), v.double(), causal=True, mask=None, scale=0.5)
    torch.testing.assert_close(
        mech(q, k, v, causal=True, scale=0.5).double(), want, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("causal", [False, True])
def test_latte_key_padding_equals_dropping_keys(causal):
    """A key-padding mask (linear path) equals removing the padded keys and values."""
    q, k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 3)
    keep = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    keep[..., 2] = False
    mech = attnlab.get("latte", chunk=4)
    got = mech(q, k, v, causal=causal, mask=keep)
    dense = mech.reference(q, k, v, causal=causal, mask=keep, scale=0.5)
    torch.testing.assert_close(got, dense.float(), rtol=1e-5, atol=1e-6)
    if not causal:
        idx = torch.tensor([0, 1, 3, 4, 5, 6, 7, 8])
        torch.testing.assert_close(got, mech(q, k[:, :, idx], v[:, :, idx]), rtol=1e-5, atol=1e-6)


def test_gsa_strong_forgetting_chunked_equals_recurrent():
    """Gates that forget hundreds of nats per chunk: the chunked form stays exact."""
    q, k, v = torch.randn(1, 2, 40, 4), torch.randn(1, 2, 40, 4) * 60, torch.randn(1, 2, 40, 3)
    chunked = attnlab.get("gsa", slots=4, tau=1.0, chunk=16)
    recurrent = attnlab.get("gsa", slots=4, tau=1.0, form="recurrent")
    torch.testing.assert_close(
        chunked(q, k, v, causal=True), recurrent(q, k, v, causal=True), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("name", ["latte", "gsa", "delta", "titans"])
def test_decode_state_does_not_grow(name):
    mech = attnlab.get(name)
    state = mech.init_state(1, 2, 1, 4, 3)
    shapes = {key: tuple(t.shape) for key, t in state.items() if torch.is_tensor(t)}
    for _ in range(50):
        _, state = mech.step(
            torch.randn(1, 2, 1, 4), torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 3), state
        )
    assert {key: tuple(t.shape) for key, t in state.items() if torch.is_tensor(t)} == shapes
    size = mech.state_size(50, q_heads=2, kv_heads=1, head_dim=4, value_dim=3)
    assert size == mech.state_size(10**6, q_heads=2, kv_heads=1, head_dim=4, value_dim=3)


def test_flare_mixing_has_rank_at_most_m():
    """Routing through M latents: the output over N tokens has rank <= M."""
    q, k, v = (torch.randn(1, 1, 64, d, dtype=torch.float64) for d in (8, 8, 32))
    out = attnlab.get("flare", latents=5)(q, k, v)
    assert torch.linalg.matrix_rank(out[0, 0]).item() <= 5


def test_infsa_one_centrality_for_all_queries():
    """Linear-InfSA gives every query the same ρ-discounted centrality-weighted value."""
    q, k, v = torch.randn(1, 2, 30, 4), torch.randn(1, 2, 30, 4), torch.randn(1, 2, 30, 3)
    out = attnlab.get("infsa", rho=0.5)(q, k, v)
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))
    same = attnlab.get("infsa", rho=0.5)(q, k.abs(), v.new_ones(v.shape))  # one value everywhere
    assert torch.isfinite(same).all() and (same <= 0.5 + 1e-6).all()


@pytest.mark.parametrize("name", ["latte", "gsa", "delta", "titans"])
def test_causal_more_queries_than_keys(name):
    """Nq > Nk, bottom-right: the first Nq − Nk queries see no key (zeros); the rest read
    the state at their aligned key position, as with the trailing Nk queries alone."""
    q, k, v = torch.randn(1, 2, 29, 4), torch.randn(1, 1, 13, 4), torch.randn(1, 1, 13, 3)
    mech = attnlab.get(name, chunk=4)
    out = mech(q, k, v, causal=True)
    assert (out[:, :, :16] == 0).all()
    torch.testing.assert_close(out[:, :, 16:], mech(q[:, :, 16:], k, v, causal=True))


def test_latte_per_head_key_padding():
    """A key-padding mask that differs per head hides each head's own keys."""
    q, k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 3)
    keep = torch.ones(1, 2, 1, 9, dtype=torch.bool)
    keep[0, 0, 0, 0] = False  # head 0's first query sees no key when causal
    keep[0, 0, 0, 2] = False
    keep[0, 1, 0, 5] = False
    mech = attnlab.get("latte", chunk=4)
    for causal in (False, True):
        want = mech.reference(q, k, v, causal=causal, mask=keep, scale=0.5)
        got = mech(q, k, v, causal=causal, mask=keep)
        torch.testing.assert_close(got, want)
    assert (got[0, 0, 0] == 0).all()
