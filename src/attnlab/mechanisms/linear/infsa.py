"""Linear Infinite Self-Attention: one pooled query, a ReLU-normalised centrality over keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.core import Mechanism, Spec, register
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv

from ._memory import acc_dtype


def centrality(q, k, *, scale: float, eps: float) -> torch.Tensor:
    """a [B, H, Nk]: a_j ∝ ReLU(q̄ · k̃_j), q̄ the energy-pooled query (both scaled)."""
    qs, ks = q * scale, k * scale
    energy = qs.norm(dim=-1)  # [B, H, Nq], >= 0
    weights = energy / (energy.sum(dim=-1, keepdim=True) + eps)
    q_bar = torch.einsum("bhn,bhnd->bhd", weights, qs)
    a = torch.relu(torch.einsum("bhd,bhnd->bhn", q_bar, ks))
    a = a / (a.sum(dim=-1, keepdim=True) + eps)
    return a


@register
class InfSA(Mechanism):
    """Linear-InfSA: attention as the principal eigenvector of a ReLU affinity graph.

    Roffo et al., "Self-Attention And Beyond the Infinite: Towards Linear
    Transformers with Infinite Self-Attention" (arXiv:2603.00175). InfSA reads
    attention as a diffusion on the token graph A = ReLU(Q Kᵀ) and weighs
    tokens by their centrality; Linear-InfSA approximates the principal
    eigenvector of that operator without forming it, in O(N·D), following
    the authors' implementation:

        q̃ = scale·q, k̃ = scale·k
        π_i = ‖q̃_i‖ / Σ_i' ‖q̃_i'‖,            q̄ = Σ_i π_i q̃_i   (energy-pooled query)
        a_j = ReLU(q̄·k̃_j) / (Σ_j' ReLU(q̄·k̃_j') + ε)
        y_i = ρ Σ_j a_j v_j                                      (the same for every query)

    ρ ∈ (0, 1) is the discount of the Neumann series (``Config.rho``). Because
    the pooled query summarises all queries, the mechanism is bidirectional
    only: the paper (a vision model) defines no causal form, and a per-query
    mask has no meaning for one shared centrality vector.
    """

    spec = Spec(
        name="infsa",
        family="linear",
        title="Linear-InfSA: linear infinite self-attention (eigenvector centrality)",
        paper="arXiv:2603.00175",
        exact=False,
        causal=False,
        noncausal=True,
        cross=True,
        decode=False,
        backward=True,
        mask=False,
        complexity="O(N·(D+Dv))",
    )

    @dataclass
    class Config:
        rho: float = option(0.95, low=0, high=1, low_open=True, high_open=True)
        eps: float = 1e-6  # at least 1e-30 (core.config.NAMED_BOUNDS)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        dt = acc_dtype(q.dtype)
        groups = q.shape[1] // k.shape[1]
        kk, vv = repeat_kv(k.to(dt), groups), repeat_kv(v.to(dt), groups)
        a = centrality(q.to(dt), kk, scale=scale, eps=self.config.eps)
        pooled = self.config.rho * torch.einsum("bhn,bhnd->bhd", a, vv)
        return pooled.unsqueeze(2).expand(-1, -1, q.shape[2], -1).to(q.dtype).contiguous()

    def reference(self, q, k, v, *, causal, mask, scale):
        """The dense rank-one attention matrix P = ρ·1 aᵀ [Nq, Nk], applied to v."""
        groups = q.shape[1] // k.shape[1]
        kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
        a = centrality(q, kk, scale=scale, eps=self.config.eps)
        probs = self.config.rho * a.unsqueeze(2).expand(-1, -1, q.shape[2], -1)
        return probs @ vv
