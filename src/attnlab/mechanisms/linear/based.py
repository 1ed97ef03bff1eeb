"""Based (Arora et al., arXiv:2402.18668): Taylor linear attention plus an exact window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.blocks import sliding_view
from attnlab.core.checks import check_positive_int
from attnlab.core.masks import repeat_kv
from attnlab.core.scan import acc_dtype, block_plan, choose_chunk, orthogonal_gaussian

from ._featuremap import SeededDraws


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x, x_i²/√2, x_i·x_j (i < j)], so phi(q)·phi(k) = 1 + q·k + (q·k)²/2 (> 0).

    The paper's map is [1, x, vec(x xᵀ)/√2] with d'² quadratic features; as (q·k)² =
    sum_i q_i²k_i² + 2 sum_(i<j) q_i q_j k_i k_j, its d'(d'-1)/2 symmetric pairs fold into one
    feature each: the same kernel with 1 + d' + d'(d'+1)/2 features (153 for d' = 16, not 273).
    Returns [..., F] (a transposed view of :func:`taylor_feature_rows`).
    """
    return taylor_feature_rows(x.transpose(-1, -2)).transpose(-1, -2)


def taylor_feature_rows(xt: torch.Tensor) -> torch.Tensor:
    """:func:`taylor_features` with the feature axis second to last: xt [..., d', T] ->
    [..., F, T]. Each feature is then a contiguous row of T products (a few long vector
    operations, not many narrow ones), and phi(k)ᵀ v is a plain matrix product."""
    d = xt.shape[-2]
    if xt.requires_grad:
        pairs = [xt[..., i : i + 1, :] * xt[..., i + 1 :, :] for i in range(d - 1)]
        square = xt * xt * math.sqrt(0.5)
        return torch.cat([torch.ones_like(xt[..., :1, :]), xt, square, *pairs], dim=-2)
    out = xt.new_empty(*xt.shape[:-2], 1 + d + d * (d + 1) // 2, xt.shape[-1])  # in place
    out[..., 0, :] = 1.0
    out[..., 1 : d + 1, :] = xt
    torch.mul(xt, xt, out=out[..., d + 1 : 2 * d + 1, :]).mul_(math.sqrt(0.5))
    row = 2 * d + 1
    for i in range(d - 1):
        torch.mul(
            xt[..., i : i + 1, :], xt[..., i + 1 :, :], out=out[..., row : row + d - 1 - i, :]
        )
        row += d - 1 - i
    return out


# Chunks per block: based's per-block work is many small products, so fewer, larger blocks
# (the scan's default is 32). Measured with C=64 at N=16384 (B1 H8 D64, min of 5 ms,
# three rounds): 32 chunks 298, 320, 347; 64 chunks 266, 285, 276.
BLOCK_CHUNKS = 64


def _padded(x: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """x [..., T, D] with ``front`` and ``back`` zero rows (x itself when there are none)."""
    return F.pad(x, (0, 0, front, back)) if front or back else x


def _windows(x: torch.Tensor, nb: int, c: int, span: int) -> torch.Tensor:
    """Overlapping views [X, nb, span, D] of x [X, (nb + L)·C, D]: chunk c's window starts
    at row c·C (the block engine's sliding view, no copy)."""
    blocked = x.view(x.shape[0], 1, -1, c, x.shape[-1])
    return sliding_view(blocked, 0, nb, span, c)[:, 0]


def _window_softmax(q, k, v, bias, scale, grad):
    """(softmax(q kᵀ·scale + bias) v, its log-sum-exp [..., 1]) over each chunk's window:
    without autograd torch's fused CPU kernel (which returns the log-sum-exp; it needs
    v as wide as q), else the same in plain operations."""
    if not grad and q.device.type == "cpu" and v.shape[-1] == q.shape[-1]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias, scale=scale
        )[:2]
        return out, lse[..., None]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(s - lse), v), lse


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
        self._masks: dict[tuple, list] = {}

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

    def _lag_masks(self, c: int, dtype, device):
        """Masks of a chunk's local keys, chunks c - L .. c for query chunk c (L = (W + C -
        2) // C, the last lag that reaches into the window), by the distance d = i - j:
        ``exact`` [C, (L + 1)·C] an additive bias, 0 where 0 <= d < W, -inf elsewhere; and
        per lag l the [C, C] float mask of d >= W (the Taylor weights), None where a lag
        has none."""
        key = ("lag_masks", c, dtype, str(device))
        if key not in self._masks:
            w = self.config.window
            lags = (w + c - 2) // c
            r = torch.arange(c, device=device)
            dist = lags * c + r[:, None] - torch.arange((lags + 1) * c, device=device)[None, :]
            exact = torch.zeros(dist.shape, dtype=dtype, device=device)
            exact.masked_fill_((dist < 0) | (dist >= w), -math.inf)
            far = []
            for lag in range(lags + 1):
                d = lag * c + r[:, None] - r[None, :]
                far.append((d >= w).to(dtype) if bool((d >= w).any()) else None)
            self._masks[key] = (exact, far)
        return self._masks[key]

    def _chunked(self, q, k, v, scale):
        """The chunked causal form, blocks of C-token chunks per (batch, kv head).

        For query chunk c the keys of chunks c - L .. c are local: inside the window one
        fused softmax over them gives the exact part and its log-sum-exp; beyond it (within
        those chunks) the Taylor weights 1 + s̃ + s̃²/2 come from the d'-dim projections
        (s̃ = q̃·k̃, no F-wide products). Older keys reach the query through the Taylor
        state S = sum phi(k)ᵀ v, z = sum phi(k) entering chunk c - L (a [nb + 1, nb] prefix
        product over a block's chunk states, as in :func:`attnlab.core.scan.causal_scan`).
        The two halves meet as (a·exact + b·num) / (a + b·den), a = e^(lse - M), b = e^(-M),
        M = max(0, lse). Grouped query heads share their kv head's chunks; nothing of size
        N x N is built.
        """
        b, hq, n, d = q.shape
        hk, dv = k.shape[1], v.shape[-1]
        g, acc = hq // hk, q.dtype
        c = max(1, min(self.config.chunk or choose_chunk(n), n))
        exact_bias, far_masks = self._lag_masks(c, acc, q.device)
        lags, span = len(far_masks) - 1, exact_bias.shape[-1]
        rows_bias = exact_bias if g == 1 else exact_bias.repeat(g, 1)  # [G·C, span]
        fdim = self.feature_dim(d)
        proj = self.projection(d)
        proj = torch.eye(d, dtype=acc, device=q.device) if proj is None else proj.to(q.device, acc)
        proj = proj * scale**0.5
        rows = b * hk
        per_token = g * max(fdim, span, dv)
        block, group = block_plan(n, c, per_token, rows, q.device, max_chunks=BLOCK_CHUNKS)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        q, k, v = q.reshape(rows, g, n, d), k.reshape(rows, n, d), v.reshape(rows, n, dv)
        out = torch.empty(rows, g, n, dv, dtype=acc, device=q.device)
        prefix = {}
        for r0 in range(0, rows, group):
            r1 = min(r0 + group, rows)
            x = r1 - r0
            state = torch.zeros(x, 1, fdim * dv, dtype=acc, device=q.device)
            norm = torch.zeros(x, 1, fdim, dtype=acc, device=q.device)
            for t0 in range(0, n, block):
                t1 = min(t0 + block, n)
                nb = -(-(t1 - t0) // c)
                pad = nb * c - (t1 - t0)
                k0 = max(0, t0 - lags * c)
                front = lags * c - (t0 - k0)  # keys before position 0: whole chunks of zeros
                qb = _padded(q[r0:r1, :, t0:t1], 0, pad)
                qb = qb.view(x, g, nb, c, d).transpose(1, 2).reshape(x, nb, g * c, d)
                kb = _padded(k[r0:r1, k0:t1], front, pad)  # [X, (nb + L)·C, D]
                vb = _padded(v[r0:r1, k0:t1], front, pad)
                # the window: one softmax per chunk over its L + 1 chunks of keys (views)
                bias = rows_bias
                if front:  # the first chunks' keys before position 0 are no keys
                    bias = bias.expand(1, nb, g * c, span).clone()
                    for chunk in range(min(nb, front // c)):
                        bias[:, chunk, :, : front - chunk * c] = -math.inf
                near, lse = _window_softmax(
                    qb, *(_windows(x_, nb, c, span) for x_ in (kb, vb)), bias, scale, grad
                )
                # the Taylor weights: the state of the keys before chunk c - L, then the
                # local keys beyond the window (features as rows: [.., F, C])
                vb = vb.view(x, nb + lags, c, dv)
                q_small = (qb @ proj).view(x * nb, g * c, -1)  # the d'-dim Taylor arguments
                k_small = (kb @ proj).view(x, nb + lags, c, -1).transpose(-1, -2).contiguous()
                fk = taylor_feature_rows(k_small[:, :nb])  # the keys that enter the state here
                if front:  # chunks before position 0 stay out of the state (keys past the
                    fk[:, : front // c] = 0.0  # end only reach the final, unused state)
                if nb not in prefix:
                    prefix[nb] = torch.ones(nb + 1, nb, dtype=acc, device=q.device).tril_(-1)
                kv = torch.matmul(fk, vb[:, :nb])  # [X, nb, F, Dv]
                states = torch.matmul(prefix[nb], kv.view(x, nb, -1)).add_(state)
                norms = torch.matmul(prefix[nb], fk.sum(-1)).add_(norm)
                state, norm = states[:, nb:], norms[:, nb:]
                fq = taylor_feature_rows(q_small.transpose(-1, -2).contiguous())
                fq = fq.transpose(-1, -2)  # [X*nb, G·C, F]
                num = torch.bmm(fq, states[:, :nb].reshape(x * nb, fdim, dv))
                den = torch.bmm(fq, norms[:, :nb].reshape(x * nb, fdim, 1))
                skip = front // c  # padding chunks: lag l reaches them from chunks < skip - L + l
                for lag, far_mask in enumerate(far_masks):
                    if far_mask is None:
                        continue
                    keys = slice(lags - lag, lags - lag + nb)
                    st = torch.bmm(q_small, k_small[:, keys].reshape(x * nb, -1, c))
                    weight = torch.addcmul(st, st, st, value=0.5).add_(1.0)
                    weight = weight.view(x, nb, g, c, c).mul_(far_mask)
                    if skip - lags + lag > 0:
                        weight[:, : skip - lags + lag] = 0.0
                    weight = weight.view(x * nb, g * c, c)
                    num = num.baddbmm(weight, vb[:, keys].reshape(x * nb, c, dv))
                    den = den + weight.sum(-1, keepdim=True)
                lse = lse.reshape(x * nb, g * c, 1)
                top = lse.clamp_min(0.0)
                near_w = torch.exp(lse - top)
                far_w = torch.exp(-top)
                total = near_w + far_w * den
                res = torch.addcmul(
                    near.reshape(x * nb, g * c, dv) * (near_w / total), num, far_w / total
                )
                res = res.view(x, nb, g, c, dv).transpose(1, 2).reshape(x, g, nb * c, dv)
                out[r0:r1, :, t0:t1] = res[:, :, : t1 - t0]
        return out.view(b, hq, n, dv)

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
        return self._chunked(q, k, v, scale)

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
