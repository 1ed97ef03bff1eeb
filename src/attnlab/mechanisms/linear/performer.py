"""FAVOR+ with positive orthogonal random features (Choromanski et al., arXiv:2009.14794).

Compared with google-research/google-research (performer/fast_attention/jax,
nonnegative_softmax_kernel_feature_creator and GaussianOrthogonalRandomMatrix): the same
positive features on x·d^(-1/4), the same stabilisers (each query's largest feature, the
largest over a head's keys and features), orthogonal blocks with chi-distributed row
norms; the authors add 1e-6 to every feature, which attnlab leaves out, and redraw
features in training, which attnlab leaves to redraw_features().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Spec, register
from attnlab.core.config import option
from attnlab.core.scan import causal_scan

from ._featuremap import FeatureMapAttention, SeededDraws, orthogonal_gaussian


@register
class Performer(SeededDraws, FeatureMapAttention):
    """Performer's FAVOR+ ("Rethinking Attention with Performers", arXiv:2009.14794, sec. 2-4).

    softmax(q kᵀ·scale) is replaced by phi(q)·phi(k) with the positive random
    features phi(x) = exp(w_m·x - |x|²/2) / sqrt(M), x scaled by scale^½, whose
    expectation is exp(q·k·scale) exactly (Lemma 1); the M rows w_m are
    Gaussian, orthogonal in blocks of D and renormalised (sec. 4). The features
    are drawn once from ``seed`` and stay fixed; ``redraw_features()`` draws
    new ones (the paper redraws periodically in training).

    Stabilisers that cancel in the ratio: each query's features are divided by
    their largest one; all keys of a head by the largest key feature (in
    decoding, a running maximum with the state rescaled when it grows), so no
    feature overflows at any length.
    """

    spec = Spec(
        name="performer",
        family="linear",
        title="Performer: FAVOR+ positive orthogonal random features",
        paper="arXiv:2009.14794",
        exact=False,
        decode=True,
        complexity="O(N·M·D)",
    )
    tiny_config: ClassVar[dict] = {"chunk": 5, "features": 16}
    positive_scale: ClassVar[bool] = True  # features of q·sqrt(scale), k·sqrt(scale)
    token_features: ClassVar[bool] = False  # keys share one stabiliser over the sequence

    @dataclass
    class Config:
        features: int = 256
        seed: int = option(0, low=0)
        form: str = "chunked"
        chunk: int | None = None

    def __init__(self, **config):
        super().__init__(**config)
        self._init_draws()

    def redraw_features(self) -> None:
        """Draw a new set of random features (deterministic in seed and the number of redraws)."""
        self.draw += 1

    def projection(self, head_dim: int) -> torch.Tensor:
        """The random features W [M, D] in use for head dim D."""
        m = self.config.features
        return self._drawn((m, head_dim), lambda g: orthogonal_gaussian(m, head_dim, g))

    def feature_dim(self, head_dim):
        return self.config.features

    def _log_features(self, x, scale):
        x = x * scale**0.5
        w = self.projection(x.shape[-1]).to(device=x.device, dtype=x.dtype)
        return x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True) - 0.5 * math.log(w.shape[0])

    def features(self, x, scale, *, query):
        logf = self._log_features(x, scale)
        if query:
            return torch.exp(logf - logf.amax(-1, keepdim=True).detach())
        return torch.exp(logf - logf.amax((-1, -2), keepdim=True).detach())

    def init_state(
        self, batch, q_heads, kv_heads, head_dim, value_dim, *, dtype=torch.float32, device=None
    ):
        """S [B, Hkv, M, Dv], z [B, Hkv, M] and the running key stabiliser m [B, Hkv]."""
        state = super().init_state(
            batch, q_heads, kv_heads, head_dim, value_dim, dtype=dtype, device=device
        )
        state["m"] = torch.full(
            (batch, kv_heads), float("-inf"), dtype=state["S"].dtype, device=device
        )
        return state

    def step(self, q, k, v, state, *, scale=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        acc = state["S"].dtype
        fq = self.features(q.to(acc), scale, query=True)
        logk = self._log_features(k.to(acc), scale)
        m = torch.maximum(state["m"], logk.amax((-1, -2)))
        shrink = torch.exp(state["m"] - m)
        fk = torch.exp(logk - m[..., None, None])
        inner = {"S": state["S"] * shrink[..., None, None], "z": state["z"] * shrink[..., None]}
        out, inner = causal_scan(fq, fk, v, form="recurrent", state=inner)
        return out.to(q.dtype), {**inner, "m": m}
