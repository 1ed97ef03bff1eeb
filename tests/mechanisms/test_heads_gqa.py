"""mqa / gqa: the layers against a plain multi-head computation, and the mean-pooling of
key/value heads (GQA's uptraining initialisation), on a layer, a tiny Llama and SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms.heads.gqa import mean_pool_heads, pool_kv_heads


def _plain(layer, x, causal):
    """Multi-head attention written out: every query head reads its group's key/value head."""
    b, n, _ = x.shape
    hd, groups = layer.head_dim, layer.heads // layer.kv_heads
    q = layer.q_proj(x).view(b, n, layer.heads, hd).transpose(1, 2)
    k = layer.k_proj(x).view(b, n, layer.kv_heads, hd).transpose(1, 2)
    v = layer.v_proj(x).view(b, n, layer.kv_heads, hd).transpose(1, 2)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return layer.o_proj(o)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_multi_head_attention_with_shared_key_value_heads(kv_heads, causal):
    layer = attnlab.get("gqa", dim=16, heads=4, kv_heads=kv_heads).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    assert torch.allclose(layer(x, causal=causal), _plain(layer, x, causal), atol=1e-12)


def test_mqa_is_gqa_with_one_key_value_head():
    mqa = attnlab.get("mqa", dim=16, heads=4)
    gqa = attnlab.get("gqa", dim=16, heads=4, kv_heads=1)
    gqa.load_state_dict(mqa.state_dict())
    x = torch.randn(2, 9, 16)
    assert mqa.k_proj.out_features == mqa.head_dim == 4
    assert torch.allclose(mqa(x, causal=True), gqa(x, causal=True), atol=1e-6)


def test_mean_pool_heads_averages_consecutive_heads():
    weight = torch.arange(6 * 2 * 3, dtype=torch.float64).reshape(6 * 2, 3)  # 6 heads of 2 rows
    pooled = mean_pool_heads(weight, heads=6, new_heads=2)
    heads = weight.view(6, 2, 3)
    assert torch.equal(pooled.view(2, 2, 3), torch.stack([heads[:3].mean(0), heads[3:].mean(0)]))
    with pytest.raises(attnlab.AttnInputError, match=r"^new_heads"):
        mean_pool_heads(weight, heads=6, new_heads=4)


def test_pooled_layer_equals_the_original_when_heads_of_a_group_agree():
    layer = attnlab.get("gqa", dim=16, heads=4, kv_heads=4, rotary=True).double()
    with torch.no_grad():  # heads (0, 1) and (2, 3) of k and v made equal
        for proj in (layer.k_proj, layer.v_proj):
            w = proj.weight.view(4, 4, 16)
            w[1], w[3] = w[0], w[2]
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    pooled = layer.pooled(2)
    assert pooled.kv_heads == 2 and pooled.cache_floats_per_token() == 16
    assert torch.allclose(pooled(x, causal=True), layer(x, causal=True), atol=1e-12)
    assert not torch.allclose(layer.pooled(1)(x, causal=True), layer(x, causal=True))
    with pytest.raises(attnlab.AttnInputError, match=r"^kv_heads"):
        layer.pooled(3)


def _tiny_llama(kv_heads=4):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_pool_kv_heads_converts_a_llama_in_place():
    model = _tiny_llama()
    with torch.no_grad():  # make the heads of each pair equal: pooling to 2 changes nothing
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.view(4, 4, 32)
                w[1], w[3] = w[0], w[2]
    ids = torch.randint(0, 50, (1, 12))
    before = model(ids).logits
    assert pool_kv_heads(model, kv_heads=2) == 2
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == 2 * attn.head_dim
    assert attn.num_key_value_groups == 4 and model.config.num_key_value_heads == 2
    assert torch.allclose(model(ids).logits, before, atol=1e-5)
    pool_kv_heads(model, kv_heads=1)
    assert not torch.allclose(model(ids).logits, before, atol=1e-3)


def test_pool_kv_heads_rejects_what_it_cannot_convert():
    with pytest.raises(attnlab.AttnInputError, match=r"^kv_heads"):
        pool_kv_heads(_tiny_llama(), kv_heads=3)
    with pytest.raises(attnlab.AttnInputError, match=r"^model"):
        pool_kv_heads(torch.nn.Linear(2, 2), kv_heads=1)


@pytest.mark.slow
def test_smollm2_pooled_to_one_key_value_head_keeps_a_finite_but_higher_perplexity():
    """SmolLM2's 3 key/value heads mean-pooled to 1 in all 30 layers, without uptraining:
    the perplexity on the shipped text rises (GQA's paper uptrains to recover it)."""
    from attnlab.models import load
    from attnlab.models.perplexity import perplexity
    from attnlab.models.text import text_ids

    model, tokenizer = load("smollm2")
    ids, _ = text_ids(tokenizer, 512)
    before = perplexity(model, ids)
    assert pool_kv_heads(model, kv_heads=1) == 30
    after = perplexity(model, ids)
    assert model.model.layers[0].self_attn.k_proj.out_features == 64
    assert math.isfinite(after) and after > before
