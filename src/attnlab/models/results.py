"""What a capture returns: tidy result rows and the run they came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .probes import CaptureInfo
from .qk_io import save_qk


class Results(list):
    """Tidy rows (dicts with ``analysis, layer, head, metric, value`` and extras)."""

    def where(self, **match: Any) -> Results:
        """The rows whose fields equal every ``key=value`` given."""
        return Results(r for r in self if all(r.get(k) == v for k, v in match.items()))

    def columns(self) -> dict[str, list[Any]]:
        """Column-oriented view: ``{field: [value per row]}`` (missing fields are None)."""
        keys: list[str] = []
        for r in self:
            keys.extend(k for k in r if k not in keys)
        return {k: [r.get(k) for r in self] for k in keys}

    def grid(self, metric: str, analysis: str | None = None) -> list[list[float | None]]:
        """A layer x head grid of ``metric`` (mean over any extra index), for heatmaps."""
        rows = [r for r in self if r["metric"] == metric]
        if analysis is not None:
            rows = [r for r in rows if r["analysis"] == analysis]
        if not rows:
            return []
        n_layers = max(r["layer"] for r in rows) + 1
        n_heads = max(r["head"] for r in rows) + 1
        sums = [[0.0] * n_heads for _ in range(n_layers)]
        counts = [[0] * n_heads for _ in range(n_layers)]
        for r in rows:
            sums[r["layer"]][r["head"]] += float(r["value"])
            counts[r["layer"]][r["head"]] += 1
        return [
            [sums[i][j] / counts[i][j] if counts[i][j] else None for j in range(n_heads)]
            for i in range(n_layers)
        ]

    def format(self, limit: int = 20) -> str:
        """A plain-text table of the first ``limit`` rows."""
        cols = self.columns()
        if not cols:
            return "(no rows)"
        names = list(cols)
        cells = [[_fmt(cols[n][i]) for n in names] for i in range(min(limit, len(self)))]
        widths = [max([len(n)] + [len(c[j]) for c in cells]) for j, n in enumerate(names)]
        lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        if len(self) > limit:
            lines.append(f"... {len(self) - limit} more rows")
        return "\n".join(lines)


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


@dataclass
class CaptureResult:
    """What :func:`attnlab.models.capture` returns: tidy rows, the run's info and any kept
    q/k/v."""

    rows: Results
    info: CaptureInfo
    qkv: dict[str, torch.Tensor]

    def save_qk(self, path: str | Path, **metadata: str) -> Path:
        """Write the kept queries/keys/values (``layer{L}.q|k|v``) as safetensors."""
        return save_qk(self.qkv, path, **metadata)
