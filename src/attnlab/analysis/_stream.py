"""Small helpers shared by the streaming reducers: positions, visibility, accumulators."""

from __future__ import annotations

import torch


def query_positions(rows: slice, n_rows: int, device=None) -> torch.Tensor:
    """Absolute positions of the query rows of a block, as a 1-d long tensor.

    A query at position ``i`` is the token whose key is key ``i`` (a full forward
    pass, or a decode step whose cache holds every earlier key).
    """
    start = 0 if rows.start is None else rows.start
    return torch.arange(start, start + n_rows, device=device)


def distances(rows: slice, n_rows: int, n_keys: int, device=None) -> torch.Tensor:
    """Float [rows, Nk]: ``i - j``, the distance back from query ``i`` to key ``j``."""
    i = query_positions(rows, n_rows, device).to(torch.float32)
    j = torch.arange(n_keys, device=device, dtype=torch.float32)
    return i[:, None] - j[None, :]


def visible(rows: slice, n_rows: int, n_keys: int, causal: bool, device=None) -> torch.Tensor:
    """Bool [rows, Nk]: which keys each query may see (``j <= i`` when causal)."""
    if not causal:
        return torch.ones(n_rows, n_keys, dtype=torch.bool, device=device)
    return distances(rows, n_rows, n_keys, device) >= 0


class PerHead:
    """Float64 running sums and counts per (layer, head), for means over query rows."""

    def __init__(self, n_layers: int, n_heads: int, *names: str):
        self.sums = {n: torch.zeros(n_layers, n_heads, dtype=torch.float64) for n in names}
        self.count = torch.zeros(n_layers, n_heads, dtype=torch.float64)

    def add(self, layer: int, weight: torch.Tensor | float, **values: torch.Tensor) -> None:
        """``values[name]``: float [Hq] sums over the rows (and batch) of one block;
        ``weight``: the number of rows they cover (a scalar or [Hq])."""
        for name, v in values.items():
            self.sums[name][layer] += v.detach().to(torch.float64).cpu()
        self.count[layer] += torch.as_tensor(weight, dtype=torch.float64)

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.count.clamp_min(1.0)
