"""The softmax alternatives of the exact family beyond the contract tests.

The contract tests hold each mechanism to its limit or reference under its
tiny config; here the other settings (the paper defaults, masks, per-head
factors), the defining identities of each paper, and the extra API
(``from_bias``, the moving average of α, ALiBi's slopes) are checked.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.core.reference import reference_attention
from attnlab.mechanisms.exact.alibi import alibi_slopes
from attnlab.mechanisms.exact.lowrank_bias import LowRankBias

from .contract import inputs

BLOCKS = {"block_q": 7, "block_k": 5}
MODES = [(False, 24, 24), (True, 24, 24), (False, 13, 29), (True, 13, 29), (True, 29, 13)]


def _mask(nq, nk):
    mask = torch.rand(2, 1, nq, nk) > 0.3
    mask[:, :, 0] = False  # a query that sees nothing
    return mask


def _check_reference(mech, causal, nq, nk, mask=None):
    q, k, v = inputs(nq=nq, nk=nk)
    got = mech(q, k, v, causal=causal, mask=mask).double()
    want = mech.reference(
        q.double(), k.double(), v.double(), causal=causal, mask=mask, scale=q.shape[-1] ** -0.5
    )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _decode(mech, n=17):
    q, k, v = inputs(nq=n, nk=n)
    full = mech(q, k, v, causal=True)
    state = mech.init_state(2, 4, 2, q.shape[-1], v.shape[-1], dtype=q.dtype)
    outs = []
    for t in range(n):
        out, state = mech.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- sigmoid


@pytest.mark.parametrize(("causal", "nq", "nk"), MODES)
@pytest.mark.parametrize("length", [None, 64])
def test_sigmoid_matches_its_definition(causal, nq, nk, length):
    mech = attnlab.get("sigmoid", length=length, **BLOCKS)
    _check_reference(mech, causal, nq, nk)
    _check_reference(mech, causal, nq, nk, mask=_mask(nq, nk))


def test_sigmoid_bias_is_minus_log_n():
    """With zero scores every weight is sigmoid(-log n) = 1 / (1 + n)."""
    q, k, v = inputs(nq=10, nk=10)
    out = attnlab.attention(torch.zeros_like(q), k, v, mechanism="sigmoid")
    want = v.sum(dim=2, keepdim=True).repeat_interleave(2, dim=1) / (1 + 10)
    torch.testing.assert_close(out, want.expand_as(out))
    out = attnlab.attention(torch.zeros_like(q), k, v, mechanism="sigmoid", length=1000)
    torch.testing.assert_close(out, (want * 11 / 1001).expand_as(out))


def test_sigmoid_decoding_needs_a_fixed_length():
    mech = attnlab.get("sigmoid")
    q, k, v = inputs(nq=1, nk=1)
    state = mech.init_state(2, 4, 2, 8, 6)
    with pytest.raises(attnlab.AttnInputError, match=r"^length:"):
        mech.step(q, k, v, state)
    _decode(attnlab.get("sigmoid", length=100, **BLOCKS))


# ---------------------------------------------------------------- softplus


@pytest.mark.parametrize(("causal", "nq", "nk"), MODES)
@pytest.mark.parametrize(("reweight", "power"), [(False, 15.0), (True, 15.0), (True, 3.0)])
def test_softplus_matches_its_definition(causal, nq, nk, reweight, power):
    mech = attnlab.get("softplus", reweight=reweight, power=power, **BLOCKS)
    _check_reference(mech, causal, nq, nk)
    _check_reference(mech, causal, nq, nk, mask=_mask(nq, nk))


@pytest.mark.parametrize("reweight", [False, True])
def test_softplus_decoding_equals_parallel_at_paper_power(reweight):
    _decode(attnlab.get("softplus", reweight=reweight, power=15.0, **BLOCKS))


def test_softplus_is_l1_normalised():
    """LSSA rows are distributions: constant values come out unchanged, and zero
    queries (all cosines 0) average the visible values."""
    q, k, v = inputs(nq=12, nk=12)
    ones = torch.ones_like(v)
    out = attnlab.attention(q, k, ones, mechanism="softplus", causal=True)
    torch.testing.assert_close(out, torch.ones_like(out))
    out = attnlab.attention(torch.zeros_like(q), k, v, mechanism="softplus", causal=True)
    counts = torch.arange(1, 13, dtype=v.dtype)[:, None]
    want = (v.cumsum(dim=2) / counts).repeat_interleave(2, dim=1)
    torch.testing.assert_close(out, want)


def test_softplus_reweighting_sharpens():
    """Re-weighting concentrates weight: the output moves toward the top key's value."""
    torch.manual_seed(1)
    q, k, v = inputs(b=1, hq=1, hkv=1, nq=1, nk=64)
    k[0, 0, 5] = q[0, 0, 0] * 3  # one key aligned with the query
    plain = attnlab.attention(q, k, v, mechanism="softplus")
    sharp = attnlab.attention(q, k, v, mechanism="softplus", reweight=True, power=15.0)
    target = v[0, 0, 5]
    assert (sharp[0, 0, 0] - target).norm() < 0.5 * (plain[0, 0, 0] - target).norm()


def test_softplus_rejects_bad_options():
    with pytest.raises(attnlab.AttnInputError, match=r"^power:"):
        attnlab.get("softplus", power=0)
    with pytest.raises(attnlab.AttnInputError, match=r"^reweight:"):
        attnlab.get("softplus", reweight="perhaps")


# ---------------------------------------------------------------- affine


@pytest.mark.parametrize(("causal", "nq", "nk"), MODES)
def test_affine_matches_its_definition(causal, nq, nk):
    mech = attnlab.get("affine", init_alpha=0.6, init_std=0.8, **BLOCKS).eval()
    with torch.no_grad():
        mech.alpha(torch.zeros(1, 4, 1, 8))  # size the gate, then move α_ma off α
        mech.alpha_ma.copy_(torch.tensor([0.2, 0.5, 0.9, 1.0]))
    _check_reference(mech, causal, nq, nk)
    _check_reference(mech, causal, nq, nk, mask=_mask(nq, nk))


def test_affine_starts_as_softmax():
    q, k, v = inputs()
    out = attnlab.attention(q, k, v, mechanism="affine", causal=True)
    ref = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_affine_row_mass_is_the_moving_average():
    """sum_j (α p_ij + β_i) = α_ma: constant values come out scaled by α_ma (Eq. 6, 8)."""
    mech = attnlab.get("affine", init_alpha=0.3, init_std=1.0).eval()
    q, k, v = inputs()
    out = mech(q, k, torch.ones_like(v), causal=True)
    torch.testing.assert_close(out, torch.full_like(out, 0.3))


def test_affine_moving_average_updates_in_training_only():
    mech = attnlab.get("affine", heads=4, head_dim=8, init_alpha=0.5, init_std=1.0)
    q, k, v = inputs()
    alpha = mech.alpha(q)
    mech.eval()(q, k, v)
    torch.testing.assert_close(mech.alpha_ma, torch.full((4,), 0.5))
    mech.train()(q, k, v)
    want = 0.9 * 0.5 + 0.1 * alpha.mean(dim=(0, 2, 3))
    torch.testing.assert_close(mech.alpha_ma, want)


def test_affine_gate_is_sized_once():
    mech = attnlab.get("affine")
    assert mech.gate_weight is None
    mech(*inputs())
    assert tuple(mech.gate_weight.shape) == (4, 8)
    with pytest.raises(attnlab.AttnInputError, match=r"q: expected Hq=4"):
        mech(*inputs(hq=2, hkv=1))
    eager = attnlab.get("affine", heads=3, head_dim=5)
    assert tuple(eager.gate_weight.shape) == (3, 5)


def test_affine_state_dict_sizes_a_lazy_gate():
    trained = attnlab.get("affine", init_alpha=0.4, init_std=1.0).eval()
    q, k, v = inputs()
    want = trained(q, k, v)
    fresh = attnlab.get("affine").eval()
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh(q, k, v), want)


def test_affine_gradient_reaches_the_gate():
    mech = attnlab.get("affine", init_alpha=0.5, init_std=0.1)
    q, k, v = inputs()
    mech(q, k, v, causal=True).square().sum().backward()
    assert mech.gate_weight.grad.abs().sum() > 0 and mech.gate_bias.grad.abs().sum() > 0


# ---------------------------------------------------------------- alibi


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(16)[:2] == [2.0**-0.5, 2.0**-1]
    # 12 heads: the 8-head slopes, then the odd terms of the 16-head sequence
    assert alibi_slopes(12) == [2.0**-i for i in range(1, 9)] + [
        2.0**-x for x in (0.5, 1.5, 2.5, 3.5)
    ]


@pytest.mark.parametrize(("causal", "nq", "nk"), MODES)
def test_alibi_matches_its_definition_with_masks(causal, nq, nk):
    _check_reference(attnlab.get("alibi", **BLOCKS), causal, nq, nk, mask=_mask(nq, nk))


def test_alibi_bias_is_linear_in_distance():
    """Zero queries: weights ∝ exp(-m·(i - j)) on the causal prefix."""
    q, k, v = inputs(b=1, hq=2, hkv=2, nq=6, nk=6)
    out = attnlab.attention(torch.zeros_like(q), k, v, mechanism="alibi", causal=True)
    m = torch.tensor(alibi_slopes(2))[:, None, None]
    i = torch.arange(6)
    dist = (i[:, None] - i[None, :]).float()
    logits = (-m * dist).masked_fill(dist < 0, -math.inf)
    torch.testing.assert_close(out[0], torch.softmax(logits, dim=-1) @ v[0])


# ---------------------------------------------------------------- lowrank-bias


def _biased_softmax(q, k, v, bias, causal=False):
    return reference_attention(q, k, v, causal=causal, bias=bias)


@pytest.mark.parametrize(("causal", "nq", "nk"), MODES[:4])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
def test_lowrank_bias_matches_its_definition(causal, nq, nk, heads, backend):
    mech = attnlab.get(
        "lowrank-bias", rank=3, max_len=32, heads=heads, init_std=0.7, backend=backend, **BLOCKS
    )
    _check_reference(mech, causal, nq, nk)
    _check_reference(mech, causal, nq, nk, mask=_mask(nq, nk))


@pytest.mark.parametrize("per_head", [False, True])
def test_lowrank_from_bias_is_exact_for_a_low_rank_bias(per_head):
    n, r = 20, 3
    shape = (4, n, r) if per_head else (n, r)
    bias = torch.randn(shape, dtype=torch.float64) @ torch.randn(shape, dtype=torch.float64).mT
    mech = LowRankBias.from_bias(bias, rank=r)
    assert mech.config.max_len == n and mech.config.heads == (4 if per_head else 1)
    q, k, v = inputs(nq=n, nk=n)
    for causal in (False, True):
        got = mech(q, k, v, causal=causal).double()
        want = _biased_softmax(q, k, v, bias, causal=causal)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # decoding: query t sees the bias row t
    q, k, v = inputs(nq=7, nk=7)
    state = mech.init_state(2, 4, 2, 8, 6)
    for t in range(7):
        out, state = mech.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
    want = _biased_softmax(q, k, v, bias[..., :7, :7], causal=True)[:, :, -1:]
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


def test_lowrank_from_bias_approximates_a_general_bias():
    """Truncated SVD: the error falls as the rank grows, and full rank is exact."""
    n = 16
    i = torch.arange(n, dtype=torch.float64)
    bias = -0.3 * (i[:, None] - i[None, :]).abs()  # a relative-position bias, full rank
    q, k, v = inputs(nq=n, nk=n)
    want = _biased_softmax(q, k, v, bias)
    errors = [
        (LowRankBias.from_bias(bias, rank=r)(q, k, v).double() - want).abs().max().item()
        for r in (1, 4, n)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def test_lowrank_bias_says_what_it_cannot_do():
    mech = attnlab.get("lowrank-bias", rank=2, max_len=16, heads=3)
    with pytest.raises(attnlab.AttnInputError, match=r"k: expected Nk <= max_len=16"):
        mech(*inputs(hq=3, hkv=1, nq=8, nk=20))
    with pytest.raises(attnlab.AttnInputError, match=r"q: expected Nq <= Nk"):
        mech(*inputs(hq=3, hkv=1, nq=12, nk=8))
    with pytest.raises(attnlab.AttnInputError, match=r"q: expected Hq=3"):
        mech(*inputs(hq=4, hkv=2, nq=8, nk=8))
    with pytest.raises(attnlab.AttnInputError, match=r"^rank:"):
        LowRankBias.from_bias(torch.zeros(4, 4), rank=5)
    with pytest.raises(attnlab.AttnInputError, match=r"^bias:"):
        LowRankBias.from_bias(torch.zeros(4, 5), rank=2)


def test_lowrank_bias_starts_as_softmax_and_learns():
    mech = attnlab.get("lowrank-bias", rank=2, max_len=32)
    q, k, v = inputs()
    out = mech(q, k, v, causal=True)
    ref = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    (out * torch.randn_like(out)).sum().backward()
    assert mech.key_factors.grad.abs().sum() > 0
