"""Affine-Scaled Attention (Bae et al., arXiv:2602.23057)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from attnlab.core import Mechanism, Spec, register
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv
from attnlab.core.mechanism import KVCacheDecode
from attnlab.core.tiled import tiled_attention

from ._rows import dense_scores, masked_softmax, visible_count, visible_sum


def linear_clipping(x: torch.Tensor) -> torch.Tensor:
    """The paper's scale activation (Eq. 11): 0.1·x + 0.5 clipped to [0, 1]."""
    return (0.1 * x + 0.5).clamp(0.0, 1.0)


@register
class Affine(KVCacheDecode, Mechanism):
    """Affine-scaled softmax weights: ``[α softmax(q kᵀ · scale) + β] v``.

    "Affine-Scaled Attention: Towards Flexible and Stable Transformer Attention"
    (Bae et al., arXiv:2602.23057), Sec. 3.2, Eqs. 6-9, 11. For query i of head h::

        α_i = linear_clipping(w_h · q_i + b_h)          (Eq. 7, Eq. 11)
        β_i = (α_ma,h - α_i) / N_i                       (Eq. 8)
        out_i = α_i · sum_j p_ij v_j + β_i · sum_j v_j   (Eq. 6, sums over visible keys)

    α is an input-dependent, per-query and per-head scale of the softmax
    weights p, and β the bias that pulls the row's total weight
    (``α_i + N_i β_i = α_ma``) back to the moving average α_ma of α, kept per
    head as in Eq. 9: ``α_ma ← ρ α_ma + (1 - ρ) mean(α)`` over the batch, updated
    in training mode only (``Config.momentum`` = ρ, 0.9 in the paper).

    Choices behind the fixed ``forward(q, k, v)`` contract, where the layer's
    hidden states X are not available: α is computed from the query (q = X W_q
    is a linear image of X, so ``w_h · q_i`` is the paper's gate W_α X restricted
    to that image); N_i is the number of keys query i may attend (the key
    length when nothing is masked, the causal prefix otherwise), so that the
    causal form stays causal and decoding equals the parallel pass. The paper
    starts α_ma at 0; here it starts at the initial α (``Config.init_alpha``),
    and with the defaults (α = 1, gate weights 0) an untrained mechanism is
    exactly softmax attention, which :meth:`limit` returns.

    The gate parameters are per head, sized from ``heads`` and ``head_dim`` or,
    when these are None, on the first call or from a loaded state dict
    (size them before building an optimiser). The softmax part runs on the
    shared tiled kernel; the β part is a running sum of values, O(N) memory.
    """

    spec = Spec(
        name="affine",
        family="exact",
        title="Affine-Scaled Attention (Bae et al.)",
        paper="arXiv:2602.23057",
        exact=False,
        decode=True,
        complexity="O(N²·D)",
    )
    tiny_config: ClassVar[dict] = {
        "init_alpha": 0.7,
        "init_std": 0.5,
        "block_q": 7,
        "block_k": 5,
    }

    @dataclass
    class Config:
        heads: int | None = None  # query heads; None: sized on the first call
        head_dim: int | None = None  # D; None: sized on the first call
        momentum: float = option(0.9, low=0, high=1)  # ρ of the moving average of α (Eq. 9)
        init_alpha: float = option(1.0, low=0, high=1)  # α (and α_ma) at initialisation
        init_std: float = option(0.0, low=0)  # std of the initial gate weights w_h
        block_q: int = 512
        block_k: int = 1024

    def __init__(self, **config):
        super().__init__(**config)
        self.register_parameter("gate_weight", None)  # w_h: [H, D]
        self.register_parameter("gate_bias", None)  # b_h: [H]
        self.register_buffer("alpha_ma", None)  # α_ma: [H]
        if self.config.heads is not None and self.config.head_dim is not None:
            self._build(self.config.heads, self.config.head_dim, torch.float32, None)

    def _build(self, heads: int, head_dim: int, dtype, device) -> None:
        """Create the gate so that α starts at ``init_alpha`` (plus noise if ``init_std``)."""
        cfg = self.config
        weight = torch.randn(heads, head_dim, dtype=dtype, device=device) * cfg.init_std
        # linear_clipping(b) = init_alpha
        bias = torch.full((heads,), 10.0 * cfg.init_alpha - 5.0, dtype=dtype, device=device)
        self.gate_weight = nn.Parameter(weight)
        self.gate_bias = nn.Parameter(bias)
        self.alpha_ma = torch.full((heads,), cfg.init_alpha, dtype=dtype, device=device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a gate not sized yet takes its sizes from the checkpoint
        saved = state_dict.get(prefix + "gate_weight")
        if self.gate_weight is None and saved is not None:
            self._build(saved.shape[0], saved.shape[1], saved.dtype, saved.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if self.gate_weight is not None and (
            q.shape[1] != self.gate_weight.shape[0] or q.shape[3] != self.gate_weight.shape[1]
        ):
            h, d = self.gate_weight.shape
            reasons.append(
                f"q: expected Hq={h} heads of head dim D={d} (the size of this mechanism's "
                f"gate), got Hq={q.shape[1]}, D={q.shape[3]}"
            )
        return reasons

    def limit(self, n):
        """Untrained with α = 1 and gate weights 0: β = 0 and the output is softmax."""
        return dataclasses.replace(self.config, init_alpha=1.0, init_std=0.0)

    def alpha(self, q: torch.Tensor) -> torch.Tensor:
        """α for every query: [B, H, Nq, 1] in q's dtype (float32 for half inputs)."""
        acc = torch.promote_types(q.dtype, torch.float32)
        if self.gate_weight is None:
            self._build(q.shape[1], q.shape[3], acc, q.device)
        w = self.gate_weight.to(acc)
        logit = torch.einsum("bhnd,hd->bhn", q.to(acc), w) + self.gate_bias.to(acc)[:, None]
        return linear_clipping(logit)[..., None]

    def _moving_average(self, alpha: torch.Tensor) -> torch.Tensor:
        """α_ma per head as [H, 1, 1]; in training mode, first updated with this batch (Eq. 9).

        The batch mean is taken over the finite α only (a NaN query gives a NaN α), and a
        head with none keeps its α_ma, so one bad input never leaves the statistic NaN."""
        if self.training:
            rho = self.config.momentum
            a = alpha.detach().to(self.alpha_ma.dtype)
            finite = torch.isfinite(a)
            count = finite.sum(dim=(0, 2, 3))
            total = torch.where(finite, a, 0.0).sum(dim=(0, 2, 3))
            batch_mean = total / count.clamp_min(1)
            moved = self.alpha_ma * rho + (1 - rho) * batch_mean
            self.alpha_ma.copy_(torch.where(count > 0, moved, self.alpha_ma))
        return self.alpha_ma.to(alpha.dtype)[:, None, None]

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        nq, nk = q.shape[2], k.shape[2]
        alpha = self.alpha(q)
        alpha_ma = self._moving_average(alpha)
        acc = alpha.dtype
        soft = tiled_attention(
            q,
            k,
            v,
            scale=scale,
            causal=causal,
            mask=mask,
            block_q=self.config.block_q,
            block_k=self.config.block_k,
        )
        counts = visible_count(mask, causal, nq, nk, dtype=acc, device=q.device)
        values = repeat_kv(v, q.shape[1] // k.shape[1]).to(acc)
        total = visible_sum(values, mask, causal, nq)
        mean = torch.where(counts > 0, total / counts.clamp_min(1.0), 0.0)
        out = alpha * soft.to(acc) + (alpha_ma - alpha) * mean
        return out.to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """Eq. 6 densely: (α p + β on the allowed keys) @ v, with this module's gate and α_ma."""
        scores, allowed, v = dense_scores(q, k, v, causal=causal, mask=mask, scale=scale)
        alpha = self.alpha(q).to(q.dtype)
        alpha_ma = self.alpha_ma.to(q.dtype)[:, None, None]
        n = allowed.sum(dim=-1, keepdim=True).to(q.dtype)
        beta = (alpha_ma - alpha) / n.clamp_min(1.0)
        weights = alpha * masked_softmax(scores, allowed) + beta * allowed
        return weights @ v
