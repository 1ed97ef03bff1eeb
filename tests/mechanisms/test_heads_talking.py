"""talking-heads: identity mixing is multi-head attention; the logit mixing acts before
the softmax and the weight mixing after it."""

from __future__ import annotations

import torch

import attnlab


def _layers():
    talking = attnlab.get("talking-heads", dim=16, heads=4).double()
    mha = attnlab.get("gqa", dim=16, heads=4, kv_heads=4).double()
    mha.load_state_dict(talking.state_dict(), strict=False)
    return talking, mha


def test_identity_mixing_is_multi_head_attention():
    talking, mha = _layers()
    assert torch.equal(talking.logit_mix, torch.eye(4, dtype=torch.float64))
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    for causal in (False, True):
        assert torch.allclose(talking(x, causal=causal), mha(x, causal=causal), atol=1e-12)


def test_mixing_before_the_softmax_differs_from_mixing_after_it():
    talking, _ = _layers()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mix = torch.randn(4, 4, dtype=torch.float64)
    with torch.no_grad():
        talking.logit_mix.copy_(mix)
    before = talking(x, causal=True)
    with torch.no_grad():
        talking.logit_mix.copy_(torch.eye(4))
        talking.weight_mix.copy_(mix)
    assert not torch.allclose(before, talking(x, causal=True), atol=1e-6)


def test_a_query_with_no_key_to_see_gets_zeros_not_nan():
    layer = attnlab.get("talking-heads", dim=16, heads=4).double()
    x, context = torch.randn(1, 7, 16), torch.randn(1, 3, 16)
    out = layer(x.double(), context=context.double(), causal=True)  # queries 0..3 see nothing
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, :4], torch.zeros_like(out[:, :4]))
