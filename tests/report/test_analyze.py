"""`attnlab analyze` on SmolLM2: the page shows decoded tokens, and the retrieval
analysis hides its needles in the user's text and token count, and says so."""

from __future__ import annotations

import json

import pytest

from tests.models.conftest import smollm2  # noqa: F401

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

TEXT = "PRIDE AND PREJUDICE\nby Jane Austen. " + "The cat sat on the mat, and the dog slept. " * 20


def test_retrieval_uses_the_users_text_and_tokens_and_the_page_shows_decoded_tokens(
    tmp_path,
    monkeypatch,
    smollm2,  # noqa: F811
):
    import attnlab.models
    import attnlab.report.analyze as run
    from attnlab.analysis.retrieval import NeedleRun

    asked = {}

    def fake_trials(model, tokenizer, **kwargs):
        asked.update(kwargs)
        score = {
            "analysis": "retrieval",
            "layer": 3,
            "head": 1,
            "metric": "retrieval_score",
            "value": 0.5,
            "trials": kwargs["trials"],
            "context_tokens": kwargs["context_tokens"],
        }
        accuracy = {
            **score,
            "layer": None,
            "head": None,
            "metric": "needle_accuracy",
            "value": 1.0,
            "answers": ["4242"],
        }
        return NeedleRun(answers=["4242"], correct=[True], rows=[score, accuracy])

    monkeypatch.setattr(attnlab.models, "load", lambda name: smollm2)
    monkeypatch.setattr(run, "needle_trials", fake_trials)
    source = tmp_path / "haystack.txt"
    source.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    meta = run.analyze(
        "smollm2",
        text=source,
        tokens=40,
        analyses=["sinks", "retrieval"],
        out=out,
        progress=False,
        log=lambda _: None,
    )
    assert meta["tokens"] == 40
    assert asked["text"] == TEXT and asked["context_tokens"] == 40  # not the shipped text, not 700
    html = (out / "report.html").read_text(encoding="utf-8")
    assert f"in the first 40 tokens of the file {source}" in html
    # decoded token text, not byte-level BPE pieces
    assert "ĠAND" not in html and "Ċ" not in html
    assert '<span class="tok"> AND</span>' in html and '<span class="tok">↵</span>' in html
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["retrieval_text"] == f"the file {source}"
    assert dict(data["meta"]["environment"])["torch"].startswith("2.")
