"""attnlab.nn.Attention: shapes, causality, decode, GQA, cross attention, mixes, gradients."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.core.registry import mechanism_class
from attnlab.nn import Attention, Rotary, head_groups


def tiny(name: str) -> dict:
    return dict(mechanism_class(name).tiny_config)


DECODE_CASES = [
    ("softmax", {}),
    ("linear", tiny("linear")),
    ("window", tiny("window")),
    ([("softmax", 2), ("linear", 2)], {}),
    ([("window", 2, tiny("window")), ("delta", 2, tiny("delta"))], {}),
]


def test_shapes_and_projections():
    layer = Attention(32, 4, mechanism="softmax")
    out = layer(torch.randn(3, 10, 32))
    assert out.shape == (3, 10, 32)
    assert layer.q_proj.weight.shape == (32, 32)
    assert layer.k_proj.weight.shape == (32, 32)
    gqa = Attention(32, 4, kv_heads=1, head_dim=16)
    assert gqa.q_proj.weight.shape == (64, 32)
    assert gqa.k_proj.weight.shape == (16, 32)
    assert gqa(torch.randn(2, 7, 32)).shape == (2, 7, 32)


@pytest.mark.parametrize("mechanism", ["softmax", "linear", "window", "based"])
def test_causal_layer_ignores_the_future(mechanism):
    cfg = tiny(mechanism) if mechanism != "softmax" else {}
    layer = Attention(32, 4, 2, mechanism=mechanism, **cfg).eval()
    x = torch.randn(2, 20, 32)
    changed = x.clone()
    changed[:, 12:] = torch.randn(2, 8, 32)
    a, b = layer(x), layer(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_noncausal_layer_sees_the_future():
    layer = Attention(32, 4, causal=False).eval()
    x = torch.randn(1, 10, 32)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert (layer(x)[:, 0] - layer(changed)[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize(("mechanism", "config"), DECODE_CASES, ids=str)
def test_decode_token_by_token_equals_the_full_pass(mechanism, config):
    layer = Attention(32, 4, kv_heads=2, mechanism=mechanism, **config).eval()
    x = torch.randn(2, 23, 32)
    full = layer(x)
    cache = layer.init_cache(2)
    outs = []
    for i in range(x.shape[1]):
        out, cache = layer.step(x[:, i : i + 1], cache)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=2e-5, rtol=1e-4)
    assert cache["position"] == 23


def test_decode_in_pieces_equals_the_full_pass():
    layer = Attention(32, 4, mechanism="linear", **tiny("linear")).eval()
    x = torch.randn(1, 17, 32)
    cache = layer.init_cache(1)
    first, cache = layer.step(x[:, :9], cache)
    second, cache = layer.step(x[:, 9:], cache)
    torch.testing.assert_close(torch.cat([first, second], 1), layer(x), atol=2e-5, rtol=1e-4)


def test_decode_without_a_recurrent_form_keeps_a_cache():
    # strided has no init_state/step: the layer keeps q, k, v and recomputes the causal pass
    assert not attnlab.spec("strided").decode
    layer = Attention(32, 4, mechanism="strided", **tiny("strided")).eval()
    x = torch.randn(1, 16, 32)
    cache = layer.init_cache(1)
    outs = []
    for i in range(16):
        out, cache = layer.step(x[:, i : i + 1], cache)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), layer(x), atol=2e-5, rtol=1e-4)
    assert cache["states"][0]["k"].shape == (1, 4, 16, 8)


def test_gqa_equals_repeated_key_heads():
    """With kv_heads=2 of 4, the layer equals a full-head layer whose key and value
    projections repeat each key head for its two query heads."""
    gqa = Attention(32, 4, kv_heads=2).eval()
    mha = Attention(32, 4).eval()
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for proj in ("k_proj", "v_proj"):
            w = getattr(gqa, proj).weight.view(2, 8, 32)
            getattr(mha, proj).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(gqa(x), mha(x))
    mqa = Attention(32, 4, kv_heads=1)
    assert mqa.k_proj.weight.shape == (8, 32)
    assert mqa.state_size(10) == 10 * 1 * 16  # keys and values of one head


def test_cross_attention():
    layer = Attention(32, 4, causal=False, context_dim=20, rotary=False).eval()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 11, 20)
    out = layer(x, context)
    assert out.shape == (2, 5, 32)
    # each query attends over the context: changing the context changes every output
    assert (layer(x, context + 1.0) - out).abs().amin(dim=-1).gt(0).all()
    # and a query's output does not depend on the other queries
    torch.testing.assert_close(layer(x[:, :2], context), out[:, :2])
    with pytest.raises(attnlab.AttnInputError, match="context"):
        layer(x)
    no_cross = Attention(32, 4, mechanism="lightning", **tiny("lightning"), context_dim=20)
    with pytest.raises(attnlab.AttnInputError, match="context: mechanism lightning"):
        no_cross(x, context)


def test_mix_runs_each_mechanism_on_its_heads():
    """A mix's output equals the per-group mechanisms applied to the slices of heads."""
    mix = Attention(32, 4, mechanism=[("softmax", 1), ("linear", 3, tiny("linear"))]).eval()
    assert [(g.name, g.heads) for g in mix.groups] == [("softmax", 1), ("linear", 3)]
    only_softmax = Attention(32, 4, mechanism="softmax").eval()
    only_linear = Attention(32, 4, mechanism="linear", **tiny("linear")).eval()
    for other in (only_softmax, only_linear):
        other.load_state_dict(mix.state_dict(), strict=False)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        q, k, v = mix._project(x, None, 0)
        mixed_heads = torch.cat(
            [
                only_softmax.mechanisms[0](q[:, :1], k[:, :1], v[:, :1], causal=True),
                only_linear.mechanisms[0](q[:, 1:], k[:, 1:], v[:, 1:], causal=True),
            ],
            dim=1,
        )
        expected = mix.o_proj(mixed_heads.transpose(1, 2).reshape(2, 12, 32))
    torch.testing.assert_close(mix(x), expected)
    # the linear heads keep a constant state, the softmax head a growing cache
    assert mix.state_size(100) - mix.state_size(50) == 50 * 2 * 8


def test_head_groups_split_kv_heads():
    groups = head_groups([("softmax", 2), ("linear", 6)], 8, 4, {})
    assert [(g.heads, g.kv_heads, g.q_start, g.kv_start) for g in groups] == [
        (2, 1, 0, 0),
        (6, 3, 2, 1),
    ]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"mechanism": "agent"}, "causal"),  # agent has no causal form
        ({"mechanism": "based", "causal": False}, "causal"),  # based is causal only
        ({"mechanism": [("softmax", 1), ("linear", 2)]}, "mechanism"),  # heads sum to 3
        ({"mechanism": [("softmax", 1), ("linear", 3)], "kv_heads": 2}, "mechanism"),
        ({"mechanism": "no-such-mechanism"}, "mechanism"),
        ({"kv_heads": 3}, "kv_heads"),
        ({"mechanism": [("softmax", 2), ("linear", 2)], "window": 4}, "config"),
        ({"mechanism": "window", "windw": 4}, "config"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, argument):
    with pytest.raises(attnlab.AttnInputError, match=argument):
        Attention(32, 4, **kwargs)


def test_bad_inputs_are_refused_by_name():
    layer = Attention(32, 4)
    with pytest.raises(attnlab.AttnInputError, match="x: expected a tensor"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(attnlab.AttnInputError, match="causal"):
        Attention(32, 4, causal=False).init_cache(1)


def test_rotary_depends_on_relative_position_only():
    rot = Rotary(8)
    q, k = (
        torch.randn(1, 1, 1, 8, dtype=torch.float64),
        torch.randn(1, 1, 1, 8, dtype=torch.float64),
    )
    near = (rot(q, 5) * rot(k, 3)).sum()
    far = (rot(q, 105) * rot(k, 103)).sum()
    torch.testing.assert_close(near, far)
    assert not torch.allclose(near, (rot(q, 5) * rot(k, 4)).sum())
    torch.testing.assert_close(rot(q, 0), q)


def test_gradcheck_softmax_layer():
    layer = Attention(8, 2, kv_heads=1, mechanism="softmax").double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    context = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    cross = Attention(8, 2, causal=False, rotary=False).double()
    assert torch.autograd.gradcheck(lambda a, b: cross(a, b), (x, context))
