"""mla: decoding with the up-projections absorbed equals the naive full pass, and the
latent cache is smaller than multi-head attention's."""

from __future__ import annotations

import pytest
import torch

import attnlab

TINY = attnlab.core.mechanism_class("mla").tiny_config


@pytest.mark.parametrize("q_rank", [None, 8])
def test_absorbed_decode_after_a_prefill_equals_the_naive_full_pass(q_rank):
    layer = attnlab.get("mla", **{**TINY, "q_rank": q_rank}).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    full = layer(x, causal=True)
    prefill, state = layer.step(x[:, :6], layer.init_state(2, dtype=torch.float64))
    outs = [prefill]
    for i in range(6, 11):
        out, state = layer.step(x[:, i : i + 1], state)
        outs.append(out)
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-12)
    assert set(state) == {"latent", "rope_key"}
    assert state["latent"].shape == (2, 11, TINY["kv_rank"])


def test_the_rotary_part_makes_scores_depend_on_relative_position():
    layer = attnlab.get("mla", **TINY).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    first = layer(x, causal=True)
    with torch.no_grad():
        layer.rope_key.weight.zero_()
    assert not torch.allclose(first, layer(x, causal=True))


def test_the_latent_cache_is_smaller_than_multi_head_attention():
    layer = attnlab.get("mla", dim=512, heads=8, kv_rank=128, nope_dim=64, rope_dim=32, v_dim=64)
    assert layer.cache_floats_per_token() == 128 + 32
    assert layer.mha_cache_floats_per_token() == 8 * (64 + 32 + 64)
    assert layer.state_size(100) == 100 * 160


@pytest.mark.parametrize("option", ["kv_rank", "rope_dim", "heads"])
def test_bad_widths_name_the_option(option):
    bad = {"rope_dim": 3}.get(option, 0)
    with pytest.raises(attnlab.AttnInputError, match=rf"^{option}\b"):
        attnlab.get("mla", **{**TINY, option: bad})
