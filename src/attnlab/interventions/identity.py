"""Interpolating chosen heads toward identity attention ("SoftPAG").

"Fine-Grained Perturbation Guidance via Attention Head Selection" (Ahn et al.,
2025, arXiv:2506.10978): perturbed-attention guidance replaces a head's
attention map by the identity; SoftPAG interpolates toward it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from attnlab.core.errors import AttnInputError

from .base import Edit, Heads, HeadSpec, applied


class IdentityBlend(Edit):
    """A' = (1 − u)·A + u·I in the chosen heads: each query moves toward attending to itself.

    The output becomes (1 − u)·A·V + u·vᵢ, with vᵢ the value at the query's own
    position; u = 1 is PAG's identity perturbation. Works with any mechanism
    (through the output) and shows in the probabilities when they are computed.
    """

    has_probs = True

    def __init__(self, heads: HeadSpec, strength: float = 1.0) -> None:
        if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise AttnInputError(f"strength: expected a number in [0, 1], got {strength!r}")
        self.heads = Heads(heads)
        self.u = float(strength)
        self._sel: torch.Tensor | None = None

    def prepare(self, layer, q, k, *, causal, mask, scale):
        self._sel = self.heads.selector(layer, q.shape[1])

    def probs(self, layer, p, row0):
        if self._sel is None:
            return p
        rows = p.shape[2]
        pos = torch.arange(row0, row0 + rows, device=p.device)
        eye = torch.zeros(rows, p.shape[-1], device=p.device)
        eye[torch.arange(rows, device=p.device), pos] = 1.0
        u = torch.zeros(p.shape[1], device=p.device)
        u[self._sel.to(p.device)] = self.u
        u = u.view(1, -1, 1, 1)
        return (1.0 - u) * p + u * eye

    def output(self, layer, out, q, k, v):
        sel = self.heads.selector(layer, out.shape[1])
        if sel is None:
            return out
        hq, hkv, nq, nk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
        own = v[:, torch.arange(hq, device=v.device) // (hq // hkv), nk - nq :]
        u = torch.zeros(hq, dtype=out.dtype, device=out.device)
        u[sel.to(out.device)] = self.u
        u = u.view(1, -1, 1, 1)
        return (1.0 - u) * out + u * own.to(out.dtype)


@contextlib.contextmanager
def identity_attention(
    model: torch.nn.Module, heads: HeadSpec, strength: float = 1.0
) -> Iterator[IdentityBlend]:
    """Blend ``heads`` toward identity attention with weight ``strength`` inside the block."""
    with applied(model, IdentityBlend(heads, strength)) as edit:
        yield edit
