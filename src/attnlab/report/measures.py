"""The per-head measures the report draws as layer x head heatmaps, and how to read each."""

from __future__ import annotations

from typing import NamedTuple


class Metric(NamedTuple):
    """How one per-head metric is drawn: its title, the colorbar's unit and how to read it."""

    analysis: str
    metric: str
    title: str
    unit: str
    reading: str


_CELL = "One cell per head (column) and layer (row). "
HEATMAPS = (
    Metric(
        "sinks",
        "first_token_attention",
        "Attention on the first token (α₀)",
        "mean weight on token 0",
        _CELL + "Colour: the mean weight a head's queries put on token 0 (first 4 queries "
        "left out). Near 1: the head parks its attention on the first token, a sink "
        "(Gu et al., arXiv:2410.10781).",
    ),
    Metric(
        "entropy",
        "normalized_entropy",
        "Normalised attention entropy",
        "entropy / log(keys seen)",
        _CELL + "0: each query looks at a single key; 1: spread evenly over every key it "
        "may see (Clark et al., arXiv:1906.04341).",
    ),
    Metric(
        "distance",
        "mean_distance",
        "Mean attention distance",
        "tokens back",
        _CELL + "How far back a head looks, attention-weighted, in tokens. Dark: local "
        "heads; bright: global heads (Li et al., arXiv:2510.13554, Eq. 7).",
    ),
    Metric(
        "distance",
        "waad",
        "Windowed attention distance (W = 10)",
        "tokens back (≤ 10)",
        _CELL + "As the mean distance, with every distance clipped at 10 tokens, so a "
        "sink far back counts as 10: tells local heads apart (Li et al., Def. 4.1).",
    ),
    Metric(
        "fai",
        "fai_peak",
        "Peak future attention influence",
        "weight from later tokens",
        _CELL + "The most any one token (not the first) is attended by the 10 to 100 "
        "tokens after it. Bright: the head keeps returning to an anchor token "
        "(Li et al., Def. 4.2).",
    ),
    Metric(
        "patterns",
        "previous_token",
        "Previous-token score",
        "weight on token i−1",
        _CELL + "On a random token sequence repeated once: the weight query i puts on "
        "token i−1. Bright: a previous-token head (Olsson et al. 2022).",
    ),
    Metric(
        "patterns",
        "duplicate_token",
        "Duplicate-token score",
        "weight on copies",
        _CELL + "On the repeated sequence: the weight on earlier occurrences of the "
        "current token. Bright: a duplicate-token head (Wang et al., arXiv:2211.00593).",
    ),
    Metric(
        "patterns",
        "induction",
        "Induction score",
        "weight after a copy",
        _CELL + "On the repeated sequence: the weight on the token that followed the "
        "earlier occurrence of the current token. Bright: an induction head "
        "(Olsson et al. 2022).",
    ),
    Metric(
        "retrieval",
        "retrieval_score",
        "Retrieval score",
        "share copied",
        _CELL + "The share of the generated answer's tokens a head copies from the needle "
        "while attending to it most; above 0.1: a retrieval head (Wu et al., "
        "arXiv:2404.15574).",
    ),
    Metric(
        "importance",
        "head_importance",
        "Head importance",
        "change in loss (nats)",
        _CELL + "How much the next-token loss grows when the head is removed (masked, or "
        "its first-order estimate; the method is named at the top of the page). Bright: "
        "the model needs this head (Michel et al., arXiv:1905.10650).",
    ),
)
