"""The sparse family on the block-sparse engine: neighborhoods, both paths, densities, limits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnlab
from attnlab.core.blocks import (
    FLEX_COMPILE_MIN_PAIRS,
    BlockLayout,
    choose_path,
    prefers_flex,
    ranges_to_candidates,
    sliding_start,
)
from attnlab.core.reference import reference_attention
from attnlab.mechanisms.sparse.neighborhood import axis_window


def _axis_keys(x, length, kernel, dilation, stride, causal):
    """Naive per-query neighborhood on one axis, from explicit lists of group members."""
    members = list(range(x % dilation, length, dilation))
    t = members.index(x)
    k = min(kernel, len(members))
    first = (t // stride) * stride
    if causal:
        leader = min(first + stride - 1, len(members) - 1)
        return set(members[max(leader - k + 1, 0) : t + 1])
    leader = min(first + stride // 2, len(members) - 1)  # NATTEN: the right-hand centre
    lo = min(max(leader - k // 2, 0), len(members) - k)
    return set(members[lo : lo + k])


def naive_neighborhood_mask(shape, kernel, dilation, stride, axis_causal):
    """Dense bool [N, N] built query by query from per-axis coordinate sets."""
    coords = list(itertools.product(*[range(s) for s in shape]))
    n = len(coords)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qi, qc in enumerate(coords):
        sets = [
            _axis_keys(x, *params)
            for x, params in zip(
                qc, zip(shape, kernel, dilation, stride, axis_causal, strict=True), strict=True
            )
        ]
        for ki, kc in enumerate(coords):
            mask[qi, ki] = all(y in s for y, s in zip(kc, sets, strict=True))
    return mask


@pytest.mark.parametrize(
    ("x", "length", "kernel", "dilation", "stride", "causal", "want"),
    [
        (0, 7, 3, 1, 1, False, {0, 1, 2}),  # left border: shifted inwards
        (3, 7, 3, 1, 1, False, {2, 3, 4}),
        (6, 7, 3, 1, 1, False, {4, 5, 6}),  # right border
        (0, 8, 3, 2, 1, False, {0, 2, 4}),  # dilation: own parity group
        (7, 8, 3, 2, 1, False, {3, 5, 7}),
        (1, 6, 3, 1, 3, False, {0, 1, 2}),  # stride = kernel: blocked attention
        (4, 6, 3, 1, 3, False, {3, 4, 5}),
        (0, 6, 3, 1, 1, True, {0}),  # causal axis
        (4, 6, 3, 1, 1, True, {2, 3, 4}),
        (3, 6, 3, 1, 3, True, {3}),  # causal blocked: the block up to the query
        (5, 6, 3, 1, 3, True, {3, 4, 5}),
    ],
)
def test_axis_window_by_hand(x, length, kernel, dilation, stride, causal, want):
    group, start, end = axis_window(x, length, kernel, dilation, stride, causal)
    got = {group + t * dilation for t in range(start, end)}
    assert got == want == _axis_keys(x, length, kernel, dilation, stride, causal)


NEIGHBORHOODS = [
    # shape, kernel, dilation, stride, axis_causal, call causal
    ((13,), (5,), (1,), (1,), (False,), False),
    ((13,), (3,), (2,), (1,), (False,), True),
    ((12,), (4,), (1,), (2,), (False,), False),
    ((11,), (3,), (1,), (3,), (True,), False),
    ((5, 6), (3, 4), (1, 2), (1, 2), (True, False), False),
    ((6, 5), (5, 3), (1, 1), (1, 1), (False, False), True),
    ((3, 4, 5), (2, 3, 3), (1, 1, 2), (2, 1, 1), (False, True, False), False),
    ((4, 3, 4), (3, 3, 2), (2, 1, 1), (1, 1, 2), (False, False, True), True),
]


@pytest.mark.parametrize("case", NEIGHBORHOODS, ids=lambda c: f"{len(c[0])}d-{c[0]}-{c[5]}")
def test_neighborhood_matches_naive(case):
    shape, kernel, dilation, stride, axis_causal, causal = case
    n = math.prod(shape)
    mech = attnlab.get(
        "neighborhood",
        shape=shape,
        kernel=kernel,
        dilation=dilation,
        stride=stride,
        axis_causal=axis_causal,
        block=8,
        backend="torch",
    )
    allowed = naive_neighborhood_mask(shape, kernel, dilation, stride, axis_causal)
    q = torch.randn(1, 2, n, 8, dtype=torch.float64)
    k = torch.randn(1, 2, n, 8, dtype=torch.float64)
    v = torch.randn(1, 2, n, 4, dtype=torch.float64)
    want = reference_attention(q, k, v, causal=causal, mask=allowed)
    torch.testing.assert_close(mech(q, k, v, causal=causal), want)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    assert mech.density(n, n, causal) == pytest.approx(allowed.sum().item() / n**2)
    if not causal and not any(axis_causal):
        # windows are clamped at the borders: every query sees prod(kernel) keys
        assert (allowed.sum(dim=1) == math.prod(kernel)).all()


STATIC = ["window", "dilated", "neighborhood", "blocksparse", "strided", "radial"]


@pytest.mark.parametrize("name", STATIC)
@pytest.mark.parametrize("causal", [False, True])
def test_each_equals_its_own_dense_mask(name, causal):
    """The engine's answer equals softmax under the mechanism's own rule, applied densely."""
    mech = attnlab.get(name, **attnlab.core.mechanism_class(name).tiny_config, backend="torch")
    n, heads = 24, 4
    rule = mech.rule(n, n, causal, heads)
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.arange(heads).view(1, heads, 1, 1)
    i, j = torch.arange(n).view(1, 1, n, 1), torch.arange(n).view(1, 1, 1, n)
    dense = rule(b, h, i, j).expand(1, heads, n, n)
    if causal:
        dense = dense & (j <= i)
    q = torch.randn(2, heads, n, 8, dtype=torch.float64)
    k = torch.randn(2, 2, n, 8, dtype=torch.float64)
    v = torch.randn(2, 2, n, 5, dtype=torch.float64)
    want = reference_attention(q, k, v, mask=dense)
    torch.testing.assert_close(mech(q, k, v, causal=causal), want)
    assert mech.density(n, n, causal, heads) == pytest.approx(dense.sum().item() / (heads * n * n))


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("window", {"window": 40, "block": 16}),
        ("dilated", {"window": 9, "dilation": 3, "block": 16}),
        ("neighborhood", {"kernel": 33, "block": 16}),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_bands_read_keys_in_place(name, config, causal):
    """Bands of consecutive key blocks are read through strided views, also from strided inputs."""
    n, heads = 200, 3
    mech = attnlab.get(name, **config, backend="torch")
    layout = mech.layout(n, n, causal)
    assert any(
        sliding_start(layout, run.c0, run.c1, run.used) is not None for run in layout.runs(3)
    )
    q = torch.randn(1, 300, heads, 16, dtype=torch.float64)[:, 50 : 50 + n].transpose(1, 2)
    k = torch.randn(1, n, heads, 16, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(1, heads, n, 8, dtype=torch.float64)
    i, j = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    zero = torch.zeros(1, 1, dtype=torch.long)
    dense = mech.rule(n, n, causal, heads)(zero, zero, i, j)
    if causal:
        dense = dense & (j <= i)
    torch.testing.assert_close(
        mech(q, k, v, causal=causal), reference_attention(q, k, v, mask=dense)
    )


def test_neighborhood_limit_is_full_attention():
    mech = attnlab.get("neighborhood", shape=(4, -1), kernel=(3, 3), dilation=(1, 2), block=8)
    full = attnlab.get("neighborhood", **vars(mech.limit(24)))
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(full(q, k, v), reference_attention(q, k, v))
    assert full.density(24, 24, False) == 1.0


def test_neighborhood_rejects_a_length_off_the_grid():
    mech = attnlab.get("neighborhood", shape=(5, 5))
    q = torch.randn(1, 1, 24, 8)
    with pytest.raises(attnlab.AttnInputError, match="q: expected N"):
        mech(q, q, q)
    with pytest.raises(attnlab.AttnInputError, match="stride"):
        attnlab.get("neighborhood", kernel=3, stride=4)


def test_window_and_dilated_densities():
    n, w = 24, 5
    causal_pairs = sum(min(i + 1, w) for i in range(n))
    full_pairs = sum(min(i + w, n) - max(i - w + 1, 0) for i in range(n))
    window = attnlab.get("window", window=w, block=4)
    assert window.density(n, n, True) == causal_pairs / n**2
    assert window.density(n, n, False) == full_pairs / n**2
    dilated = attnlab.get("dilated", window=3, dilation=4, block=4)
    # query i sees i, i-4, i-8 (those that exist)
    assert dilated.density(n, n, True) == sum(min(i // 4 + 1, 3) for i in range(n)) / n**2
    assert attnlab.get("window", window=n).density(n, n, False) == 1.0


def test_blocksparse_and_strided_patterns():
    local = attnlab.get("blocksparse", local=1, global_blocks=0, random=0, block=4)
    assert local.density(24, 24, False) == 4 / 24  # each query sees its own block
    glob = attnlab.get("blocksparse", local=1, global_blocks=1, random=0, block=4)
    # block 0 sees all; other blocks see their own and block 0
    assert glob.density(24, 24, False) == (4 * 24 + 20 * 8) / 24**2
    rand = attnlab.get("blocksparse", local=1, global_blocks=0, random=2, block=4, seed=3)
    again = attnlab.get("blocksparse", local=1, global_blocks=0, random=2, block=4, seed=3)
    t1, t2 = rand.table(24, 24, False, 4), again.table(24, 24, False, 4)
    assert torch.equal(t1, t2) and (t1.sum(-1) == 3).all()  # seeded: own + 2 random
    assert not torch.equal(t1[0], t1[1])  # drawn per head
    strided = attnlab.get("strided", local=1, stride=3, block=4)
    table = strided.table(24, 24, False, 3)
    assert table.any(dim=0).all()  # the shards of 3 heads cover the context
    assert not table.all(dim=0).all()  # no head sees everything


def test_radial_keys_grow_logarithmically():
    radial = attnlab.get("radial", frame=8, block=16)
    per_query = [radial.density(n, n, False) * n for n in (64, 256, 1024)]
    assert per_query[0] < per_query[1] < per_query[2] < 3 * per_query[0]
    assert attnlab.get("radial", frame=64).density(64, 64, False) == 1.0


def test_engine_matches_dense_reference_with_user_mask_and_gqa():
    def rule(b, h, q, kv):
        return (kv <= q + 1) & ((q - kv) % 3 != 1)

    n, bs = 21, 4
    nqb = -(-n // bs)
    cand = ranges_to_candidates(torch.zeros(nqb, dtype=torch.long), torch.full((nqb,), nqb))
    layout = BlockLayout.build(rule, cand[None, None], n, n, bs)
    q = torch.randn(2, 4, n, 8, dtype=torch.float64)
    k = torch.randn(2, 2, n, 8, dtype=torch.float64)
    v = torch.randn(2, 2, n, 5, dtype=torch.float64)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    dense = rule(0, 0, i, j)
    user = torch.rand(2, 1, n, n) > 0.4
    user[:, :, 2] = False  # a row that sees nothing gives zeros
    want = reference_attention(q, k, v, mask=dense & user)
    got = attnlab.core.blocks.torch_block_attention(q, k, v, layout, scale=8**-0.5, mask=user)
    torch.testing.assert_close(got, want)
    assert (got[:, :, 2] == 0).all()
    assert layout.pairs() == dense.sum().item()


def test_trainable_path_never_builds_n_by_n():
    layout = attnlab.get("window", window=64, block=32).layout(4096, 4096, True)
    assert layout.allowed().shape[-1] <= 64 + 2 * 32  # keys gathered per query block
    assert layout.allowed().shape[-1] * 8 < 4096


def test_path_choice():
    q = torch.randn(1, 1, 2048, 8)
    assert choose_path(q, q, q) == "torch"  # on CPU the fused SDPA path is the faster one
    assert prefers_flex("cuda", 2048 * 2048) and not prefers_flex("cuda", 64 * 64)
    assert not prefers_flex("cpu", 2048 * 2048)
    assert choose_path(q.requires_grad_(), q, q) == "torch"
    assert choose_path(q.double(), q.double(), q.double()) == "torch"


FLEX_CASES = [
    # name, config, N, causal, with a user mask: each compiles one flex kernel
    # (N x N from FLEX_COMPILE_MIN_PAIRS up; smaller runs FlexAttention uncompiled,
    # which the contract tests' forms check covers)
    ("window", {"window": 9, "block": 16}, 72, True, True),
    ("neighborhood", {"shape": (8, 9), "kernel": (3, 5), "block": 16}, 72, False, False),
    ("blocksparse", {"local": 1, "global_blocks": 1, "random": 1, "block": 16}, 72, True, False),
]


@pytest.mark.parametrize("case", FLEX_CASES, ids=lambda c: c[0])
def test_torch_and_flex_paths_agree(case):
    name, config, n, causal, with_mask = case
    assert n * n >= FLEX_COMPILE_MIN_PAIRS
    q, k = torch.randn(2, 4, n, 8), torch.randn(2, 2, n, 8)
    v = torch.randn(2, 2, n, 6)
    mask = (torch.rand(2, 1, n, n) > 0.3) if with_mask else None
    torch_out = attnlab.get(name, **config, backend="torch")(q, k, v, causal=causal, mask=mask)
    flex_out = attnlab.get(name, **config, backend="flex")(q, k, v, causal=causal, mask=mask)
    torch.testing.assert_close(flex_out, torch_out, rtol=1e-4, atol=1e-5)


def test_flex_backend_refuses_gradients_and_float64():
    mech = attnlab.get("window", window=4, backend="flex")
    q = torch.randn(1, 1, 8, 4, dtype=torch.float64)
    with pytest.raises(attnlab.AttnInputError, match="backend"):
        mech(q, q, q)
    q = torch.randn(1, 1, 8, 4, requires_grad=True)
    with pytest.raises(attnlab.AttnInputError, match="backend"):
        mech(q, q, q)


@pytest.mark.parametrize("causal", [False, True])
def test_gather_pieces_and_shared_bias_match_dense(monkeypatch, causal):
    """Gathers cut into one-block pieces, shared per-run biases and the preallocated
    output (no gradients) give the dense answer; so do whole runs with gradients."""
    monkeypatch.setattr(attnlab.core.blocks.sizes, "GATHER_BYTES", 1)
    n, heads = 70, 3
    mech = attnlab.get("blocksparse", local=2, global_blocks=1, random=1, block=8, backend="torch")
    layout = mech.layout(n, n, causal, heads)
    shared = [
        layout.shared_bias(run.c0, run.c1, run.used, torch.float64)
        for run in layout.runs(heads)
        if not run.plain
    ]
    assert any(s is not None and s.shape[:2] == (1, 1) for s in shared)
    q, k, v = (torch.randn(1, heads, n, 8, dtype=torch.float64) for _ in range(3))
    table = mech.table(n, n, causal, heads)
    i, j = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    dense = table[:, i // 8, j // 8]
    if causal:
        dense = dense & (j <= i)
    want = reference_attention(q, k, v, mask=dense[None])
    with torch.no_grad():
        torch.testing.assert_close(mech(q, k, v, causal=causal), want)
    q.requires_grad_()
    got = mech(q, k, v, causal=causal)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
