"""sqa: fewer query heads of the full head width; equal to GQA with those head counts."""

from __future__ import annotations

import pytest
import torch

import attnlab


def test_sqa_is_gqa_with_fewer_query_heads_of_the_full_width():
    sqa = attnlab.get("sqa", dim=32, heads=8, query_heads=4, kv_heads=2).double()
    assert (sqa.query_heads, sqa.kv_heads, sqa.head_dim) == (4, 2, 4)
    assert sqa.q_proj.out_features == 16 and sqa.o_proj.in_features == 16
    gqa = attnlab.get("gqa", dim=32, heads=4, kv_heads=2, head_dim=4).double()
    gqa.load_state_dict(sqa.state_dict())
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert torch.allclose(sqa(x, causal=True), gqa(x, causal=True), atol=1e-12)


@pytest.mark.parametrize(
    ("option", "config"),
    [("query_heads", {"query_heads": 9}), ("kv_heads", {"kv_heads": 3}), ("heads", {"heads": 5})],
)
def test_bad_head_counts_name_the_option(option, config):
    with pytest.raises(attnlab.AttnInputError, match=rf"^{option}\b"):
        attnlab.get("sqa", **{"dim": 32, "heads": 8, "query_heads": 4, "kv_heads": 2, **config})
