"""Synthetic attention patterns for testing the reducers without a model."""

from __future__ import annotations

import torch


def causal_uniform(n: int) -> torch.Tensor:
    """[N, N]: each row spreads evenly over the keys it sees."""
    m = torch.tril(torch.ones(n, n))
    return m / m.sum(-1, keepdim=True)


def to_position(n: int, pos: int) -> torch.Tensor:
    """[N, N]: every row that can see ``pos`` puts all its weight there, others on themselves."""
    m = torch.zeros(n, n)
    for i in range(n):
        m[i, pos if i >= pos else i] = 1.0
    return m


def shifted_diagonal(n: int, shift: int = 1) -> torch.Tensor:
    """[N, N]: row i attends to i - shift (row < shift attends to itself)."""
    m = torch.zeros(n, n)
    for i in range(n):
        m[i, i - shift if i >= shift else i] = 1.0
    return m


def random_causal(b: int, h: int, n: int, sharp: float = 3.0) -> torch.Tensor:
    """[B, H, N, N]: random causal softmax attention."""
    s = torch.randn(b, h, n, n) * sharp
    s = s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    return s.softmax(-1)


def stack_heads(*patterns: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """[B, H, N, N] from one [N, N] pattern per head."""
    return torch.stack(patterns)[None].expand(batch, -1, -1, -1).contiguous()
