"""Retrieval heads: the copy-paste retrieval score on needle-in-a-haystack inputs."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnlab.core.errors import AttnInputError
from attnlab.models import capture

from .base import Analysis, CaptureInfo, register_analysis
from .needle import Needle, make_needle


@register_analysis
class RetrievalScore(Analysis):
    """The retrieval score of each head (Wu et al. 2024, "Retrieval Head
    Mechanistically Explains Long-Context Factuality", arXiv:2404.15574).

    While the model generates its answer to a needle-in-a-haystack question, a
    head performs a copy-paste at a decoding step when the token ``w`` being
    generated is a needle token and the key the head attends most at that step
    is a needle position holding that same token ``w``. With ``g_h`` the set of
    needle positions head ``h`` copied from and ``k`` the needle,
    ``retrieval_score_h = |g_h| / |k|``; the paper calls heads scoring above 0.1
    (averaged over many needles) retrieval heads.

    Here the needle ``k`` is the code's digit tokens (``needle_positions``), and
    decoding is replayed in one teacher-forced pass over prompt + the model's own
    greedy answer: query row ``t`` (from ``answer_start - 1`` on) is exactly the
    decoding step that produced token ``t + 1``, so its attention is that step's
    attention. Rows: ``retrieval_score`` per (layer, head), for the first sequence.
    """

    name = "retrieval"
    own_run = True

    def __init__(self, needle_positions: Sequence[int], answer_start: int):
        self.needle_positions = sorted(int(p) for p in needle_positions)
        self.answer_start = int(answer_start)

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        self.copied = [[set() for _ in range(info.n_heads)] for _ in range(info.n_layers)]

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        ids = self.info.input_ids[0]
        n = ids.shape[0]
        needle = torch.tensor(self.needle_positions, dtype=torch.long)
        needle_ids = set(ids[needle].tolist())
        start = 0 if rows.start is None else rows.start
        for r in range(probs.shape[-2]):
            t = start + r
            if t < self.answer_start - 1 or t + 1 >= n:
                continue
            w = int(ids[t + 1])
            if w not in needle_ids:
                continue
            top = probs[0, :, r].argmax(-1).tolist()  # [H]
            for head, j in enumerate(top):
                if j in self.needle_positions and int(ids[j]) == w:
                    self.copied[layer][head].add(j)

    def finish(self) -> list[dict[str, Any]]:
        k = max(1, len(self.needle_positions))
        return [
            {
                "analysis": self.name,
                "layer": layer,
                "head": head,
                "metric": "retrieval_score",
                "value": len(self.copied[layer][head]) / k,
            }
            for layer in range(len(self.copied))
            for head in range(len(self.copied[layer]))
        ]


def generate_answer(model, tokenizer, needle: Needle, max_new_tokens: int = 10) -> torch.Tensor:
    """Greedy answer token ids [1, M] of ``model`` to ``needle``'s prompt."""
    ids = needle.input_ids.to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return out[:, ids.shape[1] :].cpu()


def needle_depths(trials: int) -> list[float]:
    """``trials`` depths spread evenly over (0, 1)."""
    return [(i + 0.5) / trials for i in range(trials)]


@dataclass
class NeedleRun:
    """The outcome of needle trials: per-trial answers and, if measured, head scores."""

    answers: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(1, len(self.correct))


def needle_trials(
    model,
    tokenizer,
    *,
    trials: int = 4,
    context_tokens: int = 700,
    text: str | None = None,
    seed: int = 0,
    max_new_tokens: int = 10,
    score: bool = False,
    progress: bool = False,
) -> NeedleRun:
    """Ask ``model`` for the code in ``trials`` needles (depths spread over the text).

    Each haystack is the first ``context_tokens`` tokens of ``text`` (default: the
    text that ships with attnlab), exactly as asked: :func:`make_needle` raises
    AttnInputError when ``context_tokens`` is below
    :data:`~attnlab.analysis.needle.MIN_CONTEXT_TOKENS` or the text holds fewer
    tokens. With ``score=True`` also replays each answer through
    :func:`attnlab.models.capture` with :class:`RetrievalScore`, and ``rows`` holds
    each head's retrieval score averaged over the trials (``retrieval_score``) plus
    the accuracy (``needle_accuracy``, ``layer=None``). Run it inside an
    intervention (``mask_heads``) to measure the model with heads removed.
    """
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise AttnInputError(f"trials: expected an int >= 1, got {trials!r}")
    run = NeedleRun()
    sums: dict[tuple[int, int], float] = {}
    depths = needle_depths(trials)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=trials, desc="needle trials", unit="needle")
    for i, depth in enumerate(depths):
        needle = make_needle(
            tokenizer, context_tokens=context_tokens, depth=depth, seed=seed + i, text=text
        )
        answer = generate_answer(model, tokenizer, needle, max_new_tokens)
        text_out = tokenizer.decode(answer[0], skip_special_tokens=True)
        run.answers.append(text_out)
        run.correct.append(needle.answered(text_out))
        if score:
            full = torch.cat([needle.input_ids, answer], dim=1)
            rs = RetrievalScore(needle.positions, needle.input_ids.shape[1])
            for row in capture(model, full, [rs], progress=False).rows:
                key = (row["layer"], row["head"])
                sums[key] = sums.get(key, 0.0) + row["value"] / trials
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    run.rows = [
        {
            "analysis": "retrieval",
            "layer": layer,
            "head": head,
            "metric": "retrieval_score",
            "value": value,
            "trials": trials,
            "context_tokens": context_tokens,
        }
        for (layer, head), value in sorted(sums.items())
    ]
    run.rows.append(
        {
            "analysis": "retrieval",
            "layer": None,
            "head": None,
            "metric": "needle_accuracy",
            "value": run.accuracy,
            "trials": trials,
            "context_tokens": context_tokens,
            "answers": list(run.answers),
        }
    )
    return run


def retrieval_heads(rows: list[dict[str, Any]], threshold: float = 0.1) -> list[tuple[int, int]]:
    """(layer, head) pairs whose ``retrieval_score`` exceeds ``threshold`` (the paper's 0.1),
    highest score first."""
    scored = [r for r in rows if r["metric"] == "retrieval_score" and r["value"] > threshold]
    scored.sort(key=lambda r: -r["value"])
    return [(r["layer"], r["head"]) for r in scored]


def random_heads(
    n: int, n_layers: int, n_heads: int, exclude: Sequence[tuple[int, int]] = (), seed: int = 0
) -> list[tuple[int, int]]:
    """``n`` (layer, head) pairs drawn at random from the heads not in ``exclude``."""
    pool = [
        (layer, h)
        for layer in range(n_layers)
        for h in range(n_heads)
        if (layer, h) not in set(exclude)
    ]
    return random.Random(seed).sample(pool, n)
