"""Rotary position embedding (RoFormer, Su et al., arXiv:2104.09864)."""

from __future__ import annotations

import torch
from torch import nn

from attnlab.core.errors import AttnInputError


class Rotary(nn.Module):
    """Rotate query and key features by angles proportional to their positions.

    RoFormer (arXiv:2104.09864), eq. 34: feature pair i of a head of width D is
    rotated by the angle ``position · base^(-2i/D)``, so that the dot product of
    a rotated query and key depends on their positions only through their
    difference. Pairs are the two halves of the head (feature i with feature
    i + D/2), the layout of GPT-NeoX and Llama; the paper pairs neighbours
    (2i, 2i+1), which is the same map up to a fixed permutation of features.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise AttnInputError(f"head_dim: rotary embedding needs an even width, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x`` [B, H, N, D] whose first token sits at position ``offset``.

        Angles are computed in float64 on every call (no buffer that a cast of the
        model to half precision could round), then cast to ``x``'s dtype.
        """
        n, d = x.shape[2], self.head_dim
        pairs = torch.arange(0, d, 2, dtype=torch.float64, device=x.device)
        inv_freq = self.base ** (-pairs / d)
        pos = torch.arange(offset, offset + n, dtype=torch.float64, device=x.device)
        angles = pos[:, None] * inv_freq[None]  # [N, D/2]
        cos = torch.cos(angles).to(x.dtype)
        sin = torch.sin(angles).to(x.dtype)
        first, second = x[..., : self.head_dim // 2], x[..., self.head_dim // 2 :]
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
