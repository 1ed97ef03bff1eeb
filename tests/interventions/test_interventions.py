"""Interventions on SmolLM2: each changes what it says, composes, and restores on exit."""

from types import SimpleNamespace

import pytest
import torch

import attnlab
from attnlab.analysis import Analysis
from attnlab.interventions import (
    Heads,
    calibrate_sinks,
    identity_attention,
    mask_heads,
    scale_heads,
    zerotune,
)
from attnlab.models import capture, use


class Maps(Analysis):
    name = "maps"

    def begin(self, info):
        super().begin(info)
        self.maps = {}

    def update(self, layer, probs, rows):
        b, h, _, k = probs.shape
        n = self.info.seq_len
        self.maps.setdefault(layer, torch.zeros(b, h, n, n))[:, :, rows, :k] = probs

    def finish(self):
        return []


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def batch(smollm2, short_text):
    return smollm2[1](short_text, return_tensors="pt")


EDITS = {
    "mask": lambda m: mask_heads(m, {3: [0, 5], 10: None}),
    "scale": lambda m: scale_heads(m, [(2, 1), (20, 8)], 2.0),
    "zerotune": lambda m: zerotune(m, 0.5, heads={0: None, 1: [2]}),
    "act": lambda m: calibrate_sinks(m),
    "identity": lambda m: identity_attention(m, {4: [0, 1, 2]}, 0.7),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_changes_inside_and_restores_on_exit(smollm2, batch, name):
    model, _ = smollm2
    ref = _logits(model, batch)
    with EDITS[name](model):
        assert model.config._attn_implementation.startswith("attnlab:")
        inside = _logits(model, batch)
    assert model.config._attn_implementation == "sdpa"
    assert (inside - ref).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="boom"), EDITS[name](model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_mask_heads_equals_zeroing_the_output_projection_input(smollm2, batch):
    model, _ = smollm2
    proj = model.model.layers[3].self_attn.o_proj

    def zero_heads(module, args):
        x = args[0].clone()
        x[..., 0:64] = 0
        x[..., 5 * 64 : 6 * 64] = 0
        return (x,)

    handle = proj.register_forward_pre_hook(zero_heads)
    try:
        expected = _logits(model, batch)
    finally:
        handle.remove()
    with mask_heads(model, {3: [0, 5]}):
        got = _logits(model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)


def test_neutral_settings_change_nothing(smollm2, batch):
    model, _ = smollm2
    ref = _logits(model, batch)
    with zerotune(model, 1.0), calibrate_sinks(model, beta=1.0), identity_attention(model, None, 0):
        got = _logits(model, batch)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-4)


def test_zerotune_scales_first_token_and_keeps_rows_normalised(smollm2, batch):
    model, _ = smollm2
    plain, tuned = Maps(), Maps()
    capture(model, batch, [plain])
    with zerotune(model, 0.25, heads={6: [1]}):
        capture(model, batch, [tuned])
    a0, b0 = plain.maps[6][0, 1, 1:, 0], tuned.maps[6][0, 1, 1:, 0]
    torch.testing.assert_close(b0, 0.25 * a0 / (1 - 0.75 * a0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tuned.maps[6].sum(-1), torch.ones(1, 9, batch["input_ids"].shape[1]))
    torch.testing.assert_close(tuned.maps[6][:, 0], plain.maps[6][:, 0])  # other heads untouched


def test_act_moves_mass_off_hidden_sinks(smollm2, batch):
    model, _ = smollm2
    plain, calib = Maps(), Maps()
    capture(model, batch, [plain])
    with calibrate_sinks(model, {12: None}, alpha=3.0, beta=0.4) as edit:
        capture(model, batch, [calib])
    sinks = edit.found[12][0]  # [H, N]
    assert sinks.any() and not sinks[:, 0].any()  # the first token is kept
    h = int(sinks.any(-1).nonzero()[0])
    cols = sinks[h]
    n = batch["input_ids"].shape[1]
    torch.testing.assert_close(calib.maps[12].sum(-1), torch.ones(1, 9, n))
    last = n - 1
    torch.testing.assert_close(
        calib.maps[12][0, h, last, cols], 0.4 * plain.maps[12][0, h, last, cols]
    )
    assert calib.maps[12][0, h, last, ~cols].sum() > plain.maps[12][0, h, last, ~cols].sum()


def test_identity_output_form_equals_probability_form(smollm2, batch):
    model, _ = smollm2
    heads = {4: [0, 7], 9: None}
    with identity_attention(model, heads, 0.6):
        via_output = _logits(model, batch)  # fused softmax, then the output blend
    plain, blended = Maps(), Maps()
    capture(model, batch, [plain])
    with identity_attention(model, heads, 0.6):
        capture(model, batch, [blended])  # explicit probabilities, blended
    eye = torch.eye(batch["input_ids"].shape[1])
    # layer 4 is the first edited one, so its inputs are the plain ones
    torch.testing.assert_close(blended.maps[4][0, 7], 0.4 * plain.maps[4][0, 7] + 0.6 * eye)
    torch.testing.assert_close(blended.maps[4][0, 1], plain.maps[4][0, 1])
    with use(model, "chunked"), identity_attention(model, heads, 0.6):
        via_chunked = _logits(model, batch)
    torch.testing.assert_close(via_chunked, via_output, rtol=1e-4, atol=2e-4)


def test_edits_compose_with_use_and_capture(smollm2, batch):
    model, _ = smollm2
    with use(model, "online"), mask_heads(model, {3: [0]}):
        swapped = _logits(model, batch)
        capture(model, batch, [Maps()])  # online is exact: capture runs
        assert model.config._attn_implementation == "attnlab:online"
    with mask_heads(model, {3: [0]}):
        own = _logits(model, batch)
    torch.testing.assert_close(swapped, own, rtol=1e-4, atol=2e-4)
    assert model.config._attn_implementation == "sdpa"


def test_probability_edits_refuse_non_exact_mechanism(smollm2, batch):
    model, _ = smollm2
    with (
        use(model, "performer"),
        zerotune(model, 0.5),
        pytest.raises(attnlab.AttnInputError, match="not exact"),
    ):
        _logits(model, batch)


def test_heads_spec():
    assert Heads(None).selector(3, 4).all()
    assert Heads({1: [0, 2]}).selector(1, 4).tolist() == [True, False, True, False]
    assert Heads({1: [0]}).selector(2, 4) is None
    assert Heads([(0, 1), (0, 3)]).selector(0, 4).tolist() == [False, True, False, True]
    with pytest.raises(attnlab.AttnInputError, match="heads:"):
        Heads({0: [9]}).selector(0, 4)
    with pytest.raises(attnlab.AttnInputError, match="heads:"):
        Heads([(1,)])
    with pytest.raises(attnlab.AttnInputError, match="gamma:"):
        zerotune(None, -1.0).__enter__()


def test_act_sinks_are_keys_whose_observers_average_above_the_threshold(smollm2, batch):
    # the authors' criterion: sum_t A_tj / |{t >= j}| > 0.1, the initial token kept
    model, _ = smollm2
    plain = Maps()
    capture(model, batch, [plain])
    with calibrate_sinks(model, {12: None}) as edit:
        capture(model, batch, [Maps()])
    n = batch["input_ids"].shape[1]
    maps = plain.maps[12][0]  # [H, N, N]
    received = maps.sum(1) / torch.arange(n, 0, -1)
    expected = received > 0.1
    expected[:, 0] = False
    assert expected.any() and torch.equal(edit.found[12][0], expected)


def _config_only(layers=4, heads=3):
    """A stand-in model: edits check their indices against its config before anything runs."""
    return SimpleNamespace(
        config=SimpleNamespace(num_hidden_layers=layers, num_attention_heads=heads)
    )


@pytest.mark.parametrize(
    "heads, message",
    [
        ({99: [0]}, r"heads: the model has layers 0\.\.3, got layer \[99\]"),
        ({-1: None}, r"layers 0\.\.3, got layer \[-1\]"),
        ([(0, 3)], r"heads: layer 0 has heads 0\.\.2, got \[3\]"),
        ({2: [0, -2]}, r"layer 2 has heads 0\.\.2, got \[-2\]"),
    ],
)
def test_head_indices_the_model_lacks_are_refused(heads, message):
    model = _config_only()
    for edit in (
        lambda: mask_heads(model, heads),
        lambda: scale_heads(model, heads, 0.5),
        lambda: zerotune(model, 0.5, heads),
        lambda: calibrate_sinks(model, heads),
    ):
        with pytest.raises(attnlab.AttnInputError, match=message), edit():
            pass


def test_mask_heads_out_of_range_on_the_real_model(smollm2):
    model, _ = smollm2
    with (
        pytest.raises(attnlab.AttnInputError, match=r"layers 0\.\.29"),
        mask_heads(model, {99: [0]}),
    ):
        pass
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), True, "2"])
def test_factors_must_be_finite_numbers(bad):
    model = _config_only()
    with pytest.raises(attnlab.AttnInputError, match="factor: expected a finite number"):
        scale_heads(model, {0: [0]}, bad).__enter__()
    with pytest.raises(attnlab.AttnInputError, match="gamma: expected a finite number"):
        zerotune(model, bad).__enter__()
