"""Swapping attnlab mechanisms into SmolLM2 through transformers' AttentionInterface."""

import pytest
import torch

import attnlab
from attnlab.models import load, use

EXACT = ["softmax", "chunked", "online"]


def _logits(model, **batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", EXACT)
def test_exact_mechanism_matches_model(smollm2, short_text, name):
    model, tok = smollm2
    batch = tok(short_text, return_tensors="pt")
    own = _logits(model, **batch)
    with use(model, name):
        assert model.config._attn_implementation == f"attnlab:{name}"
        swapped = _logits(model, **batch)
    torch.testing.assert_close(swapped, own, rtol=1e-4, atol=2e-4)


def test_padding_batch_equals_unpadded(smollm2, short_text):
    model, tok = smollm2
    texts = [short_text, "It was the best of times."]
    batch = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    with use(model, "chunked", query_chunk=8, key_chunk=8):
        padded = _logits(model, **batch)
        alone = _logits(model, **tok(texts[1], return_tensors="pt"))
    n = alone.shape[1]
    torch.testing.assert_close(padded[1, -n:], alone[0], rtol=1e-4, atol=2e-4)


def test_generate_with_cache_equals_without(smollm2):
    model, tok = smollm2
    batch = tok(
        ["The capital of France is", "One, two, three,"],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    with use(model, "online"), torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        own = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, own)


def test_use_restores_on_exit_and_on_error(smollm2, short_text):
    model, tok = smollm2
    batch = tok(short_text, return_tensors="pt")
    before = model.config._attn_implementation
    ref = _logits(model, **batch)
    with pytest.raises(RuntimeError, match="boom"), use(model, "chunked"):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    with use(model, "online"), use(model, "chunked"):
        assert model.config._attn_implementation == "attnlab:chunked"
    assert model.config._attn_implementation == before
    torch.testing.assert_close(_logits(model, **batch), ref, rtol=0, atol=0)


def test_unknown_mechanism_and_option(smollm2):
    model, _ = smollm2
    with pytest.raises(attnlab.AttnInputError, match="mechanism: unknown name"), use(model, "nope"):
        pass
    with pytest.raises(attnlab.AttnInputError, match="no option"), use(model, "chunked", bad=1):
        pass


def test_attn_implementation_at_load(smollm2, short_text):
    model, tok = smollm2
    batch = tok(short_text, return_tensors="pt")
    swapped, _ = load("smollm2", attn_implementation="attnlab:chunked")
    assert swapped.config._attn_implementation == "attnlab:chunked"
    torch.testing.assert_close(
        _logits(swapped, **batch), _logits(model, **batch), rtol=1e-4, atol=2e-4
    )


def test_encoder_with_padding(minilm):
    model, tok = minilm
    batch = tok(
        ["a short one", "a somewhat longer sentence than that"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        own = model(**batch).last_hidden_state
        with use(model, "chunked"):
            swapped = model(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(swapped[keep], own[keep], rtol=1e-4, atol=1e-4)


def test_cache_needs_cross_form_says_how_to_generate(smollm2):
    model, tok = smollm2
    batch = tok("One, two, three,", return_tensors="pt")
    with use(model, "lightning"), torch.no_grad():
        with pytest.raises(attnlab.AttnInputError, match="use_cache=False"):
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, use_cache=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
