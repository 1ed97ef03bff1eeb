"""Based (Arora et al., arXiv:2402.18668): Taylor linear attention plus an exact window.

Compared with HazyResearch/based (TaylorExp and LinearAttention in
based/models/mixers/linear_attention.py): the same Taylor feature map [1, x/d^(1/4), (x
x^T)/(sqrt(2) sqrt(d))] and causal normaliser; on purpose attnlab replaces the learned
16-dim projections by a fixed seeded one (an operator has no trained weights) and joins
the sliding-window softmax and the Taylor part of the far keys into one operator with
one normaliser, where the authors stack them as separate layers (their linear layer also
covers the window's keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, native, register
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv
from attnlab.core.scan import acc_dtype, block_plan, choose_chunk

from ._featuremap import SeededDraws, orthogonal_gaussian


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


# Chunks per block at most, and the block's size by the floats per token of its largest
# temporaries (the query and key features and the values, 2F + Dv; the scan's budget of
# floats): a block that leaves the cache pays memory traffic on every pass.
BLOCK_CHUNKS = 64
# The window bias of keys outside it (finite: see _block) and the smallest exponent taken.
_FAR_BELOW = -1e30
_EXP_FLOOR = -80.0
# Chunks summed by one triangular product in the state's prefix sums.
PREFIX_CHUNKS = 16
# Query chunk of the compiled kernel (csrc/based.c, attnlab.core.native.based) when the
# config names none: the default window, so that a chunk's halo is one chunk.
NATIVE_CHUNK = 64


def _chunk_projections(x: torch.Tensor, proj2: torch.Tensor, tokens: int) -> torch.Tensor:
    """x [B·T, D] projected per chunk of T tokens by ``proj2`` [D, 2d'] (the scaled projection
    twice side by side): [B, 2d', T] = y and its copy, from one batched product."""
    b = x.shape[0] // tokens
    return torch.bmm(proj2.T.expand(b, -1, -1), x.view(b, tokens, -1).transpose(1, 2))


def _chunk_features(yy: torch.Tensor, query: bool, grad: bool) -> torch.Tensor:
    """Taylor features of the projections yy [B, 2d', T] (:func:`_chunk_projections`), as
    rows: [B, F, T]. Rows: 1, y, the squares y_i² (times 1/2 for queries), then the
    d'(d'-1)/2 products y_i·y_j (i != j) by cyclic offset (read from the copy of y),
    y_i·y_(i+o mod d') for o = 1 .. (d'-1)//2, and y_i·y_(i+d'/2) (i < d'/2) for even d'. So
    phi_q(x)·phi_k(x') = 1 + y·y' + (y·y')²/2, as :func:`taylor_features`, with a few whole-
    chunk products (three multiplications) instead of one per feature.
    """
    b, dp, tokens = yy.shape[0], yy.shape[1] // 2, yy.shape[2]
    m, half = (dp - 1) // 2, (dp // 2 if dp % 2 == 0 else 0)
    if grad:
        y = yy[:, :dp]
        cyc = yy.unfold(1, dp, 1)[:, 1 : m + 1].transpose(-1, -2)  # [B, m, d', T]: y_(i+o)
        parts = [
            torch.ones_like(y[:, :1]),
            y,
            y * y * (0.5 if query else 1.0),
            (y[:, None] * cyc).reshape(b, m * dp, tokens),
            y[:, :half] * y[:, half : 2 * half],
        ]
        return torch.cat(parts, dim=1)
    y = yy[:, :dp]
    out = yy.new_empty(b, 1 + dp + dp * (dp + 1) // 2, tokens)
    out[:, 0] = 1.0
    out[:, 1 : dp + 1] = y
    squares = torch.mul(y, y, out=out[:, dp + 1 : 2 * dp + 1])
    if query:
        squares.mul_(0.5)
    if m:
        cyc = yy.unfold(1, dp, 1)[:, 1 : m + 1].transpose(-1, -2)
        pairs = out[:, 2 * dp + 1 : 2 * dp + 1 + m * dp].view(b, m, dp, tokens)
        torch.mul(y[:, None], cyc, out=pairs)
    if half:
        torch.mul(y[:, :half], y[:, half:dp], out=out[:, out.shape[1] - half :])
    return out


def _halo_buffer(x, r0, r1, t0, t1, halo, absent, tb, ones=False):
    """Rows r0..r1 of x [R, N, E], tokens t0..t1 padded to tb, after a halo of the ``halo``
    tokens before t0 of row r0 (its first ``absent`` before position 0): [H + X·tb, E] (E + 1
    with a ones column, the normaliser's values). Rows of no key are zero (ones included)."""
    x_, e = r1 - r0, x.shape[-1]
    out = x.new_empty(halo + x_ * tb, e + int(ones))
    out[:absent] = 0.0
    out[absent:halo, :e] = x[r0, t0 - halo + absent : t0]
    body = out[halo:].view(x_, tb, -1)
    body[:, : t1 - t0, :e] = x[r0:r1, t0:t1]
    if ones:
        out[absent:, e] = 1.0
    if tb > t1 - t0:
        body[:, t1 - t0 :] = 0.0
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
    positive_scale: ClassVar[bool] = True  # features of q·sqrt(scale), k·sqrt(scale)

    @dataclass
    class Config:
        window: int = 64
        feature_dim: int | None = 16
        seed: int = option(0, low=0)
        form: str = "chunked"
        chunk: int | None = None

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

    def _local_masks(self, c: int, g: int, nb: int, front: int, dtype, device):
        """Constant masks of a block of nb query chunks of C tokens (G query heads a chunk),
        by the distance d = i - j of query i and key j, cached per shape. Over the span of
        chunks c - L .. c: the window's additive bias [G·C, (L + 1)·C] (0 where 0 <= d < W,
        _FAR_BELOW elsewhere) and its 0/1 mask. Per lag l <= L with keys beyond the window:
        the Taylor mask of d >= W times 1/2 (the weight is (1 + t²)/2, t = 1 + s̃) [G·C, C].
        The first ``front`` key chunks of the block's halo are no keys (before position 0, or
        another row's): the masks of the chunks that reach them are [nb, G·C, *], with zeros.
        """
        key = (c, g, nb, front, dtype, str(device))
        if key not in self._masks:
            w = self.config.window
            lags = (w + c - 2) // c
            r = torch.arange(c, device=device)
            span = torch.arange((lags + 1) * c, device=device)
            dist = lags * c + r[:, None] - span[None, :]
            inside = ((dist >= 0) & (dist < w)).to(dtype).repeat(g, 1)
            bias = (1.0 - inside) * _FAR_BELOW
            if front > 1:
                inside = inside.expand(nb, -1, -1).clone()
                for i in range(min(nb, front - 1)):
                    inside[i, :, : (front - 1 - i) * c] = 0.0
            far = []
            for lag in range(lags + 1):
                d = lag * c + r[:, None] - r[None, :]
                if bool((d >= w).any()):
                    half = ((d >= w).to(dtype) * 0.5).repeat(g, 1)
                    absent = max(0, front - lags - 1 + lag)  # chunks whose lag-l keys are none
                    if absent:
                        half = half.expand(nb, -1, -1).clone()
                        half[:absent] = 0.0
                    far.append((lag, half))
            if len(self._masks) > 32:
                self._masks.clear()
            self._masks[key] = (bias, inside, far)
        return self._masks[key]

    def _prefix_sums(self, kv: torch.Tensor) -> torch.Tensor:
        """Inclusive prefix sums over the chunks of kv [X, nb, W]: products with a lower
        triangle of ones, PREFIX_CHUNKS chunks at a time (a cumsum over the middle axis, or
        an add per chunk, is several times slower; one nb x nb product grows as nb²)."""
        nb = kv.shape[1]
        if nb <= PREFIX_CHUNKS:
            return torch.matmul(self._tril(nb, kv), kv)
        states = torch.empty_like(kv)
        for g0 in range(0, nb, PREFIX_CHUNKS):
            g1 = min(nb, g0 + PREFIX_CHUNKS)
            tril, part = self._tril(g1 - g0, kv), states[:, g0:g1]
            if part.is_contiguous() and not kv.requires_grad:  # one row: straight in place
                torch.matmul(tril, kv[:, g0:g1], out=part)
                if g0:
                    part += states[:, g0 - 1 : g0]
                continue
            part = torch.matmul(tril, kv[:, g0:g1])
            if g0:
                part += states[:, g0 - 1 : g0]
            states[:, g0:g1] = part
        return states

    def _tril(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = ("tril", n, like.dtype, str(like.device))
        if key not in self._masks:
            self._masks[key] = torch.ones(n, n, dtype=like.dtype, device=like.device).tril_()
        return self._masks[key]

    def _chunked(self, q, k, v, scale):
        """The chunked causal form: blocks of C-token chunks, several (batch, kv head) rows at
        once when the whole sequence fits one block, else one row in blocks of tokens.

        Keys reach query chunk c three ways, all weighted relative to M = max(0, the largest
        window score). Those of chunks c - L .. c inside the window: e^(s - M), in one
        [G·C, (L + 1)·C] score matrix over the span. Those of the same chunks beyond the
        window: the Taylor weight (1 + t²)/2 · e^-M, t = [1, q̃]·[1, k̃] (= 1 + s̃ + s̃²/2,
        from the d'-dim projections, no F-wide products), added into the same matrix. Older
        ones: the Taylor state S = sum phi(k)ᵀ [v, 1] of the chunks before c - L (prefix sums
        over the chunk states), read as phi(q) S · e^-M. The ones column of the values makes
        every product give the normaliser beside the numerator: out = num / den. A block's
        keys and values carry a halo of the L + 1 chunks before it, so every shifted operand
        (the state's chunks, each lag, the windows) is a plain view with one batch stride,
        even across rows (the halo of a row is then the previous row's end, masked as no
        keys). Grouped query heads share their kv head's chunks; nothing of size N x N is
        built. Float32 CPU inputs without autograd go to the compiled kernel
        (:func:`attnlab.core.native.based`, ``csrc/based.c``): the same sums, fused per
        chunk, with this form as its reference and fallback.
        """
        b, hq, n, d = q.shape
        native_chunk = self.config.chunk or NATIVE_CHUNK
        if native.based_applies(q, k, v, chunk=native_chunk):  # the fused kernel: same sums
            proj = self.projection(d)
            proj = torch.eye(d) if proj is None else proj
            return native.based(
                q,
                k,
                v,
                proj * scale**0.5,
                window=self.config.window,
                chunk=native_chunk,
                scale=scale,
            )
        hk, dv = k.shape[1], v.shape[-1]
        g, acc, dev = hq // hk, q.dtype, q.device
        c = max(1, min(self.config.chunk or choose_chunk(n), n))
        lags = (self.config.window + c - 2) // c
        halo = (lags + 1) * c
        fdim = self.feature_dim(d)
        proj = self.projection(d)
        proj = torch.eye(d, dtype=acc, device=dev) if proj is None else proj.to(dev, acc)
        proj2 = torch.cat([proj, proj], dim=1) * scale**0.5
        rows = b * hk
        per_token = g * (2 * fdim + dv)  # the query and key features and the values
        block, group = block_plan(n, c, per_token, rows, dev, max_chunks=BLOCK_CHUNKS)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        q, k, v = q.reshape(rows, g, n, d), k.reshape(rows, n, d), v.reshape(rows, n, dv)
        out = torch.empty(rows, g, n, dv, dtype=acc, device=dev)
        for r0 in range(0, rows, group):
            r1 = min(r0 + group, rows)
            x = r1 - r0
            carry = None  # the Taylor state of the keys before the block's halo
            for t0 in range(0, n, block):
                t1 = min(t0 + block, n)
                nb = -(-(t1 - t0) // c)
                tb = nb * c
                front = max(0, halo - t0) // c  # halo chunks before position 0
                # keys, values and a ones column (the normaliser) with the halo: [H + X·tb]
                if x == 1 and not front and tb == t1 - t0 and k[r0].is_contiguous():
                    kb = k[r0, t0 - halo : t1]  # (the windows are views with a row stride D)
                else:
                    kb = _halo_buffer(k, r0, r1, t0, t1, halo, front * c, tb)
                vb = _halo_buffer(v, r0, r1, t0, t1, halo, front * c, tb, ones=True)
                if g == 1 and tb == t1 - t0:
                    qb = q[r0:r1, 0, t0:t1].reshape(x * tb, d)
                else:
                    qp = F.pad(q[r0:r1, :, t0:t1], (0, 0, 0, tb - (t1 - t0)))
                    qb = qp.view(x, g, nb, c, d).transpose(1, 2).reshape(x * tb * g, d)
                res = self._block(qb, kb, vb, x, nb, c, g, front, carry, proj2, scale, grad)
                num, den, carry = res
                num, den = num.view(x, nb, g, c, dv), den.view(x, nb, g, c, 1)
                if grad or tb != t1 - t0:
                    o = (num / den).transpose(1, 2).reshape(x, g, tb, dv)
                    out[r0:r1, :, t0:t1] = o[:, :, : t1 - t0]
                else:  # straight into the output
                    o = out[r0:r1, :, t0:t1].view(x, g, nb, c, dv).transpose(1, 2)
                    torch.div(num, den, out=o)
        return out.view(b, hq, n, dv)

    def _block(self, qb, kb, vb, x, nb, c, g, front, carry, proj2, scale, grad):
        """One block of X rows x nb chunks: queries qb [X·nb·G·C, D] (chunk by chunk, the G
        heads of a chunk together), keys kb [H + X·nb·C, D] and values with a ones column vb
        [H + X·nb·C, Dv + 1], H = (L + 1)·C halo rows first. Returns the numerator and the
        normaliser [X·nb, G·C, Dv | 1], both scaled by e^-M, and the state that leaves the
        block."""
        d, dv, gc = qb.shape[-1], vb.shape[-1] - 1, g * c
        lags = kb.shape[0] // c - x * nb - 1
        span, dp = (lags + 1) * c, proj2.shape[1] // 2
        bias, inside, far = self._local_masks(c, g, nb, front, qb.dtype, qb.device)
        yq = _chunk_projections(qb, proj2, gc)  # [X·nb, 2d', G·C]
        yk = _chunk_projections(kb, proj2, c)  # [L + 1 + X·nb, 2d', C]
        # keys of the window's chunks beyond the window: (1 + t²)/2, t = [1, q̃]·[1, k̃]
        # (first, and each temporary dropped when done: a smaller working set)
        taylors = []
        for lag, half in far:
            first = lags + 1 - lag
            yk_l = yk[first : first + x * nb, :dp]
            t = torch.baddbmm(yq.new_ones(()), yq[:, :dp].transpose(1, 2), yk_l)
            if grad:
                taylor = (t * t + 1.0).view(x, nb, gc, c) * half
            else:
                taylor = t.mul_(t).add_(1.0).view(x, nb, gc, c).mul_(half)
            taylors.append((lag, taylor.view(x * nb, gc, c)))
        # the state entering chunk i: the key chunks up to i - L - 1 (halo chunk i and before)
        fk = _chunk_features(yk, False, grad)  # [L + 1 + X·nb, F, C]
        fdim = fk.shape[1]
        kv = torch.bmm(fk[: x * nb], vb[: x * nb * c].view(x * nb, c, dv + 1))
        del fk
        kv = kv.view(x, nb, fdim * (dv + 1))
        kv[:, :front] = 0.0  # (in place on a product's output: autograd allows it)
        if carry is not None:
            kv[:, 0] += carry[:, 0]
        states = self._prefix_sums(kv)
        del kv
        carry = states[:, nb - 1 :]
        fq = _chunk_features(yq, True, grad)  # [X·nb, F, G·C]
        nd = torch.bmm(fq.transpose(1, 2), states.view(x * nb, fdim, dv + 1))
        del fq, states
        # the window's scores over chunks c - L .. c (overlapping views, one batch stride)
        kw = kb.as_strided((x * nb, d, span), (c * d, 1, d), kb.storage_offset() + c * d)
        vw = vb.as_strided(
            (x * nb, span, dv + 1), (c * (dv + 1), dv + 1, 1), vb.storage_offset() + c * (dv + 1)
        )
        s = torch.baddbmm(bias, qb.view(x * nb, gc, d), kw, alpha=scale)  # [X·nb, G·C, span]
        for i in range(min(nb, front - 1)):  # keys before position 0 (or another row's)
            s.view(x, nb, gc, span)[:, i, :, : (front - 1 - i) * c] = _FAR_BELOW
        top = s.amax(-1, keepdim=True).clamp_min(0.0)  # M = max(0, the largest score)
        # exp of arguments >= -80 (e^-80 = 2e-35, then masked to 0): torch's exp takes a
        # ~10x slower path for -inf or very negative arguments, and products slow down
        # on subnormal weights
        if grad:
            weight = torch.exp((s - top).clamp_min(_EXP_FLOOR)).view(-1, *inside.shape)
            weight = (weight * inside).view(x * nb, gc, span)
        else:
            weight = s.sub_(top).clamp_min_(_EXP_FLOOR).exp_()
            weight.view(-1, *inside.shape).mul_(inside)
        shrink = torch.exp(-top)  # e^-M: the Taylor weights' share
        for lag, taylor in taylors:
            cols = ((lags - lag) * c, span - (lags - lag + 1) * c)
            if grad:
                weight = weight + F.pad(taylor * shrink, cols)
            else:
                weight[..., cols[0] : span - cols[1]].addcmul_(taylor, shrink)
        # the state's share, then the window's keys (the ones column sums the weights)
        nd = nd * shrink if grad else nd.mul_(shrink)
        nd = nd.baddbmm(weight, vw) if grad else nd.baddbmm_(weight, vw)
        return nd[..., :dv], nd[..., dv:], carry

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
