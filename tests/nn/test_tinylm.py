"""attnlab.nn.TinyLM: shapes, causality, decoding, generate, safetensors, training."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.core.registry import mechanism_class
from attnlab.nn import TinyLM


def tiny(name: str) -> dict:
    return dict(mechanism_class(name).tiny_config)


HYBRID = {
    "mechanism": ["window", [("softmax", 2), ("linear", 2)]],
    "mechanism_config": {"window": tiny("window"), "linear": tiny("linear")},
}


def test_shapes_and_tied_head():
    model = TinyLM(50, 32, 2, 4)
    ids = torch.randint(0, 50, (3, 11))
    assert model(ids).shape == (3, 11, 50)
    assert not any(n.startswith("head") for n, _ in model.named_parameters())
    vectors = TinyLM(None, 32, 1, 4, input_dim=5, output_dim=1)
    assert vectors(torch.randn(2, 7, 5)).shape == (2, 7, 1)


@pytest.mark.parametrize("kwargs", [{}, HYBRID, {"conv": 3}, {"positional": "learned"}], ids=str)
def test_logits_ignore_later_tokens(kwargs):
    model = TinyLM(40, 32, 2, 4, **kwargs).eval()
    ids = torch.randint(0, 40, (2, 16))
    other = ids.clone()
    other[:, 9:] = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(model(ids)[:, :9], model(other)[:, :9])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mechanism": "softmax"},
        {"mechanism": "linear", "mechanism_config": {"linear": tiny("linear")}},
        {"mechanism": "window", "mechanism_config": {"window": tiny("window")}},
        HYBRID,
        {"mechanism": "softmax", "conv": 3, "positional": "learned", "kv_heads": 1},
    ],
    ids=str,
)
def test_decode_equals_the_full_pass(kwargs):
    model = TinyLM(40, 32, 2, 4, **kwargs).eval()
    ids = torch.randint(0, 40, (2, 19))
    full = model(ids)
    cache = model.init_cache(2)
    prefix, cache = model.step(ids[:, :5], cache)
    rows = [prefix]
    for i in range(5, 19):
        logits, cache = model.step(ids[:, i : i + 1], cache)
        rows.append(logits)
    torch.testing.assert_close(torch.cat(rows, 1), full, atol=5e-5, rtol=1e-4)


def test_generate_greedy_equals_argmax_of_full_passes():
    model = TinyLM(30, 32, 2, 4, **HYBRID).eval()
    prompt = torch.randint(0, 30, (2, 6))
    out = model.generate(prompt, max_new_tokens=8, greedy=True)
    assert out.shape == (2, 14)
    assert torch.equal(out[:, :6], prompt)
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    sampled = model.generate(prompt, 5, greedy=False, generator=torch.Generator().manual_seed(3))
    again = model.generate(prompt, 5, greedy=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, again)


@pytest.mark.parametrize("kwargs", [{}, HYBRID, {"conv": 2, "mlp": "gelu", "kv_heads": 2}], ids=str)
def test_save_load_round_trip(tmp_path, kwargs):
    model = TinyLM(40, 32, 2, 4, **kwargs).eval()
    path = tmp_path / "tiny.safetensors"
    model.save(path)
    loaded = TinyLM.load(path).eval()
    ids = torch.randint(0, 40, (2, 12))
    assert torch.equal(model(ids), loaded(ids))
    assert json.dumps(loaded.config) == json.dumps(model.config)
    # the file is plain safetensors with the config in its metadata, no pickle
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["dim"] == 32
    assert path.read_bytes()[:2] != b"\x80\x02"


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(attnlab.AttnInputError, match="path"):
        TinyLM.load(path)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"mechanism": ["softmax"]}, "mechanism"),  # 1 entry for 2 layers
        ({"mlp": "relu"}, "mlp"),
        ({"positional": "alibi"}, "positional"),
        ({"conv": -1}, "conv"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, argument):
    with pytest.raises(attnlab.AttnInputError, match=argument):
        TinyLM(40, 32, 2, 4, **kwargs)


TRAINABLE = [
    name
    for name in attnlab.mechanisms(causal=True, backward=True)
    if attnlab.spec(name).family != "heads"
]
SEQ = 24  # a multiple of the tiny configs' blocks and of neighborhood's grid width 3


@pytest.mark.parametrize("name", TRAINABLE)
def test_two_layer_model_learns_with_every_trainable_mechanism(name):
    """A 2-layer TinyLM fits one batch of repeated random 4-token blocks: 15 AdamW steps
    halve the loss, and the attention projections receive gradients through the mechanism."""
    torch.manual_seed(0)
    model = TinyLM(16, 32, 2, 4, mechanism=name, mechanism_config={name: tiny(name)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    ids = torch.randint(0, 16, (8, 4), generator=generator).repeat(1, SEQ // 4 + 1)
    losses = []
    for _ in range(15):
        logits = model(ids[:, :SEQ])
        loss = F.cross_entropy(logits.reshape(-1, 16), ids[:, 1 : SEQ + 1].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        grad = model.blocks[0].attn.q_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert time.perf_counter() - start < 20
