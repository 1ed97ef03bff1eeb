"""DeltaNet: linear attention whose memory is written by the delta rule.

Compared with fla-org/flash-linear-attention (delta_rule_recurrence and
delta_rule_chunkwise in fla/ops/delta_rule/naive.py, the authors' reference): the same
update, the output read with q scaled by D^(-1/2) and the same WY chunk form; the L2
normalisation of q and k, which fla's DeltaNet layer applies before the kernel, is done
here inside the mechanism, and the per-token beta from the layer input becomes the
constant Config.beta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv

from ._memory import acc_dtype, align_causal, chunk_size, l2_normalise


def unit_lower_inverse(m: torch.Tensor) -> torch.Tensor:
    """Inverse of unit lower-triangular matrices [..., c, c] by block doubling.

    Diagonal blocks of size s are inverted first (size 1: the identity); two
    neighbours merge as [[X1, 0], [B, X2]]⁻¹ = [[X1, 0], [−X2 B X1, X2]], so
    log2(c) rounds of batched matmuls replace c steps of substitution, with the
    same products of bounded inverses that substitution forms.
    """
    c = m.shape[-1]
    p = 1 << (c - 1).bit_length()
    if p != c:  # extend with an identity block; the top-left block of the inverse is kept
        m = F.pad(m, (0, p - c, 0, p - c))
        m = m + torch.diag(torch.cat([m.new_zeros(c), m.new_ones(p - c)]))
    lead = m.shape[:-2]
    inv = m.new_ones(*lead, p, 1, 1)
    s = 1
    while s < p:
        nb = p // (2 * s)
        blocks = m.unflatten(-2, (nb, 2 * s)).unflatten(-1, (nb, 2 * s))
        diag = torch.diagonal(blocks, dim1=-4, dim2=-2).movedim(-1, -3)  # [..., nb, 2s, 2s]
        lower = diag[..., s:, :s]
        x1, x2 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        top = torch.cat([x1, torch.zeros_like(x1)], dim=-1)
        bottom = torch.cat([-(x2 @ lower @ x1), x2], dim=-1)
        inv = torch.cat([top, bottom], dim=-2)
        s *= 2
    return inv[..., 0, :c, :c]


def delta_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: float, chunk: int
) -> torch.Tensor:
    """Causal delta-rule read-outs by chunks, in the WY form of Yang et al. (arXiv:2406.06484).

    Inside a chunk the updates are ``S_i = S_0 + Σ_{j<=i} k_jᵀ u_j`` with
    ``u = T (V − K S_0)`` and ``T = (I + β·tril(K Kᵀ, −1))⁻¹ β`` (one
    unit-triangular inverse per chunk, :func:`unit_lower_inverse`, for all
    chunks at once); outputs are
    ``O = Q S_0 + tril(Q Kᵀ) U``. q, k, v: [B, H, N, ·], keys already unit-norm.
    """
    b, h, n, d = k.shape
    dv = v.shape[-1]
    pad = (-n) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    nc = (n + pad) // chunk
    qc, kc, vc = (t.reshape(b, h, nc, chunk, t.shape[-1]) for t in (q, k, v))
    lower = beta * (kc @ kc.transpose(-1, -2)).tril(-1)
    eye = torch.eye(chunk, dtype=k.dtype, device=k.device)
    solved = unit_lower_inverse(eye + lower) @ (beta * torch.cat([vc, kc], dim=-1))
    u_free, w = solved.split([dv, d], dim=-1)
    qk = (qc @ kc.transpose(-1, -2)).tril()
    state = k.new_zeros(b, h, d, dv)
    states, us = [], []
    for i in range(nc):  # the only sequential part: the state at each chunk start
        u = u_free[:, :, i] - w[:, :, i] @ state
        states.append(state)
        us.append(u)
        state = state + kc[:, :, i].transpose(-1, -2) @ u
    out = qc @ torch.stack(states, dim=2) + qk @ torch.stack(us, dim=2)
    return out.reshape(b, h, nc * chunk, dv)[:, :, :n]


def delta_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: float):
    """Causal delta-rule read-outs token by token: the rule as the paper writes it."""
    b, h, n, d = k.shape
    state = k.new_zeros(b, h, d, v.shape[-1])
    outs = []
    for t in range(n):
        kt, vt = k[:, :, t : t + 1], v[:, :, t : t + 1]
        state = state + beta * kt.transpose(-1, -2) @ (vt - kt @ state)
        outs.append(q[:, :, t : t + 1] @ state)
    return torch.cat(outs, dim=2)


def delta_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: float):
    """Causal delta-rule read-outs in one quadratic pass: the WY form over the whole sequence."""
    n = k.shape[2]
    lower = beta * (k @ k.transpose(-1, -2)).tril(-1)
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    u = torch.linalg.solve_triangular(eye + lower, beta * v, upper=False, unitriangular=True)
    return (q @ k.transpose(-1, -2)).tril() @ u


@register
class Delta(Mechanism):
    """DeltaNet: a linear-attention memory written by the delta rule.

    After Schlag et al. (arXiv:2102.11174) and Yang et al., "Parallelizing
    Linear Transformers with the Delta Rule over Sequence Length"
    (arXiv:2406.06484). With unit-norm keys k̂ and queries q̂ (the papers' L2
    normalisation) and a writing strength β (``Config.beta``, the same for
    every token here; the paper derives it per token from the input, which
    the q, k, v contract does not carry):

        S_t = S_{t-1} + β k̂_tᵀ (v_t − k̂_t S_{t-1}),    o_t = scale · q̂_t S_t

    so a key written with β = 1 is read back as exactly its value. With
    0 < β <= 2 and unit keys each update is non-expansive, so the state
    stays bounded at any length. Forms: ``chunked`` (the paper's WY form:
    one triangular inverse per chunk), ``recurrent`` (token by token) and
    ``parallel`` (the WY form over the whole sequence, quadratic). The rule
    is causal; the paper defines no bidirectional form.
    """

    spec = Spec(
        name="delta",
        family="linear",
        title="DeltaNet: delta-rule linear attention (chunked WY form)",
        paper="arXiv:2406.06484",
        exact=False,
        causal=True,
        noncausal=False,
        cross=True,
        decode=True,
        backward=True,
        mask=False,
        complexity="O(N·C·(D+Dv) + N·D·Dv), state D·Dv",
    )
    forms: ClassVar[tuple[str, ...]] = ("chunked", "recurrent", "parallel")
    tiny_config: ClassVar[dict] = {"chunk": 5}

    @dataclass
    class Config:
        beta: float = option(0.5, low=0, high=2, low_open=True)
        chunk: int | None = None
        form: str = "chunked"

    def _prepare(self, q, k, v, scale):
        dt = acc_dtype(q.dtype)
        qn = l2_normalise(q.to(dt)) * scale
        return qn, l2_normalise(k.to(dt)), v.to(dt)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        qn, kn, vv = self._prepare(q, k, v, scale)
        groups = q.shape[1] // k.shape[1]
        kn, vv = repeat_kv(kn, groups), repeat_kv(vv, groups)
        beta = float(self.config.beta)
        form = self.config.form
        if form == "chunked":
            c = chunk_size(self.config.chunk, kn.shape[2])
            out = align_causal(lambda qf: delta_chunked(qf, kn, vv, beta, c), qn, kn.shape[2])
        elif form == "recurrent":
            out = align_causal(lambda qf: delta_recurrent(qf, kn, vv, beta), qn, kn.shape[2])
        else:
            out = align_causal(lambda qf: delta_parallel(qf, kn, vv, beta), qn, kn.shape[2])
        return out.to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The rule token by token, in the inputs' dtype (float64 in the tests)."""
        groups = q.shape[1] // k.shape[1]
        qn = l2_normalise(q) * scale
        kn, vv = repeat_kv(l2_normalise(k), groups), repeat_kv(v, groups)
        beta = float(self.config.beta)
        return align_causal(lambda qf: delta_recurrent(qf, kn, vv, beta), qn, k.shape[2])

    def init_state(
        self, batch, q_heads, kv_heads, head_dim, value_dim, *, dtype=torch.float32, device=None
    ):
        """The memory S [B, Hkv, D, Dv], zero."""
        dt = acc_dtype(dtype)
        return {"S": torch.zeros(batch, kv_heads, head_dim, value_dim, dtype=dt, device=device)}

    def step(self, q, k, v, state, *, scale=None):
        """Write each new (k, v) into S with the delta rule, then read it with q."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        qn, kn, vv = self._prepare(q, k, v, scale)
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        s = state["S"]
        beta = float(self.config.beta)
        outs = []
        for i in range(t):
            kt, vt = kn[:, :, i : i + 1], vv[:, :, i : i + 1]
            s = s + beta * kt.transpose(-1, -2) @ (vt - kt @ s)
            qg = qn[:, :, i].reshape(b, hkv, hq // hkv, d)
            outs.append((qg @ s).reshape(b, hq, 1, -1))
        return torch.cat(outs, dim=2).to(q.dtype), {"S": s}

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: one D x Dv memory per key-value head, whatever n."""
        return kv_heads * head_dim * value_dim
