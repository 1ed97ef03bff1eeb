"""Streaming capture: block-wise probabilities equal the model's own attention maps."""

import pytest
import torch

import attnlab
from attnlab.analysis import Analysis
from attnlab.models import capture, load_qk, use


class Maps(Analysis):
    """Test probe: reassembles every layer's full map from the blocks (short inputs only)."""

    name = "maps"

    def begin(self, info):
        super().begin(info)
        self.maps = {}
        self.calls = 0

    def update(self, layer, probs, rows):
        self.calls += 1
        b, h, _, k = probs.shape
        n = self.info.seq_len
        self.maps.setdefault(layer, torch.zeros(b, h, n, n))[:, :, rows, :k] = probs

    def finish(self):
        return [
            {
                "analysis": self.name,
                "layer": layer,
                "head": h,
                "metric": "first",
                "value": float(m[0, h, :, 0].mean()),
            }
            for layer, m in sorted(self.maps.items())
            for h in range(m.shape[1])
        ]


class Hidden(Analysis):
    name = "hidden"
    needs_hidden_states = True

    def update(self, layer, probs, rows):
        return None

    def finish(self):
        return [
            {
                "analysis": self.name,
                "layer": 0,
                "head": 0,
                "metric": "n",
                "value": len(self.info.hidden_states),
            }
        ]


def _eager_maps(model, batch):
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return out


def test_blocks_reassemble_eager_maps(smollm2, short_text):
    model, tok = smollm2
    batch = tok(short_text, return_tensors="pt")
    n = batch["input_ids"].shape[1]
    probe = Maps()
    res = capture(model, batch, [probe], block=7, tokenizer=tok)
    eager = _eager_maps(model, batch)
    assert probe.calls == 30 * -(-n // 7)
    for layer in (0, 14, 29):
        torch.testing.assert_close(probe.maps[layer], eager.attentions[layer], rtol=1e-4, atol=1e-5)
    assert res.info.tokens[:3] == tok.convert_ids_to_tokens(batch["input_ids"][0, :3].tolist())
    assert res.info.causal and res.info.n_kv_heads == 3 and res.info.hidden_states is None
    assert len(res.rows) == 30 * 9 and res.rows.where(layer=3, head=2)[0]["metric"] == "first"
    grid = res.rows.grid("first")
    assert len(grid) == 30 and len(grid[0]) == 9
    assert "layer" in res.rows.format(limit=3)
    # the model is left as it was
    assert model.config._attn_implementation == "sdpa"


def test_rows_sum_to_one_with_padding(smollm2, short_text):
    model, tok = smollm2
    batch = tok(
        [short_text, "It was the best of times."],
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    probe = Maps()
    capture(model, batch, [probe], block=16)
    sums = probe.maps[5].sum(-1)
    real = batch["attention_mask"].bool()
    assert torch.allclose(sums[0], torch.ones_like(sums[0]), atol=1e-5)
    assert torch.allclose(sums[1][:, real[1]], torch.ones_like(sums[1][:, real[1]]), atol=1e-5)
    pad_keys = ~real[1]
    assert probe.maps[5][1][..., pad_keys].abs().max() == 0


def test_hidden_states_only_when_asked(smollm2):
    model, tok = smollm2
    res = capture(model, tok("One two three", return_tensors="pt"), [Hidden()])
    assert res.rows[0]["value"] == 31 and res.info.hidden_states[0].shape[-1] == 576


def test_keep_qk_round_trip(smollm2, short_text, tmp_path):
    model, tok = smollm2
    batch = tok(short_text, return_tensors="pt")
    probe = Maps()
    res = capture(model, batch, [probe], keep_qk={0: [0, 4], 7: None})
    path = res.save_qk(tmp_path / "qk.safetensors", model="smollm2")
    kept = load_qk(path)
    q, k, v = kept[0]
    n = batch["input_ids"].shape[1]
    assert q.shape == k.shape == v.shape == (1, 2, n, 64) and kept[7][0].shape[1] == 9
    # head 4 reads kv head 1: its map is softmax(q kᵀ / 8) under the causal mask
    scores = (q[:, 1] @ k[:, 1].transpose(-1, -2)) / 8.0
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(scores.softmax(-1), probe.maps[0][:, 4], rtol=1e-4, atol=1e-5)


def test_capture_refuses_non_exact_mechanism(smollm2):
    model, tok = smollm2
    with use(model, "performer"), pytest.raises(attnlab.AttnInputError, match="not exact"):
        capture(model, tok("One two three", return_tensors="pt"), [Maps()])
    assert model.config._attn_implementation == "sdpa"


def test_capture_encoder(minilm):
    model, tok = minilm
    batch = tok("attention flows both ways in an encoder", return_tensors="pt")
    probe = Maps()
    res = capture(model, batch, [probe])
    assert not res.info.causal
    eager = _eager_maps(model, batch)
    torch.testing.assert_close(probe.maps[2], eager.attentions[2], rtol=1e-4, atol=1e-5)


def test_bad_inputs(smollm2):
    model, _ = smollm2
    with pytest.raises(attnlab.AttnInputError, match="inputs:"):
        capture(model, "text", [Maps()])
    with pytest.raises(attnlab.AttnInputError, match="block:"):
        capture(model, torch.tensor([[1, 2]]), [Maps()], block=0)
    with pytest.raises(attnlab.AttnInputError, match="keep_qk:"):
        capture(model, torch.tensor([[1, 2]]), [Maps()], keep_qk=[40])
