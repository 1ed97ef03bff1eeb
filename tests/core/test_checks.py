"""Input checks, masks and the registry of the core contract.

Hypothesis draws valid shapes, corrupts one argument at random (rank, shape,
dtype, head counts, mask, scale, causal) and asserts that the call raises
``AttnInputError`` whose message names that argument, what was expected and
what came. Valid draws must run.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import causal_mask, repeat_kv, slice_mask, zero_dead_keys

SETTINGS = settings(max_examples=50, deadline=None)
MECHANISMS = ["softmax", "online"]


@st.composite
def shapes(draw):
    """A valid (B, Hq, Hkv, Nq, Nk, D, Dv)."""
    hkv = draw(st.integers(1, 3))
    return (
        draw(st.integers(1, 3)),
        hkv * draw(st.integers(1, 3)),
        hkv,
        draw(st.integers(1, 7)),
        draw(st.integers(1, 7)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 6)),
    )


def _tensors(shape, dtype=torch.float32):
    b, hq, hkv, nq, nk, d, dv = shape
    return (
        torch.randn(b, hq, nq, d, dtype=dtype),
        torch.randn(b, hkv, nk, d, dtype=dtype),
        torch.randn(b, hkv, nk, dv, dtype=dtype),
    )


def _assert_names(excinfo, argument: str) -> None:
    message = str(excinfo.value)
    assert re.search(rf"^{re.escape(argument)}\b|\b{re.escape(argument)}:", message), message
    assert "expected" in message and "got" in message, message


def _other_size(draw, size):
    return draw(st.integers(1, 9).filter(lambda n: n != size))


@SETTINGS
@given(shape=shapes(), mechanism=st.sampled_from(MECHANISMS), causal=st.booleans())
def test_valid_inputs_run(shape, mechanism, causal):
    q, k, v = _tensors(shape)
    out = attnlab.attention(q, k, v, mechanism=mechanism, causal=causal)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and torch.isfinite(out).all()


@SETTINGS
@given(
    shape=shapes(),
    which=st.sampled_from(["q", "k", "v"]),
    rank=st.sampled_from([1, 2, 3, 5, 6]),
)
def test_wrong_rank_names_the_tensor(shape, which, rank):
    args = dict(zip("qkv", _tensors(shape), strict=True))
    t = args[which]
    args[which] = t.flatten(0, 4 - rank) if rank < 4 else t[(None,) * (rank - 4)]
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        attnlab.attention(args["q"], args["k"], args["v"])
    _assert_names(excinfo, which)


@SETTINGS
@given(
    shape=shapes(),
    which=st.sampled_from(["q", "k", "v"]),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]),
)
def test_non_float_dtype_names_the_tensor(shape, which, dtype):
    args = dict(zip("qkv", _tensors(shape), strict=True))
    args[which] = args[which].to(dtype)
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        attnlab.attention(args["q"], args["k"], args["v"])
    _assert_names(excinfo, which)


@SETTINGS
@given(
    shape=shapes(),
    which=st.sampled_from(["k", "v"]),
    dtype=st.sampled_from([torch.float64, torch.bfloat16, torch.float16]),
)
def test_mixed_float_dtypes_are_refused(shape, which, dtype):
    args = dict(zip("qkv", _tensors(shape), strict=True))
    args[which] = args[which].to(dtype)
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        attnlab.attention(args["q"], args["k"], args["v"])
    _assert_names(excinfo, which)


@SETTINGS
@given(
    shape=shapes(),
    which=st.sampled_from(["q", "k", "v"]),
    obj=st.sampled_from(["list", "numpy", "none"]),
)
def test_non_tensor_names_the_argument(shape, which, obj):
    args = dict(zip("qkv", _tensors(shape), strict=True))
    t = args[which]
    args[which] = {"list": t.tolist(), "numpy": t.numpy(), "none": None}[obj]
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        attnlab.attention(args["q"], args["k"], args["v"])
    _assert_names(excinfo, which)


@SETTINGS
@given(data=st.data(), shape=shapes())
def test_mismatched_sizes_name_the_argument(data, shape):
    b, hq, hkv, _, nk, d, dv = shape
    kind = data.draw(
        st.sampled_from(["heads", "v-heads", "head-dim", "v-length", "batch", "empty"])
    )
    q, k, v = _tensors(shape)
    if kind == "heads":  # Hkv that does not divide Hq
        hkv2 = data.draw(st.integers(2, 7).filter(lambda h: hq % h != 0))
        k, v = torch.randn(b, hkv2, nk, d), torch.randn(b, hkv2, nk, dv)
        argument = "k"
    elif kind == "v-heads":
        v = torch.randn(b, _other_size(data.draw, hkv), nk, dv)
        argument = "v"
    elif kind == "head-dim":
        k = torch.randn(b, hkv, nk, _other_size(data.draw, d))
        argument = "k"
    elif kind == "v-length":
        v = torch.randn(b, hkv, _other_size(data.draw, nk), dv)
        argument = "v"
    elif kind == "batch":
        b2 = _other_size(data.draw, b)
        k, v = torch.randn(b2, hkv, nk, d), torch.randn(b2, hkv, nk, dv)
        argument = "k"
    else:
        q = q[:, :, :0]
        argument = "q"
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        attnlab.attention(q, k, v, mechanism=data.draw(st.sampled_from(MECHANISMS)))
    _assert_names(excinfo, argument)


@SETTINGS
@given(data=st.data(), shape=shapes())
def test_bad_masks_are_refused(data, shape):
    b, hq, _, nq, nk, _, _ = shape
    target = (b, hq, nq, nk)
    kind = data.draw(st.sampled_from(["shape", "rank", "dtype", "type"]))
    if kind == "shape":
        dims = data.draw(st.integers(1, 4))
        sizes = [data.draw(st.integers(1, 9)) for _ in range(dims)]
        # make at least one trailing dimension neither 1 nor the target's size
        axis = data.draw(st.integers(0, dims - 1))
        want = target[4 - dims + axis]
        sizes[axis] = data.draw(st.integers(2, 10).filter(lambda n, w=want: n != w))
        mask = torch.ones(sizes, dtype=torch.bool)
    elif kind == "rank":
        mask = torch.ones(1, 1, 1, 1, 1, dtype=torch.bool)
    elif kind == "dtype":
        dtype = data.draw(st.sampled_from([torch.float32, torch.int64, torch.uint8]))
        mask = torch.ones(nq, nk, dtype=dtype)
    else:
        mask = np.ones((nq, nk), dtype=bool)
    q, k, v = _tensors(shape)
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        attnlab.attention(q, k, v, mask=mask, mechanism=data.draw(st.sampled_from(MECHANISMS)))
    _assert_names(excinfo, "mask")


@SETTINGS
@given(data=st.data(), shape=shapes())
def test_broadcastable_masks_are_accepted(data, shape):
    b, hq, _, nq, nk, _, _ = shape
    target = (b, hq, nq, nk)
    dims = data.draw(st.integers(1, 4))
    sizes = [data.draw(st.sampled_from([1, n])) for n in target[4 - dims :]]
    mask = torch.ones(sizes, dtype=torch.bool)
    q, k, v = _tensors(shape)
    out = attnlab.attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, attnlab.attention(q, k, v))


@SETTINGS
@given(
    shape=shapes(),
    scale=st.one_of(
        st.sampled_from([float("nan"), float("inf"), -float("inf"), True, "0.5", 1j]),
        st.lists(st.floats(allow_nan=False), min_size=1, max_size=2),
    ),
)
def test_bad_scale_is_refused(shape, scale):
    q, k, v = _tensors(shape)
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        attnlab.attention(q, k, v, scale=scale)
    _assert_names(excinfo, "scale")


@SETTINGS
@given(shape=shapes(), causal=st.sampled_from([0, 1, None, "yes", 1.0, torch.tensor(True)]))
def test_bad_causal_is_refused(shape, causal):
    q, k, v = _tensors(shape)
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        attnlab.attention(q, k, v, causal=causal)
    _assert_names(excinfo, "causal")


@SETTINGS
@given(value=st.one_of(st.integers(max_value=0), st.sampled_from([True, 2.0, "3", None])))
def test_check_positive_int(value):
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        check_positive_int("window", value)
    _assert_names(excinfo, "window")


# ---------------------------------------------------------------- masks


@SETTINGS
@given(nq=st.integers(1, 12), nk=st.integers(1, 12))
def test_causal_mask_is_bottom_right(nq, nk):
    mask = causal_mask(nq, nk)
    want = torch.tensor([[j <= i + nk - nq for j in range(nk)] for i in range(nq)])
    assert torch.equal(mask, want)
    # the last query sees every key; each row sees one key more than the one above
    assert mask[-1].all()
    counts = mask.sum(dim=1)
    assert torch.equal(counts, (torch.arange(nq) + nk - nq + 1).clamp(0, nk))


def test_causal_mask_examples():
    # Nq < Nk: the queries are the last Nq positions (a decode step sees everything)
    assert causal_mask(1, 4).tolist() == [[True, True, True, True]]
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    # Nq > Nk: the first Nq - Nk queries see nothing
    assert causal_mask(4, 2).tolist() == [
        [False, False],
        [False, False],
        [True, False],
        [True, True],
    ]


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = _tensors((1, 2, 1, 4, 2, 3, 3))
    out = attnlab.attention(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2:] != 0).any()


def test_slice_mask_keeps_broadcast_dims():
    mask = torch.rand(2, 1, 5, 7) > 0.5
    assert torch.equal(slice_mask(mask, slice(1, 3), slice(2, 6)), mask[..., 1:3, 2:6])
    key_only = torch.rand(2, 1, 1, 7) > 0.5
    assert torch.equal(slice_mask(key_only, slice(1, 3), slice(2, 6)), key_only[..., 2:6])
    assert slice_mask(None, slice(0, 1), slice(0, 1)) is None


def test_repeat_kv_serves_consecutive_query_heads():
    x = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)
    out = repeat_kv(x, 2)
    assert out[:, :, 0, 0].tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5]]
    assert repeat_kv(x, 1) is x


def test_zero_dead_keys_clears_only_padding():
    k, v = torch.randn(2, 1, 4, 3), torch.randn(2, 1, 4, 2)
    k[0, :, 3] = float("nan")
    keep = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    keep[0, ..., 3] = False
    k2, v2 = zero_dead_keys(k, v, keep)
    assert (k2[0, :, 3] == 0).all() and (v2[0, :, 3] == 0).all()
    assert torch.equal(k2[1], k[1]) and torch.equal(k2[0, :, :3], k[0, :, :3])


# ---------------------------------------------------------------- registry


def test_registry_filters_by_family_and_capability():
    exact = attnlab.mechanisms(family="exact")
    assert {"softmax", "online", "chunked"} <= set(exact)
    assert all(attnlab.spec(n).family == "exact" for n in exact)
    decoders = attnlab.mechanisms(family="exact", decode=True)
    assert set(decoders) <= set(exact) and "softmax" in decoders
    assert all(attnlab.spec(n).decode for n in decoders)
    assert set(attnlab.mechanisms(decode=False)).isdisjoint(attnlab.mechanisms(decode=True))
    assert attnlab.mechanisms() == attnlab.core.names()


def test_registry_rejects_unknown_filters():
    with pytest.raises(attnlab.AttnInputError, match=r"^family:.*exact"):
        attnlab.mechanisms(family="quantum")
    with pytest.raises(attnlab.AttnInputError, match=r"^speedy:"):
        attnlab.mechanisms(speedy=True)


def test_unknown_mechanism_lists_the_known_names():
    with pytest.raises(attnlab.AttnInputError) as excinfo:
        attnlab.get("no-such-attention")
    message = str(excinfo.value)
    assert message.startswith("mechanism:") and "no-such-attention" in message
    assert all(name in message for name in attnlab.mechanisms())


def test_unknown_option_lists_the_options():
    with pytest.raises(attnlab.AttnInputError, match=r"^config:.*block_q"):
        attnlab.get("online", window=3)
