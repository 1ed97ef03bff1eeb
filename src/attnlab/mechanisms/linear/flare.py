"""FLARE: attention routed through M latent tokens, at O(N·M).

Compared with vpuri3/FLARE.py (flare_multihead_mixer: two scaled_dot_product_attention
calls with scale 1, latents as queries, then keys as queries over the latents): the
class docstring lists the departures, all on purpose: the scatter reads q (q = k gives
the authors' operator), scale defaults to D^(-1/2), and the latents are seeded instead
of learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Mechanism, Spec, register
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv

from ._memory import acc_dtype, seeded_normal


@register
class Flare(Mechanism):
    """FLARE: each head gathers the sequence into M latent tokens and scatters it back.

    Puri et al., "FLARE: Fast Low-rank Attention Routing Engine"
    (arXiv:2508.12594). With latent queries L_h ∈ R^{M×D} per head, two
    attention calls give a token mixing of rank <= M at O(N·M·D) cost:

        Z = softmax(scale · L_h Kᵀ) V           (gather: latents over the N keys)
        Y = softmax(scale · Q L_hᵀ) Z           (scatter: tokens over the M latents)

    The paper's layer scatters with the token keys as queries (it has no
    separate query projection); here the scatter uses q, so that q = k gives
    the paper's operator and q from another sequence is cross-attention. The
    paper's code calls both steps with scale 1; pass ``scale=1.0`` for that.
    The latents are learned in the paper; here they are drawn once from
    ``Config.seed`` (N(0, 1) entries, one disjoint set per query head, as the
    paper assigns) and fixed after construction. FLARE is bidirectional: the
    paper defines no causal form, and a mask has no place in the routing.
    """

    spec = Spec(
        name="flare",
        family="linear",
        title="FLARE: low-rank attention routed through M latent tokens",
        paper="arXiv:2508.12594",
        exact=False,
        causal=False,
        noncausal=True,
        cross=True,
        decode=False,
        backward=True,
        mask=False,
        complexity="O(N·M·(D+Dv))",
    )
    tiny_config: ClassVar[dict] = {"latents": 5}

    @dataclass
    class Config:
        latents: int = 64
        seed: int = option(0, low=0)

    def latent_queries(self, heads: int, head_dim: int, *, device, dtype) -> torch.Tensor:
        """The fixed latent queries [H, M, D] of the first ``heads`` query heads."""
        shape = (heads, self.config.latents, head_dim)
        return seeded_normal(self.config.seed, shape, std=1.0, device=device, dtype=dtype)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        dt = acc_dtype(q.dtype)
        groups = q.shape[1] // k.shape[1]
        kk, vv = repeat_kv(k.to(dt), groups), repeat_kv(v.to(dt), groups)
        lat = self.latent_queries(q.shape[1], q.shape[-1], device=q.device, dtype=dt)
        gather = torch.softmax(scale * (lat @ kk.transpose(-1, -2)), dim=-1)  # [B, H, M, Nk]
        z = gather @ vv
        scatter = torch.softmax(scale * (q.to(dt) @ lat.transpose(-1, -2)), dim=-1)
        return (scatter @ z).to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The dense rank-M token-mixing matrix W = scatter · gather [Nq, Nk], applied to v."""
        groups = q.shape[1] // k.shape[1]
        kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
        lat = self.latent_queries(q.shape[1], q.shape[-1], device=q.device, dtype=q.dtype)
        gather = torch.softmax(scale * torch.einsum("hmd,bhnd->bhmn", lat, kk), dim=-1)
        scatter = torch.softmax(scale * torch.einsum("bhtd,hmd->bhtm", q, lat), dim=-1)
        mixing = torch.einsum("bhtm,bhmn->bhtn", scatter, gather)
        return mixing @ vv
