"""Previous-token, duplicate-token and induction heads."""

from __future__ import annotations

from typing import Any

import torch

from ._stream import PerHead, distances, query_positions
from .base import Analysis, CaptureInfo, register_analysis


def repeated_random_tokens(
    vocab_size: int,
    length: int = 64,
    batch: int = 4,
    *,
    bos: int | None = None,
    low: int = 100,
    seed: int = 0,
) -> torch.Tensor:
    """Long [batch, (1) + 2 * length]: a random token sequence repeated once.

    The standard probe for induction heads (Olsson et al. 2022, "In-context
    Learning and Induction Heads"): the second copy can only be predicted by
    looking up the token after the earlier occurrence of the current token.
    Tokens are drawn from ``[low, vocab_size)`` (skipping the special tokens
    most vocabularies put first); ``bos``, when given, is prepended.
    """
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(low, vocab_size, (batch, length), generator=g)
    seq = torch.cat([half, half], dim=1)
    if bos is not None:
        seq = torch.cat([torch.full((batch, 1), bos, dtype=seq.dtype), seq], dim=1)
    return seq


@register_analysis
class TokenPatterns(Analysis):
    """Previous-token, duplicate-token and induction scores per head.

    Standard definitions (Olsson et al. 2022, "In-context Learning and
    Induction Heads"; Wang et al. 2022, "Interpretability in the Wild",
    arXiv:2211.00593), computed from the input ids, so they apply to any input
    and reduce to the usual diagonals on a repeated random sequence
    (:func:`repeated_random_tokens`):

    - ``previous_token``: ``a_{i, i-1}``, the weight on the token just before,
      averaged over rows ``i >= 1``.
    - ``duplicate_token``: ``sum_{j < i, x_j = x_i} a_ij``, the weight on earlier
      occurrences of the current token, averaged over rows that have one.
    - ``induction``: ``sum_{1 <= j < i, x_{j-1} = x_i} a_ij``, the weight on the
      tokens that followed earlier occurrences of the current token (prefix
      matching), averaged over rows that have one.

    On random repeated tokens a score near 1 marks the head; a uniform head
    scores about ``1 / i``.
    """

    name = "patterns"
    default = True
    own_run = True
    metrics = ("previous_token", "duplicate_token", "induction")

    def begin(self, info: CaptureInfo) -> None:
        super().begin(info)
        self.acc = {m: PerHead(info.n_layers, info.n_heads, m) for m in self.metrics}

    def update(self, layer: int, probs: torch.Tensor, rows: slice) -> None:
        b, _, r, nk = probs.shape
        ids = self.info.input_ids.to(probs.device)
        pos = query_positions(rows, r, probs.device)
        d = distances(rows, r, nk, probs.device)
        earlier = d > 0  # [r, Nk]
        q_ids = ids[:, pos]  # [B, r]
        k_ids = ids[:, :nk]  # [B, Nk]
        prev_ids = torch.cat([torch.full_like(k_ids[:, :1], -1), k_ids[:, :-1]], dim=1)
        targets = {
            "previous_token": (d == 1)[None].expand(b, r, nk),
            "duplicate_token": (q_ids[:, :, None] == k_ids[:, None, :]) & earlier,
            "induction": (q_ids[:, :, None] == prev_ids[:, None, :]) & earlier,
        }
        p = probs.float()
        for metric, target in targets.items():
            has = target.any(-1)  # [B, r]
            mass = (p * target[:, None]).sum(-1)  # [B, H, r]
            self.acc[metric].add(
                layer, float(has.sum()), **{metric: (mass * has[:, None]).sum((0, 2))}
            )

    def finish(self) -> list[dict[str, Any]]:
        out = []
        for metric in self.metrics:
            t = self.acc[metric].mean(metric)
            for layer in range(t.shape[0]):
                for head in range(t.shape[1]):
                    out.append(
                        {
                            "analysis": self.name,
                            "layer": layer,
                            "head": head,
                            "metric": metric,
                            "value": float(t[layer, head]),
                        }
                    )
        return out
