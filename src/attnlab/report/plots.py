"""PNG plots of analysis results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from mpl_toolkits.axes_grid1 import make_axes_locatable

from .tokens import axis_label


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
    unit: str = "",
) -> Path | None:
    """:func:`heatmap_figure` saved as a PNG at ``path``; None when there is nothing to plot."""
    fig = heatmap_figure(rows, metric, analysis=analysis, title=title, unit=unit)
    return None if fig is None else _save(fig, path)


def heatmap_figure(
    rows: Sequence[dict[str, Any]],
    metric: str,
    *,
    analysis: str | None = None,
    title: str | None = None,
    unit: str = "",
):
    """Layer x head heatmap of one per-head metric, with a colorbar as tall as the grid
    labelled ``unit``; None when there is nothing to plot."""
    g = grid(rows, metric, analysis)
    if g.size == 0:
        return None
    fig, ax = plt.subplots(figsize=(1.9 + 0.24 * g.shape[1], 1.3 + 0.13 * g.shape[0]))
    im = ax.imshow(g, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(g.shape[1]))
    step = max(1, g.shape[0] // 15)
    ax.set_yticks(range(0, g.shape[0], step))
    ax.set_title(title or metric, fontsize=9)
    _colorbar(fig, ax, im, unit)
    return fig


def attention_map(matrix, tokens: Sequence[str], path: str | Path, **options) -> Path:
    """:func:`attention_map_figure` saved as a PNG at ``path``."""
    return _save(attention_map_figure(matrix, tokens, **options), path)


def attention_map_figure(
    matrix,
    tokens: Sequence[str],
    *,
    title: str = "",
    xlabel: str = "key token",
    ylabel: str = "query token",
    unit: str = "attention weight",
    label_limit: int = 48,
):
    """One attention-like matrix [queries, keys] with a labelled colorbar, each axis
    labelled with the decoded ``tokens`` when it has at most ``label_limit`` of them."""
    m = np.asarray(matrix, dtype=float)
    size = min(7.0, 2.6 + 0.11 * m.shape[1])
    fig, ax = plt.subplots(figsize=(size + 0.9, size))
    im = ax.imshow(m, cmap="magma", interpolation="nearest", aspect="auto")
    fontsize = 7 if max(m.shape) <= 32 else 6
    if m.shape[1] <= label_limit and len(tokens) >= m.shape[1]:
        ax.set_xticks(range(m.shape[1]))
        ax.set_xticklabels(
            [axis_label(t) for t in tokens[: m.shape[1]]], rotation=90, fontsize=fontsize
        )
    if m.shape[0] <= label_limit and len(tokens) >= m.shape[0]:
        ax.set_yticks(range(m.shape[0]))
        ax.set_yticklabels([axis_label(t) for t in tokens[: m.shape[0]]], fontsize=fontsize)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    _colorbar(fig, ax, im, unit)
    return fig


def sink_positions(
    rows: Sequence[dict[str, Any]], path: str | Path, tokens: Sequence[str] = ()
) -> Path | None:
    """Per layer, the key positions that draw the most attention (``sinks`` rows).

    Marker area follows the head-mean attention received; the first token and
    secondary sinks get different colours; positions that are not sinks
    (``is_sink`` false: less than ``ratio_min`` times their uniform share) are drawn
    hollow. Secondary sinks are labelled with their decoded token from ``tokens``
    (by position), else with the row's own token.
    """
    sel = [r for r in rows if r["analysis"] == "sinks" and r["metric"] == "sink"]
    if not sel:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
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
                label=f"{kind} token" if filled else f"{kind} (not a sink)",
                alpha=0.7,
            )
    for r in sel:
        if r["kind"] == "secondary" and r["is_sink"]:
            pos = r["position"]
            ax.annotate(
                axis_label(tokens[pos] if pos < len(tokens) else r.get("token") or ""),
                (r["position"], r["layer"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("key position")
    ax.set_ylabel("layer")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Most-attended key positions per layer", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def _colorbar(fig, ax, image, unit: str) -> None:
    """A colorbar as tall as the axes, right of it, labelled with the unit."""
    cax = make_axes_locatable(ax).append_axes("right", size="5%", pad=0.08)
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(unit, fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
