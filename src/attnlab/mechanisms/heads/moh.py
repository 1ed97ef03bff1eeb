"""Mixture-of-head attention (MoH): attention heads as experts routed per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from attnlab.core.config import option
from attnlab.core.errors import AttnInputError
from attnlab.core.registry import register
from attnlab.core.spec import Spec

from .gqa import GroupedHeads


@register
class MixtureOfHeadAttention(GroupedHeads):
    """Mixture-of-head attention (Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head
    Attention", arXiv:2410.11842, section 3.2).

    Multi-head attention is a sum over heads of H_i W_O^i; MoH makes it a weighted sum
    over heads chosen per token, O = sum_i g_i H_i W_O^i. The first ``shared_heads``
    heads are always active; of the other ``heads - shared_heads`` (the routed heads)
    each token keeps the ``active`` with the highest router scores and gives the rest
    weight 0. The shared heads are weighted by Softmax(W_s x), the routed ones by
    Softmax(W_r x) over the routed heads, and the two kinds are balanced per token by
    [a_1, a_2] = Softmax(W_h x).

    Where this follows the authors' released code (SkyworkAI/MoH, ``MoH-ViT``) rather
    than the paper's equation 5: the routed weights are renormalised over the ``active``
    chosen heads, and each kind's weights are scaled by its number of heads (and the
    balance by 2), so that a uniform router reproduces multi-head attention's plain sum.
    Every head is computed and the unchosen ones weighted by zero: the same outputs as
    skipping them, without the paper's saving of compute, which needs a sparse kernel.
    ``balance_loss(x)`` is the authors' load-balancing loss for the routed heads.

    Key/value heads (``kv_heads``, None for one per head) and the cache are multi-head
    attention's: 2·kv_heads·head_dim floats per token, since every query head may be
    chosen at a later token.
    """

    spec = Spec(
        name="moh",
        family="heads",
        title="Mixture-of-head attention: shared heads plus top-k routed heads per token",
        paper="arXiv:2410.11842",
        exact=False,
        decode=True,
        mask=False,
        complexity="O(N²·dim); cache 2·kv_heads·head_dim floats/token",
    )

    @dataclass
    class Config:
        dim: int = 64
        heads: int = 8
        shared_heads: int = option(2, low=0)  # 0: every head is routed
        active: int = 3
        kv_heads: int | None = None
        head_dim: int | None = None
        rotary: bool = False
        bias: bool = False

    tiny_config: ClassVar[dict[str, Any]] = {
        "dim": 16,
        "heads": 5,
        "head_dim": 4,
        "shared_heads": 2,
        "active": 2,
        "rotary": True,
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        cfg = self.config
        shared, active = cfg.shared_heads, cfg.active
        if not isinstance(shared, int) or isinstance(shared, bool) or not 0 <= shared < self.heads:
            raise AttnInputError(
                f"shared_heads: expected an int in [0, heads={self.heads}), got {shared!r}"
            )
        routed = self.heads - shared
        if not isinstance(active, int) or isinstance(active, bool) or not 1 <= active <= routed:
            raise AttnInputError(
                f"active: expected an int in [1, heads - shared_heads = {routed}], got {active!r}"
            )
        self.shared_heads, self.routed_heads, self.active = shared, routed, active
        self.route = nn.Linear(cfg.dim, routed, bias=False)  # W_r
        self.share = nn.Linear(cfg.dim, shared, bias=False) if shared > 1 else None  # W_s
        self.balance = nn.Linear(cfg.dim, 2, bias=False) if shared else None  # W_h

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """The weight g_i of every head for every token of x [B, N, dim]: [B, N, heads],
        zero on the routed heads a token does not choose."""
        scores = self.route(x).softmax(dim=-1)
        chosen = scores.topk(self.active, dim=-1).indices
        keep = torch.zeros_like(scores).scatter(-1, chosen, 1.0)
        routed = scores * keep
        routed = routed / routed.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).eps)
        routed = routed * self.active
        if not self.shared_heads:
            return routed
        if self.share is None:
            shared = torch.ones_like(x[..., :1])
        else:
            shared = self.share(x).softmax(dim=-1) * self.shared_heads
        balance = self.balance(x).softmax(dim=-1) * 2
        return torch.cat([shared * balance[..., :1], routed * balance[..., 1:]], dim=-1)

    def mix_heads(self, heads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each head's output weighted by its gate for the token."""
        return heads * self.gates(x).transpose(1, 2)[..., None]

    def balance_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The load-balancing loss of the routed heads on x [B, N, dim], as the authors'
        code computes it: E · sum_i f_i P_i over the E routed heads, f_i the fraction of
        tokens choosing head i and P_i its mean router probability; ``active`` when the
        load is uniform."""
        self.check_hidden("x", x)
        scores = self.route(x).softmax(dim=-1).flatten(0, 1)
        chosen = scores.topk(self.active, dim=-1).indices
        fraction = torch.zeros_like(scores).scatter(-1, chosen, 1.0).mean(0)
        return self.routed_heads * (fraction * scores.mean(0)).sum()
