"""PNG plots of analysis results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def grid(rows: Sequence[dict[str, Any]], metric: str, analysis: str | None = None) -> np.ndarray:
    """A layer x head array of ``metric`` (NaN where a cell has no row; repeated rows averaged)."""
    sel = [
        r
        for r in rows
        if r["metric"] == metric
        and r.get("head") is not None
        and r.get("layer") is not None
        and r.get("value") is not None
        and (analysis is None or r["analysis"] == analysis)
    ]
    if not sel:
        return np.zeros((0, 0))
    n_layers = max(r["layer"] for r in sel) + 1
    n_heads = max(r["head"] for r in sel) + 1
    sums = np.zeros((n_layers, n_heads))
    counts = np.zeros((n_layers, n_heads))
    for r in sel:
        sums[r["layer"], r["head"]] += float(r["value"])
        counts[r["layer"], r["head"]] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def heatmap(
    rows: Sequence[dict[str, Any]],
    metric: str,
    path: str | Path,
    *,
    analysis: str | None = None,
    title: str | None = None,
) -> Path | None:
    """Layer x head heatmap of one per-head metric; None when there is nothing to plot."""
    g = grid(rows, metric, analysis)
    if g.size == 0:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * g.shape[1], 1.0 + 0.22 * g.shape[0]))
    im = ax.imshow(g, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(g.shape[1]))
    step = max(1, g.shape[0] // 15)
    ax.set_yticks(range(0, g.shape[0], step))
    ax.set_title(title or metric, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def attention_map(
    matrix,
    tokens: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "key",
    ylabel: str = "query",
    label_limit: int = 48,
) -> Path:
    """One attention-like matrix [queries, keys] with token labels when it is small."""
    m = np.asarray(matrix, dtype=float)
    size = min(9.0, 2.0 + 0.13 * m.shape[1])
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(m, cmap="magma", interpolation="nearest", aspect="auto")
    if m.shape[1] <= label_limit and len(tokens) >= m.shape[1]:
        ax.set_xticks(range(m.shape[1]))
        ax.set_xticklabels([_label(t) for t in tokens[: m.shape[1]]], rotation=90, fontsize=6)
    if m.shape[0] <= label_limit and len(tokens) >= m.shape[0]:
        ax.set_yticks(range(m.shape[0]))
        ax.set_yticklabels([_label(t) for t in tokens[: m.shape[0]]], fontsize=6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def sink_positions(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Per layer, the key positions that draw the most attention (``sinks`` rows).

    Marker area follows the head-mean attention received; the first token and
    secondary sinks get different colours; positions that no head sinks into
    (``is_sink`` false) are drawn hollow.
    """
    sel = [r for r in rows if r["analysis"] == "sinks" and r["metric"] == "sink"]
    if not sel:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for kind, colour in (("first", "tab:red"), ("secondary", "tab:blue")):
        for filled in (True, False):
            pts = [r for r in sel if r["kind"] == kind and bool(r["is_sink"]) == filled]
            if not pts:
                continue
            ax.scatter(
                [r["position"] for r in pts],
                [r["layer"] for r in pts],
                s=[20 + 400 * max(0.0, r["value"]) for r in pts],
                facecolors=colour if filled else "none",
                edgecolors=colour,
                label=f"{kind}{'' if filled else ' (no head > ε)'}",
                alpha=0.7,
            )
    for r in sel:
        if r["kind"] == "secondary" and r["is_sink"]:
            ax.annotate(
                _label(r.get("token") or ""),
                (r["position"], r["layer"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("key position")
    ax.set_ylabel("layer")
    ax.set_title(
        "Top attended positions per layer (marker area = mean attention received)", fontsize=9
    )
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _label(token: str) -> str:
    return token.replace("Ġ", "␣").replace("Ċ", "⏎")[:12]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
