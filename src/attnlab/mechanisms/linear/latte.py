"""Latte: attention through probabilistic latent states, in linear time.

Compared with raresdolga/latte_transformer (StableScanLatte, ScanLatte and BidLatte in
models/modules/latte.py): the same mixture, a softmax over latents for the query, each
latent's exponentiated key normalised cumulatively (causal) or over the sequence
(bidirectional), with the running-maximum scan of StableScanLatte; the authors' stable
and bidirectional modules use no temperature and their first ScanLatte scales both
logits by D^(-1/2), which is attnlab's default (scale=1.0 gives the stable module's
form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.masks import causal_mask, divide_or_zero, repeat_kv

from ._memory import acc_dtype, align_causal, chunk_size

# logit given to keys hidden by a key-padding mask: exp of it vanishes next to any
# live key, and a query that sees only hidden keys reads their zeroed values.
_HIDDEN = -1e30
# The fast chunked path scales a chunk by its largest logit; it is used when no query
# of the chunk trails that maximum by more than this (exp(-60) is far from underflow).
_GAP = 60.0


def latte_dense(p, kl, v, allowed):
    """y_t = Σ_l p(l|t) Σ_s p(s|l,t) v_s with p(s|l,t) ∝ exp(kl_sl) over the keys query t
    may see (``allowed`` [.., Nq, Nk] bool or None). Quadratic: O(Nq·Nk·L)."""
    logits = kl.unsqueeze(-3)  # [B, H, 1, Nk, L]
    if allowed is not None:
        logits = logits.masked_fill(~allowed.unsqueeze(-1), float("-inf"))
    weights = torch.softmax(logits, dim=-2).nan_to_num(0.0)  # over keys, per latent
    mix = torch.einsum("bhtl,bhtsl->bhts", p, weights)
    return mix @ v


def latte_chunked(p, kl, v, chunk: int):
    """Causal Latte by chunks, exact and overflow-free at any length.

    Every chunk is scaled by r_l, the largest logit of latent l up to the
    chunk's end: the state ``A_l = Σ_s exp(kl_sl − r_l) v_s`` and normaliser
    ``z_l = Σ_s exp(kl_sl − r_l)`` are carried across chunks, and inside a chunk
    the weights are two matrix products. Every exponent is <= 0; a query's
    normaliser is at least exp(m_tl − r_l), m_tl its own running maximum, so
    when some query trails its chunk's maximum by more than ``_GAP`` the
    chunk length is halved until none does (at length 1 none can).
    """
    b, h, n, lat = kl.shape
    dv = v.shape[-1]
    pad = (-n) % chunk
    if pad:
        p = F.pad(p, (0, 0, 0, pad))
        kl = F.pad(kl, (0, 0, 0, pad), value=_HIDDEN)
        v = F.pad(v, (0, 0, 0, pad))
    nc = (n + pad) // chunk
    run = torch.cummax(kl, dim=2).values.reshape(b, h, nc, chunk, lat)
    top = run[:, :, :, -1]  # r: [B, H, nc, L]
    seen = run > _HIDDEN / 2  # a live key is in the query's past
    gap = torch.where(seen, top.unsqueeze(3) - run, torch.zeros((), dtype=kl.dtype))
    if chunk > 1 and bool(gap.amax() > _GAP):
        return latte_chunked(p[:, :, :n], kl[:, :, :n], v[:, :, :n], chunk // 2)
    pc, kc, vc = (t.reshape(b, h, nc, chunk, t.shape[-1]) for t in (p, kl, v))
    before = torch.cat([top.new_full((b, h, 1, lat), _HIDDEN), top[:, :, :-1]], dim=2)
    carry = torch.exp(before - top)  # [B, H, nc, L], <= 1
    ek = torch.exp(kc - top.unsqueeze(3))  # [B, H, nc, c, L], <= 1
    local = ek.transpose(-1, -2) @ vc  # [B, H, nc, L, Dv]
    local_z = ek.sum(dim=3)
    acc = kl.new_zeros(b, h, lat, dv)
    norm = kl.new_zeros(b, h, lat)
    accs, norms = [], []
    for i in range(nc):  # states at each chunk start, scaled by the previous maximum
        accs.append(acc)
        norms.append(norm)
        acc = acc * carry[:, :, i].unsqueeze(-1) + local[:, :, i]
        norm = norm * carry[:, :, i] + local_z[:, :, i]
    acc0, norm0 = torch.stack(accs, dim=2), torch.stack(norms, dim=2)
    den = (norm0 * carry).unsqueeze(3) + ek.cumsum(dim=3)  # [B, H, nc, c, L]
    coef = divide_or_zero(pc, den)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=kl.device).tril()
    mix = (coef @ ek.transpose(-1, -2)).masked_fill(~tri, 0.0)
    out = (coef * carry.unsqueeze(3)) @ acc0 + mix @ vc
    return out.reshape(b, h, nc * chunk, dv)[:, :, :n]


def latte_recurrent(p, kl, v):
    """Causal Latte token by token: the paper's scan with a running maximum per latent."""
    b, h, n, lat = kl.shape
    run_max = kl.new_full((b, h, lat), _HIDDEN)
    acc = kl.new_zeros(b, h, lat, v.shape[-1])
    norm = kl.new_zeros(b, h, lat)
    outs = []
    for t in range(n):
        acc, norm, run_max, out = _latte_update(
            acc, norm, run_max, kl[:, :, t], v[:, :, t], p[:, :, t]
        )
        outs.append(out.unsqueeze(2))
    return torch.cat(outs, dim=2)


def _latte_update(acc, norm, run_max, kt, vt, pt):
    """One token: fold (kt [.., L], vt [.., Dv]) into the state and read it with pt [.., G, L]."""
    new_max = torch.maximum(run_max, kt)
    decay = torch.exp(run_max - new_max)
    fresh = torch.exp(kt - new_max)
    acc = acc * decay.unsqueeze(-1) + fresh.unsqueeze(-1) * vt.unsqueeze(-2)
    norm = norm * decay + fresh
    if pt.dim() == kt.dim():
        out = torch.einsum("...l,...ld->...d", pt / norm, acc)
    else:
        out = torch.einsum("...gl,...ld->...gd", pt / norm.unsqueeze(-2), acc)
    return acc, norm, new_max, out


@register
class Latte(Mechanism):
    """Latte: attention routed through L latent states with probabilistic weights.

    Dolga et al., "Latte: Latent Attention for Linear Time Transformers"
    (arXiv:2402.17512). Attention is the mixture p(s|t) = Σ_l p(l|t) p(s|l):
    a query picks latent states by a softmax over latents, and each latent
    state weighs the keys by a softmax over the sequence:

        p(l|t) = softmax_l(scale · q_t)_l
        p(s|l) = exp(scale · k_sl) / Σ_{s'} exp(scale · k_s'l)     (s' <= t when causal)
        y_t    = Σ_l p(l|t) Σ_s p(s|l) v_s

    The latent logits are the coordinates of the head's q and k, so L equals
    the head dimension D: the paper's per-head projections X W_q, X W_k to L
    latents are what the caller's q and k projections are (project to L dims
    to choose L). The paper's logits carry no temperature; here both are
    multiplied by ``scale`` (pass ``scale=1.0`` for the paper's form). Causal
    Latte normalises each latent cumulatively; the running maximum of the
    paper's scan keeps every exponent <= 0, so float32 and bfloat16 inputs
    (accumulated in float32) stay finite at any length.

    Forms: ``chunked`` (per-latent sums carried across chunks, each chunk
    scaled by its running maximum, intra-chunk weights as two matrix
    products; see :func:`latte_chunked`), ``recurrent`` (the paper's scan,
    token by token) and ``parallel`` (the dense O(N²·L) definition). A
    key-padding mask keeps linear cost; any other mask is computed with the
    dense form. Decoding keeps L·Dv + 2L floats per kv head.
    """

    spec = Spec(
        name="latte",
        family="linear",
        title="Latte: latent attention (probabilistic latent states)",
        paper="arXiv:2402.17512",
        exact=False,
        causal=True,
        noncausal=True,
        cross=True,
        decode=True,
        backward=True,
        mask=True,
        complexity="O(N·C·(L+Dv) + N·L·Dv), state L·Dv",
    )
    forms: ClassVar[tuple[str, ...]] = ("chunked", "recurrent", "parallel")
    tiny_config: ClassVar[dict] = {"chunk": 5}

    @dataclass
    class Config:
        chunk: int | None = None
        form: str = "chunked"

    def _latents(self, q, k, v, scale):
        dt = acc_dtype(q.dtype)
        groups = q.shape[1] // k.shape[1]
        p = torch.softmax(q.to(dt) * scale, dim=-1)
        kl = repeat_kv(k.to(dt) * scale, groups)
        return p, kl, repeat_kv(v.to(dt), groups)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        p, kl, vv = self._latents(q, k, v, scale)
        nq, nk = q.shape[2], k.shape[2]
        key_only = mask is None or mask.shape[-2] == 1
        if self.config.form == "parallel" or not key_only:
            allowed = mask
            if causal:
                cm = causal_mask(nq, nk, q.device)
                allowed = cm if allowed is None else allowed & cm
            return latte_dense(p, kl, vv, allowed).to(q.dtype)
        if mask is not None:  # key padding: hidden keys get a vanishing weight
            hidden = ~mask.transpose(-1, -2)  # [B|1, H|1, Nk, 1]
            kl, vv = kl.masked_fill(hidden, _HIDDEN), vv.masked_fill(hidden, 0.0)
        if not causal:
            weights = torch.softmax(kl, dim=2)  # [B, H, Nk, L]
            return (p @ (weights.transpose(-1, -2) @ vv)).to(q.dtype)
        if self.config.form == "recurrent":
            out = align_causal(lambda pf: latte_recurrent(pf, kl, vv), p, nk)
        else:
            c = chunk_size(self.config.chunk, nk)
            out = align_causal(lambda pf: latte_chunked(pf, kl, vv, c), p, nk)
        return out.to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The dense O(N²·L) definition, in the inputs' dtype (float64 in the tests)."""
        groups = q.shape[1] // k.shape[1]
        p = torch.softmax(q * scale, dim=-1)
        kl, vv = repeat_kv(k * scale, groups), repeat_kv(v, groups)
        allowed = mask
        if causal:
            cm = causal_mask(q.shape[2], k.shape[2], q.device)
            allowed = cm if allowed is None else allowed & cm
        return latte_dense(p, kl, vv, allowed)

    def init_state(
        self, batch, q_heads, kv_heads, head_dim, value_dim, *, dtype=torch.float32, device=None
    ):
        """Per latent: value sum A [B, Hkv, L, Dv], normaliser z and running max [B, Hkv, L]."""
        dt = acc_dtype(dtype)
        return {
            "A": torch.zeros(batch, kv_heads, head_dim, value_dim, dtype=dt, device=device),
            "z": torch.zeros(batch, kv_heads, head_dim, dtype=dt, device=device),
            "max": torch.full((batch, kv_heads, head_dim), _HIDDEN, dtype=dt, device=device),
        }

    def step(self, q, k, v, state, *, scale=None):
        """Fold each new key and value into the latent states, then read them with q."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        dt = acc_dtype(q.dtype)
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        p = torch.softmax(q.to(dt) * scale, dim=-1)
        kl, vv = k.to(dt) * scale, v.to(dt)
        acc, norm, run_max = state["A"], state["z"], state["max"]
        outs = []
        for i in range(t):
            pg = p[:, :, i].reshape(b, hkv, hq // hkv, d)
            acc, norm, run_max, out = _latte_update(
                acc, norm, run_max, kl[:, :, i], vv[:, :, i], pg
            )
            outs.append(out.reshape(b, hq, 1, -1))
        return torch.cat(outs, dim=2).to(q.dtype), {"A": acc, "z": norm, "max": run_max}

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: L x Dv sums plus two L-vectors per kv head (L = D)."""
        return kv_heads * head_dim * (value_dim + 2)
