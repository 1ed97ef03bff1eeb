"""Based (Arora et al., arXiv:2402.18668): Taylor linear attention plus an exact window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv
from attnlab.core.scan import acc_dtype, causal_scan, orthogonal_gaussian

from ._featuremap import SeededDraws

# Queries per chunk of the exact window (each chunk's keys span C + W - 1 positions).
WINDOW_CHUNK = 32


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x, x_i²/√2, x_i·x_j (i < j)], so phi(q)·phi(k) = 1 + q·k + (q·k)²/2 (> 0).

    The paper's map is [1, x, vec(x xᵀ)/√2] with d'² quadratic features; as (q·k)² =
    sum_i q_i²k_i² + 2 sum_(i<j) q_i q_j k_i k_j, its d'(d'-1)/2 symmetric pairs fold into one
    feature each: the same kernel with 1 + d' + d'(d'+1)/2 features (153 for d' = 16, not 273).
    """
    d = x.shape[-1]
    if x.requires_grad:
        pairs = [x[..., i : i + 1] * x[..., i + 1 :] for i in range(d - 1)]
        square = x * x * math.sqrt(0.5)
        return torch.cat([torch.ones_like(x[..., :1]), x, square, *pairs], dim=-1)
    out = x.new_empty(*x.shape[:-1], 1 + d + d * (d + 1) // 2)  # filled in place
    out[..., 0] = 1.0
    out[..., 1 : d + 1] = x
    torch.mul(x, x, out=out[..., d + 1 : 2 * d + 1]).mul_(math.sqrt(0.5))
    col = 2 * d + 1
    for i in range(d - 1):
        torch.mul(x[..., i : i + 1], x[..., i + 1 :], out=out[..., col : col + d - 1 - i])
        col += d - 1 - i
    return out


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
        """F = 1 + d' + d'(d'+1)/2 features of the (symmetric) Taylor map."""
        d = self.projected_dim(head_dim)
        return 1 + d + d * (d + 1) // 2

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

    def _project(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """x P scale^½: the d'-dim inputs of the Taylor map (q̃·k̃ = q P·k P·scale)."""
        p = self.projection(x.shape[-1])
        if p is not None:
            return x @ (p.to(device=x.device, dtype=x.dtype) * scale**0.5)
        return x * scale**0.5

    def features(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return taylor_features(self._project(x, scale))

    # --- the forms ------------------------------------------------------------------------

    def _with_window(self, q, k, v, far, scale):
        """Combine the Taylor sums over all past keys, ``far`` [B, Hq, N, Dv + 1] (numerator,
        normaliser), with the last W keys: there the Taylor weight is swapped for the exact
        exp(s - m), m = max(0, the largest window score), and the far sums are scaled by
        e^(-m). Queries go in chunks of C; a chunk's window spans C + W - 1 keys (a view of
        the padded keys), one (batch, kv head) at a time, so temporaries stay small.
        """
        b, hq, n, d = q.shape
        hk, dv, w = k.shape[1], v.shape[-1], self.config.window
        g = hq // hk
        c = max(1, min(WINDOW_CHUNK, n))
        pad = (-n) % c
        nc, span = (n + pad) // c, c + w - 1
        t = torch.arange(span, device=q.device)
        rows = torch.arange(c, device=q.device)[:, None]
        first = torch.arange(nc, device=q.device)[:, None, None] * c - (w - 1)  # key of t = 0
        allowed = (t >= rows) & (t <= rows + w - 1) & (t + first >= 0)  # [nc, C, span]
        allowed = allowed[:, None].expand(nc, g, c, span).reshape(nc, g * c, span)
        out = torch.empty(b, hq, n, dv, dtype=far.dtype, device=q.device)
        for bi in range(b):
            for hi in range(hk):
                heads = slice(hi * g, (hi + 1) * g)
                kk = F.pad(k[bi, hi], (0, 0, w - 1, pad))
                vv = F.pad(v[bi, hi], (0, 0, w - 1, pad)).unfold(0, span, c)  # [nc, Dv, span]
                kp = self._project(kk, scale).unfold(0, span, c)
                qq = F.pad(q[bi, heads], (0, 0, 0, pad)).view(g, nc, c, d).transpose(0, 1)
                qq = qq.reshape(nc, g * c, d)
                s = torch.bmm(qq * scale, kk.unfold(0, span, c))  # [nc, G*C, span]
                s = s.masked_fill(~allowed, float("-inf"))
                m = s.amax(-1, keepdim=True).clamp_min(0.0)
                st = torch.bmm(self._project(qq, scale), kp)  # q̃·k̃: the Taylor argument
                taylor = (torch.addcmul(st, st, st, value=0.5) + 1.0).masked_fill(~allowed, 0.0)
                shrink = torch.exp(-m)
                # exp(s - m) - e^(-m)·taylor(s̃): the window's exact weight replaces its Taylor one
                weight = torch.addcmul(torch.exp(s - m), taylor, shrink, value=-1.0)
                f = F.pad(far[bi, heads], (0, 0, 0, pad)).view(g, nc, c, dv + 1)
                f = f.transpose(0, 1).reshape(nc, g * c, dv + 1)
                num = torch.bmm(weight, vv.transpose(1, 2)) + shrink * f[..., :dv]
                den = weight.sum(-1, keepdim=True) + shrink * f[..., dv:]
                res = (num / den).view(nc, g, c, dv).transpose(0, 1).reshape(g, nc * c, dv)
                out[bi, heads] = res[:, :n]
        return out

    def _attend(self, q, k, v, scale, form):
        acc = acc_dtype(q)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        groups = q.shape[1] // k.shape[1]
        w = self.config.window
        if form == "parallel":
            fq, fk = self.features(q, scale), self.features(k, scale)
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
        far, _ = causal_scan(
            q,
            k,
            v,
            chunk=self.config.chunk,
            feature_map=lambda x, query: self.features(x, scale),
            divide=False,
        )
        return self._with_window(q, k, v, far, scale)

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
