"""Masking and scaling chosen attention heads.

Head masking as in "Are Sixteen Heads Really Better than One?" (Michel et al.,
2019, arXiv:1905.10650): a head's output (its P·V, before the output
projection) is multiplied by a gate; gate 0 removes the head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .base import Edit, Heads, HeadSpec, applied, finite_number


class HeadScale(Edit):
    """Multiply the attention output of the chosen heads by ``factor``."""

    def __init__(self, heads: HeadSpec, factor: float) -> None:
        self.factor = finite_number("factor", factor)
        self.heads = Heads(heads)

    def output(self, layer, out, q, k, v):
        sel = self.heads.selector(layer, out.shape[1])
        if sel is None:
            return out
        gate = torch.ones(out.shape[1], dtype=out.dtype, device=out.device)
        gate[sel.to(out.device)] = self.factor
        return out * gate.view(1, -1, 1, 1)


@contextlib.contextmanager
def scale_heads(model: torch.nn.Module, heads: HeadSpec, factor: float) -> Iterator[HeadScale]:
    """Scale the outputs of ``heads`` (``{layer: [head, ...]}`` or (layer, head) pairs)."""
    with applied(model, HeadScale(heads, factor)) as edit:
        yield edit


@contextlib.contextmanager
def mask_heads(model: torch.nn.Module, heads: HeadSpec) -> Iterator[HeadScale]:
    """Remove ``heads`` from the model (their outputs are zero) inside the block."""
    with applied(model, HeadScale(heads, 0.0)) as edit:
        yield edit
