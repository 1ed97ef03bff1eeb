"""How far back heads look: mean attention distance, windowed average attention
distance (WAAD) and future attention influence (FAI)."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from ._stream import PerHead, distance_moments
from .base import Analysis, CaptureInfo, register_analysis


def _skip(probs: torch.Tensor, rows: slice, skip_rows: int) -> tuple[torch.Tensor, int]:
    """The block's rows at positions ``>= skip_rows`` (a view) and the first one's position."""
    start = 0 if rows.start is None else rows.start
    cut = min(probs.shape[-2], max(0, skip_rows - start))
    return (probs[:, :, cut:] if cut else probs), start + cut


def _gaps(rows: int, width: int, shift: int, device: torch.device) -> torch.Tensor:
    """Float [rows, width]: ``t - s`` for the query ``t = first + i`` and the key
    ``s = c0 + c`` of a block, where ``shift = first - c0``."""
    i = torch.arange(rows, dtype=torch.float32, device=device)[:, None]
    return i - torch.arange(width, dtype=torch.float32, device=device)[None, :] + shift


# blocks of one geometry (all but the first and last few of a pass) share these read-only
# weights instead of building them per block
@functools.lru_cache(maxsize=16)
def _window_weights(rows: int, width: int, shift: int, window: int, device) -> torch.Tensor:
    """Float [rows, width]: ``W - (t - s)`` where ``0 <= t - s < W``, else 0."""
    d = _gaps(rows, width, shift, device)
    return torch.where((d >= 0) & (d < window), window - d, 0.0)


@functools.lru_cache(maxsize=16)
def _horizon(rows: int, width: int, shift: int, lo: int, hi: int, device) -> torch.Tensor:
    """Bool [rows, width]: ``lo <= t - s <= hi``."""
    d = _gaps(rows, width, shift, device)
    return (d >= lo) & (d <= hi)


def head_groups(d: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [L, H] masks of the local and global heads: the ``quantile`` share of all
    heads with the smallest / largest mean backward distance ``d`` (Li et al., Sec. 4.1)."""
    flat = d.flatten()
    k = max(1, round(quantile * flat.numel()))
    order = flat.argsort()
    local = torch.zeros_like(flat, dtype=torch.bool)
    glob = torch.zeros_like(flat, dtype=torch.bool)
    local[order[:k]] = True
    glob[order[-k:]] = True
    return local.view_as(d), glob.view_as(d)


def _group_mean(per_head: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean over the heads in ``group`` (bool [L, H]) of ``per_head`` [L, H, N]."""
    return per_head[group].mean(0)


@register_analysis
class AttentionDistance(Analysis):
    """Mean attention distance and windowed average attention distance (WAAD).

    After Li et al. 2025 ("Attention Illuminates LLM Reasoning", arXiv:2510.13554),
    with ``A_ts`` the weight query ``t`` puts on key ``s``:

    - ``mean_distance``: the paper's attention-weighted mean backward distance of a
      head (its Eq. 7), ``d = 1/|R| sum_t sum_{s <= t} A_ts (t - s)``. In an encoder
      (no causal mask) keys after the query count with ``|t - s|``, the "mean
      attention distance" of Dosovitskiy et al. 2020 (arXiv:2010.11929) in token
      units. The paper sorts all heads by ``d`` and calls the lowest 30% locally
      focused and the highest 30% globally focused (``group`` in these rows:
      ``local``, ``global`` or None; ``quantile`` sets the share).
    - ``waad``: the paper's Def. 4.1, ``WAAD_t = sum_{s <= t} A_ts min(t - s, W)``
      with a small clipping window ``W`` (the paper's default 10), here per head,
      averaged over the query rows. The paper applies Def. 4.1 to the mean map of
      the local heads; because WAAD is linear in ``A``, that per-token series is the
      mean of the local heads' own series, kept as :attr:`waad` (float [N], one
      value per query position; peaks mark chunk boundaries, valleys local
      continuation). :attr:`waad_heads` keeps every head's series ([L, H, N]).

    Where we had to choose: the paper averages over the response tokens ``R`` of a
    prompt+response sequence; here ``R`` is every query row ``t >= skip_rows``
    (default 1: row 0 can only see itself), over the batch.
    """

    name = "distance"
    default = True

    def __init__(self, window: int = 10, skip_rows: int = 1, quantile: float = 0.3):
        self.window = window
        self.skip_rows = skip_rows
        self.quantile = quantile

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        self.acc = PerHead(info.n_layers, info.n_heads, "mean_distance", "waad")
        self.waad_sums = torch.zeros(info.n_layers, info.n_heads, info.seq_len, dtype=torch.float64)
        self.batch = int(info.input_ids.shape[0]) if info.input_ids is not None else 1

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        p, first = _skip(probs, rows, self.skip_rows)
        b, _, r, nk = p.shape
        if r == 0:
            return
        back_mass, spread = distance_moments(p, first, self.info.causal)
        # min(t - s, W) = W - (W - (t - s)) on the W keys before t, W elsewhere before t
        w = self.window
        c0, c1 = max(0, first - w + 1), min(nk, first + r)
        waad = w * back_mass
        if c0 < c1:
            near = _window_weights(r, c1 - c0, first - c0, w, p.device)  # [r, c1 - c0]
            waad = waad - (p[..., c0:c1] * near).sum(-1)
        self.acc.add(
            layer,
            float(b * r),
            mean_distance=spread,
            waad=waad.sum((0, 2)),
        )
        n = min(r, self.waad_sums.shape[-1] - first)
        if n > 0:
            self.waad_sums[layer, :, first : first + n] += waad[:, :, :n].sum(0).double().cpu()

    def finish(self) -> list[dict[str, Any]]:
        d = self.acc.mean("mean_distance")
        local, glob = head_groups(d, self.quantile)
        self.waad_heads = self.waad_sums / self.batch
        self.waad = _group_mean(self.waad_heads, local)
        self.waad[: self.skip_rows] = float("nan")
        out = []
        for metric in ("mean_distance", "waad"):
            t = self.acc.mean(metric)
            for layer in range(t.shape[0]):
                for head in range(t.shape[1]):
                    row = {
                        "analysis": self.name,
                        "layer": layer,
                        "head": head,
                        "metric": metric,
                        "value": float(t[layer, head]),
                    }
                    if metric == "waad":
                        row["window"] = self.window
                    else:
                        in_local, in_glob = bool(local[layer, head]), bool(glob[layer, head])
                        row["group"] = "local" if in_local else "global" if in_glob else None
                    out.append(row)
        return out


@register_analysis
class FutureInfluence(Analysis):
    """Future attention influence (FAI) of each token, per head and over the global heads.

    After Li et al. 2025 ("Attention Illuminates LLM Reasoning", arXiv:2510.13554),
    Def. 4.2: the influence of token ``s`` is the mean attention it receives from
    the later tokens within a horizon,
    ``FAI_s = 1/|T(s)| sum_{t in T(s)} A_ts`` with
    ``T(s) = {t : s + H_lo <= t <= min(N - 1, s + H_hi)}`` (the paper's defaults
    ``H_lo = 10``, ``H_hi = 100``). High-FAI tokens are the paper's "anchors". The
    paper computes FAI on the mean map of the globally focused heads (the 30% of
    heads with the largest mean backward distance, see :class:`AttentionDistance`);
    FAI is linear in ``A``, so that series is the mean of those heads' own series,
    kept as :attr:`fai` (float [N]; NaN where ``T(s)`` is empty), with every head's
    series in :attr:`fai_heads` ([L, H, N]).

    Rows per (layer, head): ``fai_peak``, the highest FAI among the tokens
    ``s >= 1`` with at least ``min_followers`` tokens in ``T(s)`` (the first token is
    the attention sink, measured by :class:`~attnlab.analysis.sinks.Sinks`), with
    its ``position`` and text, and ``fai_first``, the FAI of the first token.
    Rows per token (``layer`` and ``head`` None): ``fai_anchor``, the ``top_k``
    tokens by the global heads' FAI, with ``rank``, ``position`` and text.

    Where we had to choose: the paper's ``t`` runs over the response tokens of a
    prompt+response sequence; here over every position of the input, over the batch.
    The head groups are recomputed here from the same pass (no second capture).
    """

    name = "fai"
    default = True

    def __init__(
        self,
        h_lo: int = 10,
        h_hi: int = 100,
        min_followers: int = 8,
        quantile: float = 0.3,
        top_k: int = 5,
    ):
        if not 0 <= h_lo <= h_hi:
            raise ValueError(f"h_lo, h_hi: expected 0 <= h_lo <= h_hi, got {h_lo}, {h_hi}")
        self.h_lo, self.h_hi = h_lo, h_hi
        self.min_followers = min_followers
        self.quantile = quantile
        self.top_k = top_k

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        n = info.seq_len
        self.received = torch.zeros(info.n_layers, info.n_heads, n, dtype=torch.float64)
        self.dist = PerHead(info.n_layers, info.n_heads, "back")
        self.batch = int(info.input_ids.shape[0]) if info.input_ids is not None else 1

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        b, _, r, nk = probs.shape
        first = 0 if rows.start is None else rows.start
        # the head groups: mean backward distance over rows t >= 1 (as AttentionDistance)
        p, f1 = _skip(probs, rows, 1)
        if p.shape[-2]:
            _, dist = distance_moments(p, f1, self.info.causal)
            self.dist.add(layer, float(b * p.shape[-2]), back=dist)
        # keys s with H_lo <= t - s <= H_hi for some row t of the block: a narrow band
        c0 = max(0, first - self.h_hi)
        c1 = min(nk, first + r - self.h_lo, self.received.shape[-1])
        if c0 >= c1:
            return
        inside = _horizon(r, c1 - c0, first - c0, self.h_lo, self.h_hi, probs.device)
        band = (probs[..., c0:c1] * inside).sum((0, 2))  # [H, c1 - c0]
        self.received[layer, :, c0:c1] += band.double().cpu()

    def _followers(self, n: int) -> torch.Tensor:
        """``|T(s)|`` for every token ``s`` (per sequence)."""
        s = torch.arange(n, dtype=torch.float64)
        last = torch.clamp(s + self.h_hi, max=n - 1)
        return (last - (s + self.h_lo) + 1).clamp_min(0)

    def finish(self) -> list[dict[str, Any]]:
        n = self.received.shape[-1]
        followers = self._followers(n)
        fai = self.received / (followers * self.batch).clamp_min(1.0)
        fai[..., followers == 0] = float("nan")
        self.fai_heads = fai
        _, glob = head_groups(self.dist.mean("back"), self.quantile)
        self.fai = _group_mean(fai, glob)
        tokens = self.info.tokens or []

        def tok(pos: int):
            return tokens[pos] if pos < len(tokens) else None

        out: list[dict[str, Any]] = []
        eligible = (torch.arange(n) >= 1) & (followers >= max(1, self.min_followers))
        for layer in range(fai.shape[0]):
            for head in range(fai.shape[1]):
                first = float(fai[layer, head, 0]) if n else math.nan
                out.append(
                    {
                        "analysis": self.name,
                        "layer": layer,
                        "head": head,
                        "metric": "fai_first",
                        "value": first if math.isfinite(first) else None,
                        "position": 0,
                        "token": tok(0),
                    }
                )
                if bool(eligible.any()):
                    vals = torch.where(eligible, fai[layer, head], -1.0)
                    pos = int(vals.argmax())
                    out.append(
                        {
                            "analysis": self.name,
                            "layer": layer,
                            "head": head,
                            "metric": "fai_peak",
                            "value": float(vals[pos]),
                            "position": pos,
                            "token": tok(pos),
                        }
                    )
        if bool(eligible.any()):
            ranked = torch.where(eligible, self.fai, -1.0)
            k = min(self.top_k, int(eligible.sum()))
            for rank, pos in enumerate(ranked.topk(k).indices.tolist()):
                out.append(
                    {
                        "analysis": self.name,
                        "layer": None,
                        "head": None,
                        "metric": "fai_anchor",
                        "value": float(self.fai[pos]),
                        "rank": rank,
                        "position": pos,
                        "token": tok(pos),
                        "h_lo": self.h_lo,
                        "h_hi": self.h_hi,
                    }
                )
        return out
