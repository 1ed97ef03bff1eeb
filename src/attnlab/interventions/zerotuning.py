"""Scaling the attention paid to the initial token, per head ("ZeroTuning").

"ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language
Models Without Training" (Han et al., 2025, arXiv:2505.11739).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .base import Edit, Heads, HeadSpec, applied, finite_number, first_keys


class ZeroTuning(Edit):
    """Scale each chosen head's attention to the initial token by ``gamma``, then renormalize.

    With a₀ the weight on the initial token, a'₀ = γ·a₀ / (1 + (γ−1)·a₀) and
    a'ᵢ = aᵢ / (1 + (γ−1)·a₀) for the others: the relative weights of the other
    tokens are kept; γ < 1 sharpens them, γ > 1 flattens them. The same as
    adding log γ to the initial token's logit. The initial token is each
    sequence's first non-padding key.
    """

    has_probs = True
    needs_probs = True

    def __init__(self, gamma: float, heads: HeadSpec = None) -> None:
        self.gamma = finite_number("gamma", gamma, low=0.0)
        self.heads = Heads(heads)
        self._first: torch.Tensor | None = None
        self._sel: torch.Tensor | None = None

    def prepare(self, layer, q, k, *, causal, mask, scale):
        self._sel = self.heads.selector(layer, q.shape[1])
        self._first = first_keys(mask, q.shape[0], q.device)

    def probs(self, layer, p, row0):
        if self._sel is None:
            return p
        b = p.shape[0]
        bi = torch.arange(b, device=p.device)
        first = self._first.clamp(max=p.shape[-1] - 1)
        a0 = p[bi, :, :, first]  # [B, H, rows]
        gamma = torch.ones(p.shape[1], device=p.device)
        gamma[self._sel.to(p.device)] = self.gamma
        gamma = gamma.view(1, -1, 1)
        norm = 1.0 + (gamma - 1.0) * a0
        p = p / norm.clamp_min(1e-30).unsqueeze(-1)
        p[bi, :, :, first] = gamma * a0 / norm.clamp_min(1e-30)
        return p


@contextlib.contextmanager
def zerotune(model: torch.nn.Module, gamma: float, heads: HeadSpec = None) -> Iterator[ZeroTuning]:
    """Scale the attention to the initial token by ``gamma`` in ``heads`` (default: all)."""
    with applied(model, ZeroTuning(gamma, heads)) as edit:
        yield edit
