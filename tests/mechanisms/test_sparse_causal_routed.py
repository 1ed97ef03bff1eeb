"""Causal forms of the routed sparse mechanisms whose routing reads whole blocks or the
whole sequence (sparge, pyramid, mosa), SpargeAttn's block selection, and radial's mask
worked out by hand.

SpargeAttn and PSA define causal forms that are causal per block (``Spec.causality =
"block"``): a query block is routed by the pooled queries and keys of whole blocks.
MoSA's causal form chooses its tokens over the whole sequence (``"values"``). The
contract tests check those properties (``contract.causal_probes``), the limits and the
gradients; these tests check each causal form against its paper's definition, worked
out densely, on shapes the contract does not take.
"""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.masks import causal_mask, repeat_kv
from attnlab.core.reference import reference_attention
from attnlab.mechanisms.sparse.sparge import cdf_select

BLOCK_ROUTED = {
    "sparge": {"block": 4, "cdf_threshold": 0.5, "sim_threshold": 0.2},
    "pyramid": {"block": 4, "thresholds": (0.3, 0.6, 0.9)},
}


def rand(b=2, hq=4, hkv=2, nq=24, nk=24, d=8, dv=6, dtype=torch.float64):
    q = torch.randn(b, hq, nq, d, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, dtype=dtype)
    v = torch.randn(b, hkv, nk, dv, dtype=dtype)
    return q, k, v


def dense(q, k, v, allowed, bias=None):
    """Softmax attention restricted to ``allowed`` [B, H, Nq, Nk] (plus ``bias``)."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v


def test_biformer_refuses_causal_naming_the_paper():
    q, k, v = rand(dtype=torch.float32)
    with pytest.raises(attnlab.AttnInputError, match=r"causal: BiFormer .*arXiv:2303\.08810"):
        attnlab.get("biformer", region=4, top_k=2)(q, k, v, causal=True)


# ---- sparge and pyramid: block-causal routing, token-causal attention


@pytest.mark.parametrize("name", BLOCK_ROUTED)
def test_block_routed_causal_limit_with_a_partial_block_is_exact_causal_attention(name):
    nq = nk = 22
    q, k, v = rand(nq=nq, nk=nk)
    mech = attnlab.get(name, **BLOCK_ROUTED[name])
    exact = attnlab.get(name, **vars(mech.limit(max(nq, nk))))
    want = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(exact(q, k, v, causal=True), want)


@pytest.mark.parametrize(("nq", "nk"), [(22, 22), (13, 29), (29, 13)])
def test_sparge_causal_is_its_prediction_under_the_causal_mask(nq, nk):
    """Every kept block is visible (holds a key some query of the block sees), and the
    output is softmax over the kept blocks' keys with the token-level causal rule."""
    q, k, v = rand(nq=nq, nk=nk)
    mech = attnlab.get("sparge", **BLOCK_ROUTED["sparge"])
    scale = q.shape[-1] ** -0.5
    keep = mech.predict(q, k, scale, causal=True)  # [B, H, nqb, nkb]
    kb = torch.arange(keep.shape[-1]) * 4
    last = torch.clamp(torch.arange(1, keep.shape[-2] + 1) * 4, max=nq) - 1 + nk - nq
    assert not (keep & (kb > last[:, None])).any()
    tokens = keep[:, :, torch.arange(nq) // 4][..., torch.arange(nk) // 4]
    want = dense(q, k, v, tokens & causal_mask(nq, nk))
    torch.testing.assert_close(mech(q, k, v, causal=True), want)


@pytest.mark.parametrize(("nq", "nk"), [(24, 24), (22, 22), (13, 29)])
def test_pyramid_causal_pooled_key_seen_once_all_its_positions_are(nq, nk):
    """Dense PSA from its own levels: level h pools 2^(h-1) keys, adds log of their
    count to the score, and a query sees the pooled key only if its last position is
    visible."""
    q, k, v = rand(nq=nq, nk=nk)
    bs = 4
    mech = attnlab.get("pyramid", **BLOCK_ROUTED["pyramid"])
    scale = q.shape[-1] ** -0.5
    level = mech.levels(q, k, scale, causal=True)  # [B, H, nqb, nkb]
    groups = q.shape[1] // k.shape[1]
    kr, vr = repeat_kv(k, groups), repeat_kv(v, groups)
    want = torch.zeros(q.shape[0], q.shape[1], nq, v.shape[-1], dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(nq):
                keys, vals, bias = [], [], []
                for kb in range(level.shape[-1]):
                    lv = int(level[b, h, i // bs, kb])
                    if lv == 0:
                        continue
                    f = 2 ** (lv - 1)
                    for start in range(kb * bs, min((kb + 1) * bs, nk), f):
                        stop = min(start + f, nk)
                        if stop - 1 > i + nk - nq:
                            continue
                        keys.append(kr[b, h, start:stop].mean(0))
                        vals.append(vr[b, h, start:stop].mean(0))
                        bias.append(float(stop - start))
                if keys:
                    s = torch.stack(keys) @ q[b, h, i] * scale + torch.tensor(bias).log()
                    want[b, h, i] = torch.softmax(s, 0) @ torch.stack(vals)
    torch.testing.assert_close(mech(q, k, v, causal=True), want)


def test_block_routed_causal_rows_before_any_key_are_zero():
    """More queries than keys: the first queries see no key under the causal rule."""
    q, k, v = rand(nq=29, nk=13)
    for name in BLOCK_ROUTED:
        out = attnlab.get(name, **BLOCK_ROUTED[name])(q, k, v, causal=True)
        assert torch.isfinite(out).all()
        assert (out[:, :, : 29 - 13] == 0).all()


def test_sparge_keeps_the_blocks_whose_cumulative_mass_stays_within_the_threshold():
    """TopCdf as the authors count it (thu-ml/SpargeAttn ``get_block_map_meansim``:
    ``searchsorted(cdf, cdfthreshd, right=True)`` blocks, one when that is zero): the block
    whose mass crosses the threshold is left out."""
    p = torch.tensor([[0.5, 0.05, 0.3, 0.15]], dtype=torch.float64)  # cdf 0.5, 0.8, 0.95, 1
    assert cdf_select(p, 0.4).tolist() == [[True, False, False, False]]  # at least one
    assert cdf_select(p, 0.7).tolist() == [[True, False, False, False]]
    assert cdf_select(p, 0.8).tolist() == [[True, False, True, False]]  # cdf <= t is kept
    assert cdf_select(p, 0.96).tolist() == [[True, False, True, True]]
    assert cdf_select(p, 1.0).all()
    p = torch.softmax(torch.randn(64, 9, dtype=torch.float64) * 2, dim=-1)
    val, order = p.sort(dim=-1, descending=True)
    for t in (0.2, 0.5, 0.9):
        counts = torch.searchsorted(
            val.cumsum(-1), torch.full((64, 1), t, dtype=p.dtype), right=True
        )
        ranked = torch.arange(9) < counts.clamp_min(1)
        want = torch.zeros_like(ranked).scatter(-1, order, ranked)
        assert torch.equal(cdf_select(p, t), want)


# ---- mosa: attention only among the chosen tokens at positions <= the query


def mosa_dense(mech, q, k, v):
    """The paper's causal MoSA from its definition: the head's top-k tokens by
    r = sigmoid(w·k), softmax among them with I_j <= I_i, times r_i; zeros elsewhere."""
    kr = repeat_kv(k, q.shape[1] // k.shape[1])
    r = torch.sigmoid(torch.einsum("bhnd,hd->bhn", kr, mech.router.detach().to(q.dtype)))
    chosen = torch.zeros_like(r, dtype=torch.bool)
    chosen.scatter_(-1, r.topk(min(mech.config.tokens, q.shape[2]), dim=-1).indices, True)
    allowed = chosen[..., :, None] & chosen[..., None, :] & causal_mask(q.shape[2], k.shape[2])
    out = dense(q, k, v, allowed)
    return out * torch.where(chosen, r, 0.0)[..., None], chosen


def test_mosa_causal_is_the_papers_definition():
    q, k, v = rand()
    mech = attnlab.get("mosa", tokens=12).double()
    got = mech(q, k, v, causal=True)
    want, chosen = mosa_dense(mech, q, k, v)
    torch.testing.assert_close(got, want)
    assert (chosen.sum(-1) == 12).all()
    assert (got[~chosen] == 0).all()


def test_mosa_causal_choice_reads_later_keys():
    """Why MoSA's causality is "values", not "token": raising the router score of later
    keys pushes earlier tokens out of the head's choice, which zeroes their outputs."""
    q, k, v = rand(b=1, hq=1, hkv=1)
    mech = attnlab.get("mosa", tokens=12).double()
    before = mech(q, k, v, causal=True)
    _, chosen = mosa_dense(mech, q, k, v)
    w = mech.router.detach()[0].double()
    k2 = k.clone()
    k2[0, 0, 12:] = w / w.norm() * 50  # every later key now beats every earlier one
    after = mech(q, k2, v, causal=True)
    earlier = chosen[0, 0, :12]
    assert earlier.any()
    assert (after[0, 0, :12][earlier] == 0).all()
    assert not torch.equal(after[0, 0, :12], before[0, 0, :12])


def test_mosa_causal_gradcheck():
    q, k, v = rand(b=1, hq=2, hkv=1, nq=9, nk=9, d=4, dv=3)
    for t in (q, k, v):
        t.requires_grad_(True)
    mech = attnlab.get("mosa", tokens=5).double()
    assert torch.autograd.gradcheck(
        lambda q, k, v: mech(q, k, v, causal=True), (q, k, v), eps=1e-6, atol=1e-5
    )


def test_mosa_causal_density_counts_chosen_pairs_up_to_the_diagonal():
    mech = attnlab.get("mosa", tokens=12)
    assert mech.density(24, 24, causal=True) == 12 * 13 / 2 / (24 * 24)
    assert mech.density(24, 24, causal=False) == 12 * 12 / (24 * 24)


# ---- radial: the paper's rule, rows worked out by hand

# frames of s = 4 tokens, 20 frames. Query token k of frame i, key token l of frame j,
# d = |i - j|, r = floor(log2 max(d, 1)): the key is kept when (|k - l| + 1) 2^r <= s,
# or, once 2^r > s, when k = l and d is a multiple of ceil(2^r / s). So:
#   d = 0, 1: the whole frame;  d = 2, 3: |k - l| <= 1;  d = 4..7: l = k;
#   d = 8..15: l = k for even d;  d = 16..31: l = k for d a multiple of 4.
RADIAL_ROWS = {
    # query 1 (frame 0, k = 1), not causal: frames 0, 1 whole; frames 2, 3 at l in 0..2;
    # frames 4..7 at l = 1; frames 8, 10, 12, 14 at l = 1; frame 16 at l = 1
    (1, False): {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 17, 21, 25, 29, 33, 41, 49, 57, 65},
    # query 1, causal: keys 0 and 1 of its own frame
    (1, True): {0, 1},
    # query 79 (frame 19, k = 3), causal: frames 19, 18 whole; frames 17, 16 at l in 2, 3;
    # frames 15..12 at l = 3; frames 11, 9, 7, 5 (d = 8, 10, 12, 14); frame 3 (d = 16)
    (79, True): {15, 23, 31, 39, 47, 51, 55, 59, 63, 66, 67, 70, 71, *range(72, 80)},
    # query 42 (frame 10, k = 2), not causal: d = 0, 1 -> frames 9..11 whole; d = 2, 3
    # -> frames 7, 8, 12, 13 at l in 1..3; d = 4..7 -> frames 3..6, 14..17 at l = 2;
    # d = 8 -> frames 2, 18; d = 10 -> frame 0; (d = 9, 11 odd: none)
    (42, False): {
        *range(36, 48),
        *(4 * f + l for f in (7, 8, 12, 13) for l in (1, 2, 3)),
        *(4 * f + 2 for f in (3, 4, 5, 6, 14, 15, 16, 17)),
        10,
        74,
        2,
    },
}


@pytest.mark.parametrize(("p", "causal"), sorted(RADIAL_ROWS))
def test_radial_rule_matches_rows_worked_by_hand(p, causal):
    mech = attnlab.get("radial", frame=4, block=8)
    rule = mech.rule(80, 80, causal, 1)
    zero = torch.zeros((), dtype=torch.long)
    ok = rule(zero, zero, torch.tensor([[p]]), torch.arange(80)[None, :])[0]
    assert set(torch.nonzero(ok).flatten().tolist()) == RADIAL_ROWS[(p, causal)]


@pytest.mark.parametrize("causal", [False, True])
def test_radial_output_attends_exactly_the_hand_worked_rows(causal):
    q, k, v = rand(b=1, hq=2, hkv=1, nq=80, nk=80)
    out = attnlab.get("radial", frame=4, block=8)(q, k, v, causal=causal)
    for (p, c), keys in RADIAL_ROWS.items():
        if c != causal:
            continue
        allowed = torch.zeros(1, 1, 1, 80, dtype=torch.bool)
        allowed[..., sorted(keys)] = True
        want = dense(q[:, :, p : p + 1], k, v, allowed)
        torch.testing.assert_close(out[:, :, p : p + 1], want)


def test_radial_sink_adds_the_whole_first_frame():
    """``sink=True`` (the authors' code): every query also sees keys 0..s-1."""
    zero = torch.zeros((), dtype=torch.long)
    for (p, causal), keys in RADIAL_ROWS.items():
        rule = attnlab.get("radial", frame=4, block=8, sink=True).rule(80, 80, causal, 1)
        ok = rule(zero, zero, torch.tensor([[p]]), torch.arange(80)[None, :])[0]
        first = {j for j in range(4) if not causal or j <= p}
        assert set(torch.nonzero(ok).flatten().tolist()) == keys | first
    with pytest.raises(attnlab.AttnInputError, match="sink"):
        attnlab.get("radial", sink=1)
