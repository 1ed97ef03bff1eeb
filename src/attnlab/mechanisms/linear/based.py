"""Based (Arora et al., arXiv:2402.18668): Taylor linear attention plus an exact window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv
from attnlab.core.scan import acc_dtype, choose_chunk, linear_attention, orthogonal_gaussian

from ._featuremap import SeededDraws


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x, vec(x xᵀ)/sqrt(2)], so phi(q)·phi(k) = 1 + q·k + (q·k)²/2 (> 0 always)."""
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


@register
class Based(SeededDraws, Mechanism):
    """Based, after Arora et al., "Simple linear attention language models balance the
    recall-throughput tradeoff" (arXiv:2402.18668, sec. 4).

    Two parts of one causal attention: keys inside the last ``window``
    positions get exact softmax weights exp(q·k·scale); keys further back get
    the 2nd-order Taylor approximation 1 + s + s²/2 of exp(s) through the
    feature map [1, x, x⊗x/√2] (always positive), as a linear-attention state.
    Both share one normaliser (rescaled by the window's largest score, so
    nothing overflows). In the paper q and k are first projected to a small
    feature dimension d' = 16 by learned maps; here ``feature_dim`` (None: all
    D) is reached by a fixed seeded random orthogonal projection scaled to
    preserve q·k in expectation, which keeps F = 1 + d' + d'² small. The paper
    places the two in separate layers of a hybrid; as one operator they are
    the exact local part and the approximate far part of the same softmax.
    Causal only (a language model), no cross form, no mask.
    """

    spec = Spec(
        name="based",
        family="linear",
        title="Based: 2nd-order Taylor linear attention + exact sliding window",
        paper="arXiv:2402.18668",
        exact=False,
        noncausal=False,
        cross=False,
        mask=False,
        decode=True,
        complexity="O(N·(d'²·D + W·D))",
    )
    forms: ClassVar[tuple[str, ...]] = ("chunked", "parallel", "recurrent")
    tiny_config: ClassVar[dict] = {"chunk": 5, "window": 4, "feature_dim": 4}

    @dataclass
    class Config:
        window: int = 64
        feature_dim: int | None = 16
        seed: int = 0
        form: str = "chunked"
        chunk: int | None = None

        def __post_init__(self):
            check_positive_int("window", self.window)
            if self.feature_dim is not None:
                check_positive_int("feature_dim", self.feature_dim)
            if self.chunk is not None:
                check_positive_int("chunk", self.chunk)

    def __init__(self, **config):
        super().__init__(**config)
        self._init_draws()

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if not causal:
            reasons[0] = (
                "causal: Based is a causal language-model attention (sliding window over the "
                "past); pass causal=True"
            )
        return reasons

    def projected_dim(self, head_dim: int) -> int:
        d = self.config.feature_dim
        return head_dim if d is None or d >= head_dim else d

    def feature_dim(self, head_dim: int) -> int:
        """F = 1 + d' + d'² features of the Taylor map."""
        d = self.projected_dim(head_dim)
        return 1 + d + d * d

    def projection(self, head_dim: int) -> torch.Tensor | None:
        """The fixed [D, d'] projection (orthonormal columns times sqrt(D/d')), None for d' = D."""
        d = self.projected_dim(head_dim)
        if d == head_dim:
            return None

        def make(gen):
            w = orthogonal_gaussian(d, head_dim, gen)
            w = w / w.norm(dim=1, keepdim=True)
            return (w.T * math.sqrt(head_dim / d)).contiguous()

        return self._drawn((head_dim, d), make)

    def features(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        p = self.projection(x.shape[-1])
        if p is not None:
            x = x @ p.to(device=x.device, dtype=x.dtype)
        return taylor_features(x * scale**0.5)

    # --- the forms ------------------------------------------------------------------------

    def _window(self, q, k, v, scale, chunk):
        """Exact exp weights over the last W keys: (sum e·v, sum e, shift m), chunk by chunk."""
        b, h, n, d = q.shape
        w = self.config.window
        c = max(1, min(chunk, n))
        pad = (-n) % c
        nc = (n + pad) // c
        qc = torch.nn.functional.pad(q, (0, 0, 0, pad)).reshape(b, h, nc, c, d)
        kw = torch.nn.functional.pad(k, (0, 0, w - 1, pad)).unfold(2, c + w - 1, c)
        vw = torch.nn.functional.pad(v, (0, 0, w - 1, pad)).unfold(2, c + w - 1, c)
        s = qc @ kw * scale  # [B, H, nc, C, C+W-1]
        t = torch.arange(c + w - 1, device=q.device)
        r = torch.arange(c, device=q.device)[:, None]
        start = torch.arange(nc, device=q.device)[:, None, None] * c
        allowed = (t >= r) & (t <= r + w - 1) & (t + start >= w - 1)
        s = s.masked_fill(~allowed, float("-inf"))
        m = s.amax(-1, keepdim=True).clamp_min(0.0)
        e = torch.exp(s - m)
        num = (e @ vw.transpose(-1, -2)).reshape(b, h, nc * c, -1)[:, :, :n]
        den = e.sum(-1, keepdim=True).reshape(b, h, nc * c, 1)[:, :, :n]
        return num, den, m.reshape(b, h, nc * c, 1)[:, :, :n]

    def _attend(self, q, k, v, scale, form):
        acc = acc_dtype(q)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        fq, fk = self.features(q, scale), self.features(k, scale)
        groups = q.shape[1] // k.shape[1]
        w = self.config.window
        if form == "parallel":
            kk, vv, fkk = repeat_kv(k, groups), repeat_kv(v, groups), repeat_kv(fk, groups)
            n = q.shape[2]
            s = q @ kk.transpose(-1, -2) * scale
            rows = torch.arange(n, device=q.device)[:, None]
            cols = torch.arange(n, device=q.device)[None, :]
            near = (cols <= rows) & (cols > rows - w)
            far = cols <= rows - w
            m = s.masked_fill(~near, float("-inf")).amax(-1, keepdim=True).clamp_min(0.0)
            weights = torch.where(near, torch.exp(s - m), 0.0) + torch.where(
                far, (fq @ fkk.transpose(-1, -2)) * torch.exp(-m), 0.0
            )
            return (weights @ vv) / weights.sum(-1, keepdim=True)
        if form == "recurrent":
            state = self.init_state(
                q.shape[0],
                q.shape[1],
                k.shape[1],
                q.shape[-1],
                v.shape[-1],
                dtype=acc,
                device=q.device,
            )
            return self._steps(q, k, v, state, scale)[0]
        chunk = self.config.chunk or choose_chunk(q.shape[2], fq.shape[-1])
        far = linear_attention(
            fq,
            fk,
            torch.cat([v, torch.ones_like(v[..., :1])], dim=-1),
            causal=True,
            chunk=self.config.chunk,
            normalize=False,
            offset=-w,
        )
        num, den, m = self._window(q, repeat_kv(k, groups), repeat_kv(v, groups), scale, chunk)
        shrink = torch.exp(-m)
        return (far[..., :-1] * shrink + num) / (far[..., -1:] * shrink + den)

    def forward(self, q, k, v, *, causal=True, mask=None, scale=None):
        return self._attend(q, k, v, scale, self.config.form).to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The N x N weights (exp inside the window, Taylor beyond it), densely."""
        return self._attend(q, k, v, scale, "parallel")

    # --- decoding -------------------------------------------------------------------------

    def init_state(
        self, batch, q_heads, kv_heads, head_dim, value_dim, *, dtype=torch.float32, device=None
    ):
        """Far state S [B, Hkv, F, Dv], z [B, Hkv, F]; ring of the last W keys and values."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        f, w = self.feature_dim(head_dim), self.config.window
        return {
            "S": torch.zeros(batch, kv_heads, f, value_dim, dtype=acc, device=device),
            "z": torch.zeros(batch, kv_heads, f, dtype=acc, device=device),
            "k": torch.zeros(batch, kv_heads, w, head_dim, dtype=acc, device=device),
            "v": torch.zeros(batch, kv_heads, w, value_dim, dtype=acc, device=device),
            "n": torch.zeros((), dtype=torch.long, device=device),
        }

    def _steps(self, q, k, v, state, scale):
        w = self.config.window
        groups = q.shape[1] // k.shape[1]
        b, hq, t, d = q.shape
        outs = []
        for i in range(t):
            n = int(state["n"])
            slot = n % w
            ring_k, ring_v = state["k"].clone(), state["v"].clone()
            far = {"S": state["S"], "z": state["z"]}
            if n >= w:  # the oldest key leaves the window for the Taylor state
                old_k, old_v = ring_k[:, :, slot : slot + 1], ring_v[:, :, slot : slot + 1]
                fk_old = self.features(old_k, scale)
                far = {
                    "S": far["S"] + fk_old.transpose(-1, -2) @ old_v,
                    "z": far["z"] + fk_old[:, :, 0],
                }
            ring_k[:, :, slot] = k[:, :, i]
            ring_v[:, :, slot] = v[:, :, i]
            qi = q[:, :, i : i + 1]
            s = qi @ repeat_kv(ring_k, groups).transpose(-1, -2) * scale  # [B, Hq, 1, W]
            s = s.masked_fill(torch.arange(w, device=q.device) > n, float("-inf"))
            m = s.amax(-1, keepdim=True).clamp_min(0.0)
            e = torch.exp(s - m)
            fq = self.features(qi, scale).reshape(b, hq // groups, groups, self.feature_dim(d))
            shrink = torch.exp(-m)
            far_num = (fq @ far["S"]).reshape(b, hq, 1, -1)
            far_den = (fq * far["z"][:, :, None]).sum(-1).reshape(b, hq, 1, 1)
            num = far_num * shrink + e @ repeat_kv(ring_v, groups)
            den = far_den * shrink + e.sum(-1, keepdim=True)
            outs.append(num / den)
            state = {**far, "k": ring_k, "v": ring_v, "n": state["n"] + 1}
        return torch.cat(outs, dim=2), state

    def step(self, q, k, v, state, *, scale=None):
        """t new tokens: each key enters the window ring, the oldest leaves it for the
        Taylor state; O(W·D + F·Dv) per token whatever the position."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        acc = state["S"].dtype
        out, state = self._steps(q.to(acc), k.to(acc), v.to(acc), state, scale)
        return out.to(q.dtype), state

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: Hkv·(F·(Dv+1) + W·(D+Dv)), whatever n."""
        f, w = self.feature_dim(head_dim), self.config.window
        return kv_heads * (f * (value_dim + 1) + w * (head_dim + value_dim))
