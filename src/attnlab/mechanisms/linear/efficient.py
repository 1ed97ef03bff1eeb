"""Efficient Attention (Shen et al., arXiv:1812.01243): two softmaxes, then K^T V first.

Compared with cmsflash/efficient-attention (EfficientAttention in
efficient_attention.py): attnlab agrees, per head a softmax of the keys over positions
and of the queries over channels, then keys-values context first, no scale; the 1x1
convolutions, the reprojection and the residual belong to the authors' layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Mechanism, Spec, register
from attnlab.core.scan import acc_dtype, linear_attention


@register
class Efficient(Mechanism):
    """Efficient attention, after Shen et al. (arXiv:1812.01243, eq. 2-3).

    E(Q, K, V) = rho_q(Q) (rho_k(K)ᵀ V), rho_q a softmax over the feature axis
    of each query, rho_k a softmax over the sequence axis of each key feature:
    each of the D features is a global template summarising the values, and
    each query mixes the templates. Rows of rho_q and columns of rho_k sum to
    1, so no further normaliser is needed. ``scale`` does not enter (the paper
    has none). Non-causal only: the paper defines the key softmax over the
    whole sequence, so a causal form would be a different model (a per-prefix
    softmax); the ``chunked`` form is the linear one (the D x Dv context once),
    ``parallel`` the N x N matrix of the same product.
    """

    spec = Spec(
        name="efficient",
        family="linear",
        title="Efficient attention: softmax over query features and key positions",
        paper="arXiv:1812.01243",
        exact=False,
        causal=False,
        mask=False,
        complexity="O(N·D²)",
    )
    forms: ClassVar[tuple[str, ...]] = ("chunked", "parallel")

    @dataclass
    class Config:
        form: str = "chunked"

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if causal:
            reasons[0] = (
                "causal: efficient attention normalises each key feature over the whole "
                "sequence (Shen et al. define no causal form); pass causal=False"
            )
        return reasons

    def _attend(self, q, k, v, form):
        acc = acc_dtype(q)
        fq = torch.softmax(q.to(acc), dim=-1)
        fk = torch.softmax(k.to(acc), dim=-2)
        return linear_attention(fq, fk, v, causal=False, form=form, normalize=False)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        return self._attend(q, k, v, self.config.form).to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """rho_q(Q) rho_k(K)ᵀ as an N x N matrix, times V."""
        return self._attend(q, k, v, "parallel")
