"""MoSA: Mixture of Sparse Attention by expert-choice routing (Piękos et al., arXiv:2505.00315).

Compared with piotrpiekos/MoSA (PureMoSA): expert-choice top-k per head, softmax among
the chosen tokens with the original-order causal mask, output scaled by the router
score; the router reads the head's key instead of the layer input, as the class
docstring explains.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from attnlab.core import AttnInputError, Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv

from ._routed import NEG_INF, acc_dtype, softmax_rows


@register
class MoSA(Mechanism):
    """Mixture of Sparse Attention, after "Mixture of Sparse Attention: Content-Based
    Learnable Sparse Attention via Expert-Choice Routing" (Piękos, Csordás and
    Schmidhuber, arXiv:2505.00315).

    Every head is an expert that chooses its own ``tokens`` positions: a
    router scores each position, r_t = sigmoid(w_h · k_t), and the head keeps
    the ``tokens`` best (expert choice, so every head gets exactly that many).
    Softmax attention runs among the chosen positions only (k x k), and the
    result at a chosen position is multiplied by its router score (which is
    what trains the router; ``router_scale=False`` drops it); positions a head
    did not choose get zeros from it. The paper routes on the layer input;
    an attention operator sees only q, k and v, so here the router reads the
    head's key. Its weights ``router`` [Hq, D] are created on the first call
    (seeded by ``seed``, so two instances with one seed agree).

    ``causal=True`` is the paper's autoregressive form (its language models
    are trained with it, and the authors' code, piotrpiekos/MoSA ``PureMoSA``,
    does the same): the choice is still the top ``tokens`` over the whole
    sequence, and among the chosen tokens the mask M_ij = 0 iff I_j <= I_i
    (original positions) applies. So query i attends only chosen keys at
    positions <= i and never reads a later value, query or key through the
    attention; but whether i and its earlier keys are chosen depends on the
    router scores of later positions (expert choice ranks the whole
    sequence). The output of query i is thus independent of later values
    and queries, not of later keys (``Spec.causality = "values"``). The
    authors' code has no decoding path for this choice, so there is no
    ``step``.
    """

    spec = Spec(
        name="mosa",
        family="sparse",
        title="MoSA: mixture of sparse attention (expert-choice token routing)",
        paper="arXiv:2505.00315",
        exact=False,
        causality="values",
        cross=False,
        complexity="O(N·D + k²·D) per head",
    )
    tiny_config: ClassVar[dict] = {"tokens": 12}

    @dataclass
    class Config:
        tokens: int = 256
        router_scale: bool = True
        seed: int = option(0, low=0)

        def __post_init__(self):
            check_positive_int("tokens", self.tokens)

    def __init__(self, **config):
        super().__init__(**config)
        self.router: nn.Parameter | None = None

    def _router(self, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            gen = torch.Generator().manual_seed(self.config.seed)
            w = torch.randn(heads, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
            self.router = nn.Parameter(w.to(dtype=like.dtype, device=like.device))
        if tuple(self.router.shape) != (heads, dim):
            raise AttnInputError(
                f"q: this MoSA router was built for {self.router.shape[0]} heads of dim "
                f"{self.router.shape[1]}, got {heads} heads of dim {dim}"
            )
        return self.router

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if self.router is not None and tuple(self.router.shape) != (q.shape[1], q.shape[-1]):
            reasons.append(
                f"q: this MoSA router was built for {self.router.shape[0]} heads of dim "
                f"{self.router.shape[1]}, got {q.shape[1]} heads of dim {q.shape[-1]}"
            )
        return reasons

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        b, h, n, d = q.shape
        groups = h // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        acc = acc_dtype(q.dtype)
        w = self._router(h, d, q)
        r = torch.sigmoid(torch.einsum("bhnd,hd->bhn", k, w.to(k.dtype)).to(acc))
        kk = min(self.config.tokens, n)
        with torch.no_grad():
            idx = r.topk(kk, dim=-1).indices.sort(dim=-1).values  # [B, H, k], in order
        gather = idx[..., None]
        qs = q.gather(2, gather.expand(-1, -1, -1, d))
        ks = k.gather(2, gather.expand(-1, -1, -1, d))
        vs = v.gather(2, gather.expand(-1, -1, -1, v.shape[-1]))
        s = (qs @ ks.transpose(-1, -2)).to(acc) * scale  # [B, H, k, k]
        if causal:  # the paper's M: chosen token i sees chosen token j when I_j <= I_i
            s = s.masked_fill(idx[..., :, None] < idx[..., None, :], NEG_INF)
        if mask is not None:
            full = mask.expand(b, h, n, n)  # a view: nothing is materialised
            bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
            hi = torch.arange(h, device=q.device).view(1, h, 1, 1)
            s = s.masked_fill(~full[bi, hi, idx[..., :, None], idx[..., None, :]], NEG_INF)
        o = softmax_rows(s) @ vs.to(acc)
        if self.config.router_scale:
            o = o * r.gather(2, idx)[..., None]
        out = torch.zeros(b, h, n, v.shape[-1], dtype=acc, device=q.device)
        out = out.scatter(2, gather.expand(-1, -1, -1, v.shape[-1]), o)
        return out.to(q.dtype)

    def limit(self, n):
        """Every head keeps every token, without the router factor."""
        return dataclasses.replace(self.config, tokens=n, router_scale=False)

    def density(self, nq: int, nk: int, causal: bool = False) -> float:
        """(tokens / N)² of the pairs per head; causal: the chosen pairs j <= i,
        tokens·(tokens + 1)/2 of them."""
        kk = min(self.config.tokens, nq, nk)
        pairs = kk * (kk + 1) / 2 if causal else kk * kk
        return pairs / (nq * nk)
