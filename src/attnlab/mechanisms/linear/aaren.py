"""Aaren: softmax attention computed as an RNN, by a parallel prefix scan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.masks import divide_or_zero, repeat_kv, slice_mask
from attnlab.core.mechanism import KVCacheDecode

from ._memory import acc_dtype


def _safe(m: torch.Tensor) -> torch.Tensor:
    """The running maximum with -inf (nothing seen yet) replaced by 0, for exponents."""
    return torch.where(torch.isneginf(m), torch.zeros((), dtype=m.dtype, device=m.device), m)


def combine(a, b):
    """Aaren's associative operator ⊕ on (m, u, w) triples.

    (m_A, u_A, w_A) ⊕ (m_B, u_B, w_B) = (m, u_A e^{m_A−m} + u_B e^{m_B−m},
    w_A e^{m_A−m} + w_B e^{m_B−m}) with m = max(m_A, m_B): the softmax
    numerator u and denominator w of the union of two key sets, both scaled
    by e^{−m}. u carries a trailing value axis.
    """
    ma, ua, wa = a
    mb, ub, wb = b
    m = torch.maximum(ma, mb)
    ea, eb = torch.exp(ma - _safe(m)), torch.exp(mb - _safe(m))
    return m, ua * ea.unsqueeze(-1) + ub * eb.unsqueeze(-1), wa * ea + wb * eb


def prefix_scan(m: torch.Tensor, u: torch.Tensor, w: torch.Tensor):
    """Inclusive parallel prefix scan of ⊕ along the last axis of m and w (u: [..., T, Dv]).

    Hillis-Steele: log2(T) rounds, each combining every element with the one
    2^r places before it (the identity (−inf, 0, 0) before the start).
    """
    t = m.shape[-1]
    shift = 1
    while shift < t:
        pm = F.pad(m, (shift, 0), value=float("-inf"))[..., :t]
        pw = F.pad(w, (shift, 0))[..., :t]
        pu = F.pad(u, (0, 0, shift, 0))[..., :t, :]
        m, u, w = combine((pm, pu, pw), (m, u, w))
        shift *= 2
    return m, u, w


def _read(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u / w, with rows that saw no key (w = 0) giving zeros (and a NaN w staying NaN)."""
    return divide_or_zero(u, w.unsqueeze(-1))


def many_to_many(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float):
    """Aaren's many-to-many RNN: o_t = softmax attention of one query over k_{1..t}, for all t.

    ``query`` [B, H, D] is the same for every position (Aaren's learned query
    token); k [B, H, N, D], v [B, H, N, Dv]. One parallel prefix scan over the
    N (s_t, v_t, 1) leaves: O(N log N) work, O(N·Dv) memory. Returns [B, H, N, Dv].
    """
    dt = acc_dtype(query.dtype)
    s = torch.einsum("bhd,bhnd->bhn", query.to(dt), k.to(dt)) * scale
    _, u, w = prefix_scan(s, v.to(dt), torch.ones_like(s))
    return _read(u, w).to(query.dtype)


@register
class Aaren(KVCacheDecode, Mechanism):
    """Aaren: softmax attention as a many-to-one RNN, evaluated with a parallel prefix scan.

    Feng et al., "Attention as an RNN" (arXiv:2405.13956). For a query q the
    output over keys 1..k is carried by the triple (m_k, u_k, w_k): the running
    maximum score, Σ_i e^{s_i−m_k} v_i and Σ_i e^{s_i−m_k}; the RNN cell
    updates it one key at a time and the associative operator ⊕
    (:func:`combine`) merges two key sets, so a parallel prefix scan computes
    every prefix at once. The result is exactly softmax attention for that
    query, in linear memory.

    In the standard setting each position brings its own query, so each query
    runs its own RNN over the keys it may see. Forms: ``scan`` (per tile of
    queries: one ⊕-summary per key tile, merged by :func:`prefix_scan`;
    O(N²·D) time, O(N) memory per query tile) and ``recurrent`` (the RNN cell,
    one key per step for all queries). Decoding appends to a key-value cache,
    since a new query must see every earlier key; with one query shared by
    all positions (Aaren's own module) :func:`many_to_many` gives every
    prefix's output in O(N log N).
    """

    spec = Spec(
        name="aaren",
        family="linear",
        title="Aaren: attention as an RNN (parallel prefix scan)",
        paper="arXiv:2405.13956",
        exact=True,
        causal=True,
        noncausal=True,
        cross=True,
        decode=True,
        backward=True,
        mask=True,
        complexity="O(N²·D) time, O(N) memory; O(N log N) for one shared query",
    )
    forms: ClassVar[tuple[str, ...]] = ("scan", "recurrent")
    tiny_config: ClassVar[dict] = {"block_q": 7, "block_k": 5}

    @dataclass
    class Config:
        block_q: int = 256
        block_k: int = 256
        form: str = "scan"

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        dt = acc_dtype(q.dtype)
        groups = q.shape[1] // k.shape[1]
        qq = q.to(dt)
        kk, vv = repeat_kv(k.to(dt), groups), repeat_kv(v.to(dt), groups)
        if self.config.form == "recurrent":
            out = self._recurrent(qq, kk, vv, causal, mask, scale)
        else:
            out = self._scan(qq, kk, vv, causal, mask, scale)
        return out.to(q.dtype)

    @staticmethod
    def _visible(mask, causal: bool, q0: int, q1: int, nq: int, nk: int, device):
        """Bool [.., q1−q0, Nk] of the keys each query of rows q0..q1 may see (None: all)."""
        allowed = slice_mask(mask, slice(q0, q1), slice(0, nk))
        if causal:
            rows = torch.arange(q0, q1, device=device).unsqueeze(1) + (nk - nq)
            cm = torch.arange(nk, device=device).unsqueeze(0) <= rows
            allowed = cm if allowed is None else allowed & cm
        return allowed

    def _scan(self, q, k, v, causal, mask, scale):
        b, h, nq, _ = q.shape
        nk, dv = k.shape[2], v.shape[-1]
        bk = min(self.config.block_k, nk)
        tiles = -(-nk // bk)
        pad = tiles * bk - nk
        v_tiles = F.pad(v, (0, 0, 0, pad)).reshape(b, h, tiles, bk, dv)
        outs = []
        for q0 in range(0, nq, self.config.block_q):
            q1 = min(q0 + self.config.block_q, nq)
            s = (q[:, :, q0:q1] @ k.transpose(-1, -2)) * scale  # [B, H, tq, Nk]
            allowed = self._visible(mask, causal, q0, q1, nq, nk, q.device)
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            s = F.pad(s, (0, pad), value=float("-inf")).reshape(b, h, q1 - q0, tiles, bk)
            m = s.amax(dim=-1)  # one leaf per key tile: its own (m, u, w)
            e = torch.exp(s - _safe(m).unsqueeze(-1))
            u = torch.einsum("bhqtk,bhtkd->bhqtd", e, v_tiles)
            m, u, w = prefix_scan(m, u, e.sum(dim=-1))
            outs.append(_read(u[..., -1, :], w[..., -1]))
        return torch.cat(outs, dim=2)

    def _recurrent(self, q, k, v, causal, mask, scale):
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        m = q.new_full((b, h, nq), float("-inf"))
        u = q.new_zeros(b, h, nq, v.shape[-1])
        w = q.new_zeros(b, h, nq)
        allowed = self._visible(mask, causal, 0, nq, nq, nk, q.device)
        if allowed is not None:
            allowed = allowed.expand(b, h, nq, nk)
        for j in range(nk):
            s = (q @ k[:, :, j].unsqueeze(-1)).squeeze(-1) * scale  # [B, H, Nq]
            if allowed is not None:
                s = s.masked_fill(~allowed[..., j], float("-inf"))
            leaf = (s, v[:, :, j].unsqueeze(2).expand_as(u), torch.ones_like(s))
            m, u, w = combine((m, u, w), leaf)
        return _read(u, w)
