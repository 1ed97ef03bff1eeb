"""The reducers fed by the real capture hook equal the same reducers on the full maps."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_capture_in_blocks_equals_analysing_the_full_maps(smollm2):
    import torch

    from attnlab.analysis import (
        AttentionDistance,
        Entropy,
        FutureInfluence,
        Sinks,
        TokenPatterns,
        analyze_maps,
    )
    from attnlab.analysis.maps import HeadMaps
    from attnlab.models import capture

    model, tok = smollm2
    ids = tok("The cat sat on the mat. The cat sat on the mat. " * 3, return_tensors="pt")[
        "input_ids"
    ][:, :40]
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads

    def analyses():
        return [Sinks(), Entropy(), AttentionDistance(), FutureInfluence(), TokenPatterns()]

    maps = HeadMaps([(layer, h) for layer in range(n_layers) for h in range(n_heads)])
    streamed = capture(model, ids, [*analyses(), maps], block=7, tokenizer=tok)
    full = [
        torch.stack([maps.maps[(layer, h)] for h in range(n_heads)])[None]
        for layer in range(n_layers)
    ]
    offline = analyze_maps(
        full,
        analyses(),
        input_ids=ids,
        tokens=streamed.info.tokens,
        hidden_states=streamed.info.hidden_states,
    )
    assert len(streamed.rows) == len(offline)
    for a, b in zip(streamed.rows, offline, strict=True):
        assert a.keys() == b.keys()
        for key, va in a.items():
            if isinstance(va, float):
                assert b[key] == pytest.approx(va, rel=1e-4, abs=1e-6), (a, b)
            else:
                assert b[key] == va, (a, b)
