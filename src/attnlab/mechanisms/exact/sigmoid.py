"""Sigmoid attention with the -log(n) bias (Ramapuram et al., arXiv:2409.04431).

Compared with apple/ml-sigmoid-attention (the Attention layer of its attention_simulator
and FlashSigmoid): attnlab agrees, sigmoid(q k^T scale + b) v with masked logits at -inf
and no normalisation over keys; the authors set b as a constant of the layer (-log of
the training length), which is Config.length here, and attnlab falls back to the call's
Nk only when no length is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.mechanism import KVCacheDecode
from attnlab.core.tiled import tiled_attention

from ._rows import dense_scores


@register
class Sigmoid(KVCacheDecode, Mechanism):
    """``out_i = sum_j sigmoid(q_i·k_j·scale + b) v_j`` with ``b = -log(n)``.

    "Theory, Analysis, and Best Practices for Sigmoid Self-Attention"
    (Ramapuram et al., arXiv:2409.04431): the softmax is replaced by an
    elementwise sigmoid with no normalisation over keys (Sec. 2); the bias
    ``b = -log(n)``, n the sequence length, keeps the attention norm of order
    one early in training, the paper's main best practice (Sec. 3, Sec. 5). It is a different model
    from softmax attention, not an approximation of it.

    ``n`` is ``Config.length`` when given, else the number of keys Nk of the
    call. A model trained at a fixed context uses one n for every position; set
    ``length`` to it to decode: ``step`` then equals the causal parallel pass
    (with ``length=None`` a cached step would see a growing Nk, so decoding
    requires ``length``). Masked keys get weight zero, and a query that sees no
    key gives zeros. Computed on the shared tiled kernel (the paper's
    FlashSigmoid, Sec. 4, is the fused-kernel form of the same sum).
    """

    spec = Spec(
        name="sigmoid",
        family="exact",
        title="Sigmoid attention with bias -log(n) (Ramapuram et al.)",
        paper="arXiv:2409.04431",
        exact=False,
        decode=True,
        complexity="O(N²·D)",
    )
    tiny_config: ClassVar[dict] = {"length": 24, "block_q": 7, "block_k": 5}

    @dataclass
    class Config:
        length: int | None = None  # n in b = -log(n); None: the call's Nk
        block_q: int = 512
        block_k: int = 1024

    def bias(self, nk: int) -> float:
        """The sigmoid bias ``b = -log(n)`` for a call with ``nk`` keys."""
        return -math.log(self.config.length or nk)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        b = self.bias(k.shape[2])
        return tiled_attention(
            q,
            k,
            v,
            scale=scale,
            causal=causal,
            mask=mask,
            weight=lambda s: torch.sigmoid(s + b),
            normalise=False,
            block_q=self.config.block_q,
            block_k=self.config.block_k,
        )

    def reference(self, q, k, v, *, causal, mask, scale):
        """The definition, densely: sigmoid(q kᵀ · scale - log n) on allowed keys, times v."""
        scores, allowed, v = dense_scores(q, k, v, causal=causal, mask=mask, scale=scale)
        weights = torch.sigmoid(scores + self.bias(k.shape[2])) * allowed
        return weights @ v

    def step(self, q, k, v, state, *, scale=None):
        if self.config.length is None:
            raise AttnInputError(
                "length: decoding needs a fixed n for the bias -log(n); build the mechanism "
                "with length=<the context length> (got length=None, which uses each call's Nk)"
            )
        return super().step(q, k, v, state, scale=scale)
