"""The base of the kernelised mechanisms: attention through a feature map phi.

``FeatureMapAttention`` computes ``phi(q)``, ``phi(k)`` and hands them to the
shared kernels of :mod:`attnlab.core.scan` in the form ``Config.form`` names
(``chunked``, ``parallel`` or ``recurrent``); it also gives the decoding
state, ``reference()`` (the masked parallel form in float64) and masks:
a key-padding mask (one row for all queries) zeroes ``phi(k)`` of the padded
keys in every form; any other mask is applied to the parallel form, which then
costs O(N²).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from attnlab.core import Mechanism
from attnlab.core.scan import (
    acc_dtype,
    causal_scan,
    init_state,
    linear_attention,
    state_floats,
)

FORMS = ("chunked", "parallel", "recurrent")


class SeededDraws:
    """Random matrices that are a fixed function of (seed, draw, shape).

    The persistent buffer ``draw`` counts explicit redraws, so a state dict
    carries the features; the matrices themselves are a cache rebuilt on demand
    (the head dim is known only at the first call).
    """

    def _init_draws(self) -> None:
        self.register_buffer("draw", torch.zeros((), dtype=torch.long))
        self._cache: dict[tuple, torch.Tensor] = {}

    def _drawn(self, key: tuple, make) -> torch.Tensor:
        full = (*key, int(self.draw))
        if full not in self._cache:
            gen = torch.Generator().manual_seed(
                hash((self.config.seed, *full)) & 0x7FFFFFFFFFFFFFFF
            )
            self._cache = {full: make(gen)}
        return self._cache[full]


def orthogonal_gaussian(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] random features with orthogonal rows in blocks of ``cols``, each row's norm
    drawn from the chi distribution of a Gaussian vector (Performer, arXiv:2009.14794, sec. 4)."""
    g = torch.randn(math.ceil(rows / cols), cols, cols, generator=generator, dtype=torch.float64)
    qmat, r = torch.linalg.qr(g)  # one orthogonal block per `cols` rows
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    blocks = qmat.transpose(-1, -2)
    w = blocks.reshape(-1, cols)[:rows]
    norms = torch.randn(rows, cols, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms[:, None]).float()


class FeatureMapAttention(Mechanism):
    """Linear attention sum_j phi(q_i)·phi(k_j) v_j / sum_j phi(q_i)·phi(k_j).

    A subclass defines ``features(x, scale, *, query) -> phi(x)`` [B, H, N, F]
    (x arrives in float32, or float64) and, when F != D, ``feature_dim(D)``;
    its Config has ``form`` and ``chunk`` (None: :func:`attnlab.core.scan.choose_chunk`).
    """

    forms: ClassVar[tuple[str, ...]] = FORMS
    tiny_config: ClassVar[dict] = {"chunk": 5}
    normalize: ClassVar[bool] = True
    # phi(x) of a token depends on that token alone, so it may be applied to any block of
    # tokens (False when a feature map normalises over the sequence, as Performer's keys do)
    token_features: ClassVar[bool] = True
    # the name of ``features`` among the compiled scan's feature maps (None: not one of them)
    native_feature: ClassVar[str | None] = None

    def feature_dim(self, head_dim: int) -> int:
        """F, the number of features for head dim D."""
        return head_dim

    def _phi(self, q, k, scale):
        acc = acc_dtype(q)
        return self.features(q.to(acc), scale, query=True), self.features(
            k.to(acc), scale, query=False
        )

    def _attend(self, q, k, v, *, causal, mask, scale, form):
        feature_map = None
        if mask is None and self.token_features:  # the chunked scan maps q, k block by block
            fq, fk = q, k

            def feature_map(x, *, query):
                return self.features(x, scale, query=query)

        else:
            fq, fk = self._phi(q, k, scale)
            if mask is not None and mask.shape[-2] == 1 and mask.shape[1] == 1:
                fk = fk * mask[:, :, 0, :, None].to(fk.dtype)  # padding: the key leaves every sum
                mask = None
        return linear_attention(
            fq,
            fk,
            v,
            causal=causal,
            form=form,
            chunk=self.config.chunk,
            mask=mask,
            normalize=self.normalize,
            feature_map=feature_map,
            native_feature=self.native_feature,
        )

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        out = self._attend(q, k, v, causal=causal, mask=mask, scale=scale, form=self.config.form)
        return out.to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The masked parallel (quadratic) form: the definition, in the input's dtype."""
        return self._attend(q, k, v, causal=causal, mask=mask, scale=scale, form="parallel")

    # --- decoding -------------------------------------------------------------------------

    def init_state(
        self, batch, q_heads, kv_heads, head_dim, value_dim, *, dtype=torch.float32, device=None
    ):
        """Empty state: S [B, Hkv, F, Dv] and normaliser z [B, Hkv, F], in float32."""
        return init_state(
            batch,
            kv_heads,
            self.feature_dim(head_dim),
            value_dim,
            normalize=self.normalize,
            dtype=dtype,
            device=device,
        )

    def step(self, q, k, v, state, *, scale=None):
        """Attend t new queries over the state plus t new keys (causal); O(F·Dv) per token."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        fq, fk = self._phi(q, k, scale)
        out, state = causal_scan(fq, fk, v, form="recurrent", state=state, normalize=self.normalize)
        return out.to(q.dtype), state

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: Hkv·F·(Dv + 1), whatever n."""
        return state_floats(
            kv_heads, self.feature_dim(head_dim), value_dim, normalize=self.normalize
        )
