"""moh: the per-token gates (shared heads always on, top-k of the routed heads), the
reduction to multi-head attention under a uniform router, and the balance loss."""

from __future__ import annotations

import pytest
import torch

import attnlab


def _uniform_router(layer):
    with torch.no_grad():
        for linear in (layer.route, layer.share, layer.balance):
            if linear is not None:
                linear.weight.zero_()


def test_gates_keep_the_shared_heads_and_the_top_k_routed_heads():
    layer = attnlab.get("moh", dim=16, heads=6, head_dim=4, shared_heads=2, active=2)
    x = torch.randn(2, 9, 16)
    gates = layer.gates(x)
    assert gates.shape == (2, 9, 6)
    assert (gates[..., :2] > 0).all()
    chosen = torch.zeros(2, 9, 4).scatter(-1, layer.route(x).topk(2, dim=-1).indices, 1.0)
    assert torch.equal(gates[..., 2:] > 0, chosen.bool())


@pytest.mark.parametrize("shared", [0, 1, 2])
def test_a_uniform_router_choosing_every_head_is_multi_head_attention(shared):
    layer = attnlab.get("moh", dim=16, heads=4, shared_heads=shared, active=4 - shared)
    layer = layer.double()
    _uniform_router(layer)
    mha = attnlab.get("gqa", dim=16, heads=4, kv_heads=4).double()
    mha.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    assert torch.allclose(layer.gates(x), torch.ones(2, 7, 4, dtype=torch.float64))
    assert torch.allclose(layer(x, causal=True), mha(x, causal=True), atol=1e-12)


def test_an_unchosen_head_does_not_reach_the_output():
    layer = attnlab.get("moh", dim=16, heads=4, shared_heads=0, active=1).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    with torch.no_grad():  # feature 0 set high and routed to head 0: every token picks it
        layer.route.weight.zero_()
        layer.route.weight[0, 0] = 1.0
        x[..., 0] = 5.0
    before = layer(x)
    with torch.no_grad():
        layer.v_proj.weight.view(4, 4, 16)[1:] += 1.0
    assert torch.allclose(layer(x), before, atol=1e-12)
    with torch.no_grad():
        layer.v_proj.weight.view(4, 4, 16)[0] += 1.0
    assert not torch.allclose(layer(x), before)


def test_balance_loss_is_active_when_the_load_is_even_and_larger_when_skewed():
    layer = attnlab.get("moh", dim=16, heads=5, head_dim=4, shared_heads=1, active=2).double()
    with torch.no_grad():
        layer.route.weight.copy_(torch.eye(4, 16, dtype=torch.float64) * 50)
    even = torch.zeros(4, 1, 16, dtype=torch.float64)
    for head in range(4):  # token h chooses heads h and h + 1 (mod 4): every head twice
        even[head, 0, head] = 1.0
        even[head, 0, (head + 1) % 4] = 0.5
    assert layer.balance_loss(even).item() == pytest.approx(2.0, abs=1e-9)
    skewed = even[:1].expand(4, 1, 16)  # every token chooses heads 0 and 1
    assert layer.balance_loss(skewed).item() == pytest.approx(4.0, abs=1e-6)


@pytest.mark.parametrize(("option", "value"), [("shared_heads", 5), ("active", 0), ("active", 5)])
def test_bad_head_counts_name_the_option(option, value):
    with pytest.raises(attnlab.AttnInputError, match=rf"^{option}\b"):
        attnlab.get("moh", dim=16, heads=5, head_dim=4, **{option: value})
