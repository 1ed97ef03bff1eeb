"""Gated Slot Attention: a bounded memory of slots with forget gates, read by a softmax.

Compared with fla-org/flash-linear-attention (naive_recurrent_gsa in
fla/ops/gsa/naive.py, the authors' reference): the same two gated passes, keys written
into the slots with strength 1 - α and forgotten by α, a softmax over slots of the
scaled query scores, then the values read through the same gates; the gate, which fla's
GSA layer computes from the layer input, comes here from the key through a fixed seeded
projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv

from ._memory import acc_dtype, align_causal, chunk_size, seeded_normal


def gsa_recurrent(q, k, v, log_alpha, scale: float):
    """Causal GSA token by token, the paper's recurrence (q, k, v [B,H,N,·], log α [B,H,N,m])."""
    b, h, n, d = k.shape
    m = log_alpha.shape[-1]
    slot_k = k.new_zeros(b, h, m, d)
    slot_v = k.new_zeros(b, h, m, v.shape[-1])
    outs = []
    for t in range(n):
        slot_k, slot_v, out = _gsa_update(
            slot_k, slot_v, k[:, :, t], v[:, :, t], log_alpha[:, :, t], q[:, :, t], scale
        )
        outs.append(out.unsqueeze(2))
    return torch.cat(outs, dim=2)


def _gsa_update(slot_k, slot_v, kt, vt, log_at, qt, scale):
    """One token: gate the slots, write (kt, vt), read with qt ([.., D] or [.., G, D])."""
    alpha = log_at.exp().unsqueeze(-1)
    slot_k = alpha * slot_k + (1 - alpha) * kt.unsqueeze(-2)
    slot_v = alpha * slot_v + (1 - alpha) * vt.unsqueeze(-2)
    if qt.dim() == kt.dim():
        probs = torch.softmax(scale * torch.einsum("...md,...d->...m", slot_k, qt), dim=-1)
        return slot_k, slot_v, torch.einsum("...m,...md->...d", probs, slot_v)
    probs = torch.softmax(scale * torch.einsum("...md,...gd->...gm", slot_k, qt), dim=-1)
    return slot_k, slot_v, torch.einsum("...gm,...md->...gd", probs, slot_v)


def gsa_parallel(q, k, v, log_alpha, scale: float):
    """Causal GSA in one quadratic pass: the two GLA passes with the dense decay tensor.

    D_tjm = exp(b_t − b_j)(1 − α_j) for j <= t (b the cumulative log-gate), so
    h_t = Σ_j D_tj ⊙ (q_t·k_j), p_t = softmax(scale · h_t), o_t = Σ_j (Σ_m p_tm D_tjm) v_j.
    O(N²·m) memory: a reference for short sequences.
    """
    n = k.shape[2]
    cum = log_alpha.cumsum(dim=2)
    tri = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
    expo = (cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(~tri[:, :, None], float("-inf"))
    decay = torch.exp(expo) * (1 - log_alpha.exp()).unsqueeze(2)  # [B, H, t, j, m]
    scores = torch.einsum("bhtjm,bhtj->bhtm", decay, q @ k.transpose(-1, -2))
    probs = torch.softmax(scale * scores, dim=-1)
    return torch.einsum("bhtjm,bhtm->bhtj", decay, probs) @ v


# The fast chunked path factors the decay exp(b_t − b_j) = exp(b_t)·exp(−b_j) with b the
# cumulative log-gate inside a chunk; it is used while no chunk forgets more than this.
_SPAN = 60.0


def gsa_chunked(q, k, v, log_alpha, scale: float, chunk: int):
    """Causal GSA by chunks: the paper's two passes of gated linear attention, as matmuls.

    Inside a chunk, with b_t the cumulative log-gate from the chunk start
    (b <= 0, decreasing), the decay from token j to t is exp(b_t)·exp(−b_j):
    pass one is h = exp(b) ⊙ (Q K̃_0ᵀ + tril(Q Kᵀ) (W ⊙ exp(−b))) with
    W = 1 − α, the softmax over slots gives P, and pass two is
    O = (P ⊙ exp(b)) Ṽ_0 + tril((P ⊙ exp(b)) (W ⊙ exp(−b))ᵀ) V. The slot
    states at chunk starts come from a short recurrence over chunks. When
    some chunk forgets more than ``_SPAN`` nats, exp(−b) could overflow: the
    chunk length is halved until none does, and a single token that forgets
    that much (α < e^−60) is left to the token-by-token recurrence.
    """
    b, h, n, d = k.shape
    m = log_alpha.shape[-1]
    dv = v.shape[-1]
    pad = (-n) % chunk
    if pad:  # padded tokens: gate 1 (log 0), so they neither forget nor write
        q, k, v, log_alpha = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, log_alpha))
    nc = (n + pad) // chunk
    qc, kc, vc, la = (t.reshape(b, h, nc, chunk, t.shape[-1]) for t in (q, k, v, log_alpha))
    cum = la.cumsum(dim=3)
    if bool(cum[:, :, :, -1].amin() < -_SPAN):
        q, k, v, log_alpha = (t[:, :, :n] for t in (q, k, v, log_alpha))
        if chunk == 1:
            return gsa_recurrent(q, k, v, log_alpha, scale)
        return gsa_chunked(q, k, v, log_alpha, scale, chunk // 2)
    fade = cum.exp()  # exp(b_t) <= 1
    write = (1 - la.exp()) * torch.exp(-cum)  # (1 − α_j) exp(−b_j) <= exp(_SPAN)
    end = fade[:, :, :, -1]  # [B, H, nc, m]
    to_end = write * end.unsqueeze(3)  # (1 − α_j) exp(b_c − b_j)
    local_k = to_end.transpose(-1, -2) @ kc  # [B, H, nc, m, D]
    local_v = to_end.transpose(-1, -2) @ vc
    slot_k = k.new_zeros(b, h, m, d)
    slot_v = k.new_zeros(b, h, m, dv)
    ks, vs = [], []
    for i in range(nc):  # slot states at each chunk start
        ks.append(slot_k)
        vs.append(slot_v)
        slot_k = end[:, :, i].unsqueeze(-1) * slot_k + local_k[:, :, i]
        slot_v = end[:, :, i].unsqueeze(-1) * slot_v + local_v[:, :, i]
    k0, v0 = torch.stack(ks, dim=2), torch.stack(vs, dim=2)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    qk = (qc @ kc.transpose(-1, -2)).masked_fill(~tri, 0.0)
    scores = fade * (qc @ k0.transpose(-1, -2) + qk @ write)
    read = torch.softmax(scale * scores, dim=-1) * fade  # P ⊙ exp(b)
    mix = (read @ write.transpose(-1, -2)).masked_fill(~tri, 0.0)
    out = read @ v0 + mix @ vc
    return out.reshape(b, h, nc * chunk, dv)[:, :, :n]


@register
class GatedSlot(Mechanism):
    """Gated Slot Attention: m memory slots with forget gates, read by a softmax over slots.

    Zhang et al., "Gated Slot Attention for Efficient Linear-Time Sequence
    Modeling" (arXiv:2409.07146). Each slot i keeps a key and a value that
    forget with a gate α_t ∈ (0, 1)^m:

        K̃_t = Diag(α_t) K̃_{t-1} + (1 − α_t) ⊗ k_t
        Ṽ_t = Diag(α_t) Ṽ_{t-1} + (1 − α_t) ⊗ v_t
        o_t = Ṽ_tᵀ softmax(scale · K̃_t q_t)

    Gates: the paper computes α_t = σ(x_t W_α)^{1/τ} from the layer input
    x_t with a learned W_α and τ = 8. The q, k, v contract carries no x_t, so
    the gates are taken from the key, α_t = σ(k_t W_α)^{1/τ}, with W_α a small
    [D, m] projection drawn from ``Config.seed`` (N(0, 1/D)) and fixed after
    construction. GSA is causal (the paper defines no bidirectional form).
    Forms: ``chunked`` (the paper's two-pass gated-linear-attention form),
    ``recurrent`` (token by token) and ``parallel`` (both passes with the
    dense O(N²·m) decay tensor).
    """

    spec = Spec(
        name="gsa",
        family="linear",
        title="Gated Slot Attention (bounded-memory slots with forget gates)",
        paper="arXiv:2409.07146",
        exact=False,
        causal=True,
        noncausal=False,
        cross=True,
        decode=True,
        backward=True,
        mask=False,
        complexity="O(N·C·m + N·m·(D+Dv)), state m·(D+Dv)",
    )
    forms: ClassVar[tuple[str, ...]] = ("chunked", "recurrent", "parallel")
    tiny_config: ClassVar[dict] = {"chunk": 5, "slots": 4}

    @dataclass
    class Config:
        slots: int = 64
        tau: float = option(8.0, low=0, low_open=True)
        seed: int = option(0, low=0)
        chunk: int | None = None
        form: str = "chunked"

    def log_gates(self, k: torch.Tensor) -> torch.Tensor:
        """log α_t = log σ(k_t W_α) / τ, [.., N, m] for keys [.., N, D]."""
        d = k.shape[-1]
        w = seeded_normal(
            self.config.seed, (d, self.config.slots), std=d**-0.5, device=k.device, dtype=k.dtype
        )
        return F.logsigmoid(k @ w) / self.config.tau

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        dt = acc_dtype(q.dtype)
        groups = q.shape[1] // k.shape[1]
        kk, vv = k.to(dt), v.to(dt)
        la = repeat_kv(self.log_gates(kk), groups)
        kk, vv = repeat_kv(kk, groups), repeat_kv(vv, groups)
        if self.config.form == "recurrent":
            out = align_causal(
                lambda qf: gsa_recurrent(qf, kk, vv, la, scale), q.to(dt), k.shape[2]
            )
        elif self.config.form == "parallel":
            out = align_causal(lambda qf: gsa_parallel(qf, kk, vv, la, scale), q.to(dt), k.shape[2])
        else:
            c = chunk_size(self.config.chunk, k.shape[2])
            out = align_causal(
                lambda qf: gsa_chunked(qf, kk, vv, la, scale, c), q.to(dt), k.shape[2]
            )
        return out.to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The recurrence token by token, in the inputs' dtype (float64 in the tests)."""
        groups = q.shape[1] // k.shape[1]
        la = repeat_kv(self.log_gates(k), groups)
        kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)
        return align_causal(lambda qf: gsa_recurrent(qf, kk, vv, la, scale), q, k.shape[2])

    def init_state(
        self, batch, q_heads, kv_heads, head_dim, value_dim, *, dtype=torch.float32, device=None
    ):
        """Slot keys [B, Hkv, m, D] and slot values [B, Hkv, m, Dv], zero."""
        dt = acc_dtype(dtype)
        m = self.config.slots
        return {
            "K": torch.zeros(batch, kv_heads, m, head_dim, dtype=dt, device=device),
            "V": torch.zeros(batch, kv_heads, m, value_dim, dtype=dt, device=device),
        }

    def step(self, q, k, v, state, *, scale=None):
        """Gate the slots, write each new key and value, read with q."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        dt = acc_dtype(q.dtype)
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        kk, vv, qq = k.to(dt), v.to(dt), q.to(dt)
        la = self.log_gates(kk)
        slot_k, slot_v = state["K"], state["V"]
        outs = []
        for i in range(t):
            qg = qq[:, :, i].reshape(b, hkv, hq // hkv, d)
            slot_k, slot_v, out = _gsa_update(
                slot_k, slot_v, kk[:, :, i], vv[:, :, i], la[:, :, i], qg, scale
            )
            outs.append(out.reshape(b, hq, 1, -1))
        return torch.cat(outs, dim=2).to(q.dtype), {"K": slot_k, "V": slot_v}

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: m slot keys and values per kv head, whatever n."""
        return kv_heads * self.config.slots * (head_dim + value_dim)
