"""Four mechanisms against their papers' (and authors' code's) own definitions.

Each expected answer here is written from the paper or the authors' code,
not from the mechanism's module: TransNormerLLM's slope list (lightning),
NATTEN's stride-group leader (neighborhood), NSA's initial and local blocks
among the n selected (nsa), BiFormer's routing over all channels (biformer).
Then the non-finite isolation of the same four: a NaN or infinity in a key or
value reaches no row that may not see it, and no other batch sample.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnlab
from attnlab.core.reference import reference_attention


def transnormer_slopes(heads: int) -> list[float]:
    """TransNormerLLM / lightning-attention's ``_build_slope_tensor``, from its definition:
    for a power of two H the geometric list 2^(-8/H), 2^(-16/H), ...; otherwise the list of
    the largest power of two P < H, then the even-indexed entries of the list for 2P."""
    if heads & (heads - 1) == 0:
        return [2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)]
    p = 1 << (heads.bit_length() - 1)
    return transnormer_slopes(p) + transnormer_slopes(2 * p)[0::2][: heads - p]


def test_transnormer_slopes_by_hand():
    """The list for 6 heads, written out: 4 heads' slopes, then 2^-1 and 2^-3."""
    assert transnormer_slopes(6) == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


@pytest.mark.parametrize("heads", [3, 6, 12, 8])
def test_lightning_decays_are_transnormer_slopes(heads):
    """[(Q Kᵀ) ⊙ M] V with M_ij = exp(-s_h)^(i-j), s_h TransNormerLLM's slope of head h."""
    n = 11
    q, k, v = (torch.randn(1, heads, n, 4, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor(transnormer_slopes(heads), dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    gap = i[:, None] - i[None, :]
    decay = torch.where(gap >= 0, torch.exp(-slopes[:, None, None] * gap.clamp_min(0)), 0.0)
    want = ((q @ k.transpose(-1, -2)) * decay) @ v
    mech = attnlab.get("lightning", feature="identity", norm=False, chunk=4)
    torch.testing.assert_close(mech(q, k, v, causal=True), want)


def natten_axis_keys(x: int, length: int, kernel: int, dilation: int, stride: int) -> set[int]:
    """NATTEN's non-causal neighborhood of coordinate x on one axis (``get_win_start``):
    in x's dilation group of Lg members, the stride group's leader is
    min(first + stride // 2, Lg - 1), the window reaches kernel // 2 members left and
    kernel // 2 + kernel % 2 - 1 right of it, shifted inwards at the borders."""
    group = x % dilation
    members = list(range(group, length, dilation))
    t = members.index(x)
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    leader = min((t // stride) * stride + stride // 2, len(members) - 1)
    centre = min(max(leader, left), len(members) - 1 - right)
    return {members[j] for j in range(centre - left, centre + right + 1)}


@pytest.mark.parametrize(
    ("shape", "kernel", "dilation", "stride"),
    [
        ((12,), (4,), (1,), (2,)),
        ((13,), (5,), (1,), (4,)),
        ((16,), (3,), (2,), (2,)),
        ((6, 8), (3, 4), (1, 1), (2, 4)),
    ],
)
def test_neighborhood_even_stride_leader_is_natten_right_centre(shape, kernel, dilation, stride):
    coords = [
        tuple(c)
        for c in torch.cartesian_prod(*[torch.arange(s) for s in shape])
        .view(-1, len(shape))
        .tolist()
    ]
    n = len(coords)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for qi, qc in enumerate(coords):
        sets = [
            natten_axis_keys(x, length, kern, dil, st)
            for x, length, kern, dil, st in zip(qc, shape, kernel, dilation, stride, strict=True)
        ]
        for ki, kc in enumerate(coords):
            allowed[qi, ki] = all(y in s for y, s in zip(kc, sets, strict=True))
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64) for _ in range(3))
    mech = attnlab.get(
        "neighborhood", shape=shape, kernel=kernel, dilation=dilation, stride=stride, block=8
    )
    torch.testing.assert_close(mech(q, k, v), reference_attention(q, k, v, mask=allowed))


def _nsa_inputs(n=40, d=8):
    """Random q, k, v whose first block of keys points away from every query, so that
    by score alone block 0 is never among the best."""
    q, k, v = (torch.randn(1, 2, n, d, dtype=torch.float64) for _ in range(3))
    q[..., 0] = q[..., 0].abs() + 2.0
    k[:, :, :4, 0] = -4.0
    return q, k, v


def _block_mask(chosen_blocks, block, n, causal):
    """Bool [Nq, Nk] from a list of key-block sets per query, causal applied."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i, blocks in enumerate(chosen_blocks):
        for j in blocks:
            allowed[i, j * block : (j + 1) * block] = True
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    return allowed


@pytest.mark.parametrize("causal", [True, False])
def test_nsa_selection_counts_the_initial_and_two_local_blocks(causal):
    """NSA (arXiv:2502.11089, Sec. 4.1): the n selected blocks include 1 initial and
    2 local blocks. With n = 3 the selection is exactly {0, own - 1, own}."""
    q, k, v = _nsa_inputs()
    block, n = 4, q.shape[2]
    mech = attnlab.get("nsa", block=block, top_n=3, gate_cmp=0.0, gate_slc=1.0, gate_win=0.0)
    chosen = [{0, max(i // block - 1, 0), i // block} for i in range(n)]
    want = reference_attention(q, k, v, mask=_block_mask(chosen, block, n, causal))
    # non-causal queries of blocks 0 and 1 have fewer than 3 distinct forced blocks
    # and fill the rest by score; from block 2 on the selection is exactly the three
    rows = slice(0, n) if causal else slice(2 * block, n)
    torch.testing.assert_close(mech(q, k, v, causal=causal)[:, :, rows], want[:, :, rows])


def test_nsa_fills_the_rest_of_n_by_compressed_score():
    """n = 5 (causal): the initial and two local blocks, then the two highest-scoring
    complete blocks among the rest of the past, scored by the compressed attention
    softmax(q · mean(K_b) · scale) over the blocks wholly in the past."""
    q, k, v = _nsa_inputs()
    block, n, top_n = 4, q.shape[2], 5
    scale = q.shape[-1] ** -0.5
    kc = k.unflatten(2, (n // block, block)).mean(3)
    scores = (q @ kc.transpose(-1, -2)) * scale  # [1, H, Nq, nkb]
    mech = attnlab.get("nsa", block=block, top_n=top_n, gate_cmp=0.0, gate_slc=1.0, gate_win=0.0)
    got = mech(q, k, v, causal=True)
    for h in range(q.shape[1]):
        chosen = []
        for i in range(n):
            own = i // block
            forced = {0, max(own - 1, 0), own}
            rest = [b for b in range(own) if b not in forced]
            rest.sort(key=lambda b, i=i: -float(scores[0, h, i, b]))
            chosen.append(forced | set(rest[: top_n - len(forced)]))
        allowed = _block_mask(chosen, block, n, causal=True)
        want = reference_attention(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], mask=allowed)
        torch.testing.assert_close(got[:, h : h + 1], want)


def test_biformer_routes_once_over_all_channels():
    """BiFormer (arXiv:2303.08810, Sec. 3.2; rayleizhu/BiFormer ``TopkRouting``): region
    queries and keys are means over regions of the whole C-channel q and k (heads side
    by side; grouped-query key heads repeated beside their query heads), A = Qr Krᵀ, and
    the top-k regions of A serve every head."""
    b, hq, hkv, n, d, region, top_k = 2, 4, 2, 40, 8, 5, 3
    q = torch.randn(b, hq, n, d, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, dtype=torch.float64)
    v = torch.randn(b, hkv, n, 6, dtype=torch.float64)
    k_rep = k.repeat_interleave(hq // hkv, dim=1)
    channels_q = q.permute(0, 2, 1, 3).reshape(b, n, hq * d)  # [B, N, C]
    channels_k = k_rep.permute(0, 2, 1, 3).reshape(b, n, hq * d)
    qr = channels_q.unflatten(1, (n // region, region)).mean(2)  # [B, S², C]
    kr = channels_k.unflatten(1, (n // region, region)).mean(2)
    idx = (qr @ kr.transpose(-1, -2)).topk(top_k, dim=-1).indices  # [B, S², k]
    routed = torch.zeros(b, n // region, n // region, dtype=torch.bool).scatter(-1, idx, True)
    cell = torch.arange(n) // region
    allowed = routed[:, cell][:, :, cell][:, None]  # [B, 1, N, N], every head alike
    mech = attnlab.get("biformer", region=region, top_k=top_k)
    torch.testing.assert_close(mech(q, k, v), reference_attention(q, k, v, mask=allowed))


# -- non-finite isolation --------------------------------------------------------------

ISOLATION = [
    ("lightning", {"chunk": 5}, True),
    ("nsa", {"block": 4, "top_n": 3, "window": 5}, True),
    ("nsa", {"block": 4, "top_n": 3, "window": 5}, False),
    ("neighborhood", {"kernel": 5, "stride": 2, "block": 4}, True),
    ("neighborhood", {"kernel": 5, "stride": 2, "block": 4}, False),
    ("biformer", {"region": 4, "top_k": 2}, False),
]


def _paths(name):
    """The engine paths to try: each value of the Config's path option (``form`` or
    ``backend``) besides "auto", or the default alone."""
    cls = attnlab.core.mechanism_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for option in ("backend", "form"):
        if option in fields and "flex" in cls.forms:
            return [{option: path} for path in ("torch", "flex")]
    return [{}]


def _isolation_cases():
    for name, config, causal in ISOLATION:
        for path in _paths(name):
            tag = "-".join(str(x) for x in path.values()) or "default"
            yield pytest.param(name, {**config, **path}, causal, id=f"{name}-{causal}-{tag}")


def _poisoned(t, sample, position, value):
    """A copy of t with ``value`` at one position of key/value head 0 of one sample."""
    out = t.clone()
    out[sample, 0, position] = value
    return out


@pytest.mark.parametrize(("name", "config", "causal"), list(_isolation_cases()))
@pytest.mark.parametrize("part", ["k", "v"])
def test_nonfinite_reaches_only_rows_that_see_it(name, config, causal, part):
    """A NaN in sample 1 at key position 14 (an infinity for values): sample 0 is untouched;
    in sample 1, rows that may not see position 14 (causally earlier rows, or rows the
    mask hides it from) equal the output with a zero there, and the NaN rows are exactly
    those whose output moves when the value at position 14 moves (the rows that see it)."""
    torch.manual_seed(0)
    mech = attnlab.get(name, **config).eval()
    n, pos = 24, 14
    q, k, v = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 6)
    mask = None
    if mech.spec.mask:
        mask = torch.ones(2, 1, n, n, dtype=torch.bool)
        mask[:, :, :8, pos] = False  # rows 0-7 may not see position 14
    bad = float("nan") if part == "k" else float("inf")
    inputs = {"k": k, "v": v}
    dirty = dict(inputs, **{part: _poisoned(inputs[part], 1, pos, bad)})
    zeroed = dict(inputs, **{part: _poisoned(inputs[part], 1, pos, 0.0)})
    clean = mech(q, k, v, causal=causal, mask=mask)
    got = mech(q, dirty["k"], dirty["v"], causal=causal, mask=mask)
    want = mech(q, zeroed["k"], zeroed["v"], causal=causal, mask=mask)
    torch.testing.assert_close(got[0], clean[0])
    blind = slice(0, pos) if causal else slice(0, 8)
    if causal or mask is not None:
        torch.testing.assert_close(got[1, :, blind], want[1, :, blind])
    if mech.spec.family == "linear":  # M_ij != 0 for every j <= i: rows >= 14 read it
        sees = torch.zeros(4, n, dtype=torch.bool)
        sees[:2, pos:] = True
    else:
        moved_v = zeroed["v"].clone()
        moved_v[1, 0, pos] += 1.0  # routing reads queries and keys only: the same choices
        moved = mech(q, zeroed["k"], moved_v, causal=causal, mask=mask)
        sees = (moved[1] - want[1]).abs().amax(dim=-1) > 0  # [H, N]
    assert sees[:2].any()  # some row of kv head 0's query heads reads position 14
    assert torch.equal(torch.isnan(got[1]).any(dim=-1), sees)
    assert not torch.isnan(got[1, 2:]).any()  # the other key/value head never reads it


def test_nsa_compressed_block_hides_what_the_mask_hides():
    """A compressed block is a mean over its keys: a query that may not see one of them
    does not see the block, so a masked key changes nothing for that query."""
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    mask[..., :6, 9] = False
    mech = attnlab.get("nsa", block=4, gate_cmp=1.0, gate_slc=0.0, gate_win=0.0)
    k2, v2 = k.clone(), v.clone()
    k2[..., 9, :] += 5.0
    v2[..., 9, :] -= 7.0
    a, b = mech(q, k, v, mask=mask), mech(q, k2, v2, mask=mask)
    torch.testing.assert_close(a[..., :6, :], b[..., :6, :])
    assert not torch.allclose(a[..., 6:, :], b[..., 6:, :])
