"""The layer-level contract of the ``heads`` family, run on every mechanism registered in it.

These mechanisms own their projections (``layer(x, context=None, causal=False)`` on hidden
states x [B, N, dim]), so they are kept out of the q/k/v contract of test_contract.py and
checked here: shapes, causality, decode token by token equals the full pass, gradcheck in
float64, the cache floats per token against the Spec, and bad input naming the argument.
"""

from __future__ import annotations

import re

import pytest
import torch

import attnlab
from attnlab.core import mechanism_class

HEADS = attnlab.mechanisms(family="heads")
DECODE = [n for n in HEADS if attnlab.spec(n).decode]
CROSS = [n for n in HEADS if attnlab.spec(n).cross]


def build(name: str, dtype=torch.float32, **overrides):
    cls = mechanism_class(name)
    return attnlab.get(name, **{**cls.tiny_config, **overrides}).to(dtype).eval()


def hidden(layer, b=2, n=13, dtype=torch.float32):
    return torch.randn(b, n, layer.config.dim, dtype=dtype)


def _modes(spec):
    return [c for c in (False, True) if (spec.causal if c else spec.noncausal)]


def test_the_family_holds_the_issue_mechanisms():
    assert {"mqa", "gqa", "mla", "moh", "sqa", "talking-heads"} <= set(HEADS)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_dtype_and_finite(name, dtype):
    layer = build(name, dtype)
    x = hidden(layer, dtype=dtype)
    for causal in _modes(layer.spec):
        out = layer(x, causal=causal)
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", CROSS)
def test_cross_attention_shape_and_dependence_on_context(name):
    layer = build(name)
    x, context = hidden(layer, n=7), hidden(layer, n=11)
    out = layer(x, context=context)
    assert out.shape == x.shape
    assert not torch.allclose(out, layer(x, context=hidden(layer, n=11)))


@pytest.mark.parametrize("name", [n for n in HEADS if attnlab.spec(n).causal])
def test_causal_outputs_ignore_later_tokens(name):
    layer = build(name, torch.float64)
    x = hidden(layer, n=17, dtype=torch.float64)
    changed = x.clone()
    changed[:, 9:] = torch.randn_like(changed[:, 9:])
    before, after = layer(x, causal=True), layer(changed, causal=True)
    assert torch.allclose(before[:, :9], after[:, :9], atol=1e-12, rtol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.parametrize("name", DECODE)
@pytest.mark.parametrize("chunk", [1, 4])
def test_decode_equals_the_causal_full_pass(name, chunk):
    layer = build(name, torch.float64)
    x = hidden(layer, n=13, dtype=torch.float64)
    full = layer(x, causal=True)
    state = layer.init_state(x.shape[0], dtype=x.dtype)
    outs = []
    for s in range(0, x.shape[1], chunk):
        out, state = layer.step(x[:, s : s + chunk], state)
        outs.append(out)
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-10, rtol=0)


def _floats(state) -> int:
    return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))


def _declared(spec, layer) -> int:
    """The cache size the Spec's complexity string states, e.g. "cache 2·kv_heads·head_dim
    floats/token", evaluated with the layer's attributes."""
    match = re.search(r"cache ([\w·+() ]+) floats/token", spec.complexity)
    assert match, f"{spec.name}: complexity {spec.complexity!r} states no cache floats/token"
    expr = match.group(1).replace("·", "*")
    names = set(re.findall(r"[A-Za-z_]\w*", expr))
    return eval(expr, {}, {n: getattr(layer, n) for n in names})


@pytest.mark.parametrize("name", DECODE)
def test_cache_floats_per_token_match_the_spec(name):
    layer = build(name)
    b, n = 2, 6
    state = layer.init_state(b)
    assert _floats(state) == 0
    state = layer.step(hidden(layer, b=b, n=n), state)[1]
    per_token = layer.cache_floats_per_token()
    assert _floats(state) == b * n * per_token
    assert per_token == _declared(layer.spec, layer)
    assert layer.state_size(n) == n * per_token


@pytest.mark.parametrize("name", [n for n in HEADS if attnlab.spec(n).backward])
def test_gradcheck_float64(name):
    layer = build(name, torch.float64)
    x = hidden(layer, b=1, n=5, dtype=torch.float64).requires_grad_(True)
    for causal in _modes(layer.spec):
        assert torch.autograd.gradcheck(lambda t, c=causal: layer(t, causal=c), (x,))
    params = [p for p in layer.parameters() if p.requires_grad]
    out = layer(x, causal=layer.spec.causal)
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", HEADS)
def test_bad_input_names_the_argument(name):
    layer = build(name)
    x = hidden(layer)
    dim = layer.config.dim
    cases = [
        ("x", lambda: layer(x[0])),
        ("x", lambda: layer(torch.randn(2, 5, dim + 1))),
        ("x", lambda: layer(x.long())),
        ("x", lambda: layer(x, x, x)),
        ("causal", lambda: layer(x, causal="yes")),
        ("config", lambda: attnlab.get(name, no_such_option=1)),
    ]
    if attnlab.spec(name).cross:
        cases.append(("context", lambda: layer(x, context=torch.randn(3, 5, dim))))
    else:
        cases.append(("context", lambda: layer(x, context=x)))
    if attnlab.spec(name).decode:
        cases.append(("state", lambda: layer.step(x, state=None)))
        cases.append(("x", lambda: layer.step(x[..., :-1], layer.init_state(2))))
    for argument, call in cases:
        with pytest.raises(attnlab.AttnInputError, match=rf"^{argument}\b"):
            call()


def test_the_qkv_contract_leaves_the_heads_family_out():
    from .contract import ALL

    assert set(ALL).isdisjoint(HEADS) and set(ALL) | set(HEADS) == set(attnlab.mechanisms())
