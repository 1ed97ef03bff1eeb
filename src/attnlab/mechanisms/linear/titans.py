"""Titans' neural memory, in its linear-memory case: the delta rule with momentum and decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.config import option
from attnlab.core.masks import repeat_kv

from ._memory import acc_dtype, align_causal, l2_normalise


def titans_recurrent(q, k, v, *, alpha: float, eta: float, theta: float, chunk: int):
    """Read-outs token by token: the memory update of Titans as written in the paper.

    Within each mini-batch of ``chunk`` tokens the gradient is taken at the
    memory M_0 of the mini-batch start (the paper's tensorised mini-batch
    gradient descent); ``chunk=1`` is plain online gradient descent.
    """
    b, h, n, d = k.shape
    mem = k.new_zeros(b, h, d, v.shape[-1])
    surprise = torch.zeros_like(mem)
    anchor = mem
    outs = []
    for t in range(n):
        if t % chunk == 0:
            anchor = mem
        kt, vt = k[:, :, t : t + 1], v[:, :, t : t + 1]
        grad = kt.transpose(-1, -2) @ (kt @ anchor - vt)
        surprise = eta * surprise - theta * grad
        mem = (1 - alpha) * mem + surprise
        outs.append(q[:, :, t : t + 1] @ mem)
    return torch.cat(outs, dim=2)


def _decay_sums(c: int, a: float, eta: float, dtype, device) -> torch.Tensor:
    """g_d = Σ_{m=0..d} a^(d−m) η^m for d = 0..c, the weight of a gradient d steps back."""
    g = [1.0]
    for d in range(1, c + 1):
        g.append(a * g[-1] + eta**d)
    return torch.tensor(g, dtype=torch.float64).to(dtype=dtype, device=device)


def titans_chunked(q, k, v, *, alpha: float, eta: float, theta: float, chunk: int):
    """Read-outs by mini-batches: the paper's parallel form (Titans §3.2), all tokens
    of a mini-batch at once with matrix products.

    With a = 1 − α, e_j = θ (k_j M_0 − v_j) and g_d as in :func:`_decay_sums`,
    token i of a mini-batch (1-based) reads
    ``o_i = a^i q_i M_0 + η g_{i−1} q_i S_0 − Σ_{j<=i} g_{i−j} (q_i·k_j) e_j``, and the
    mini-batch ends with ``S_c = η^c S_0 − Σ_j η^(c−j) k_jᵀ e_j`` and
    ``M_c = a^c M_0 + η g_{c−1} S_0 − Σ_j g_{c−j} k_jᵀ e_j``.
    """
    b, h, n, d = k.shape
    dv = v.shape[-1]
    c = chunk
    pad = (-n) % c
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    nc = (n + pad) // c
    qc, kc, vc = (t.reshape(b, h, nc, c, t.shape[-1]) for t in (q, k, v))
    a = 1.0 - alpha
    g = _decay_sums(c, a, eta, k.dtype, k.device)
    idx = torch.arange(1, c + 1, device=k.device)
    lag = idx[:, None] - idx[None, :]
    gamma = torch.where(lag >= 0, g[lag.clamp_min(0)], torch.zeros((), dtype=k.dtype))
    a_pow = a ** idx.to(k.dtype)  # a^i
    s_coef = eta * g[idx - 1]  # η g_{i-1}
    eta_back = eta ** (c - idx).to(k.dtype)  # η^(c-j)
    g_back = g[c - idx]  # g_{c-j}
    qk = (qc @ kc.transpose(-1, -2)) * gamma
    mem = k.new_zeros(b, h, d, dv)
    surprise = torch.zeros_like(mem)
    mems, surprises, errs = [], [], []
    for i in range(nc):  # the sequential part: memory and surprise at each mini-batch start
        ki = kc[:, :, i]
        err = theta * (ki @ mem - vc[:, :, i])
        mems.append(mem)
        surprises.append(surprise)
        errs.append(err)
        new_surprise = eta**c * surprise - ki.transpose(-1, -2) @ (eta_back[:, None] * err)
        mem = (
            a**c * mem + eta * g[c - 1] * surprise - ki.transpose(-1, -2) @ (g_back[:, None] * err)
        )
        surprise = new_surprise
    mem0, surprise0 = torch.stack(mems, dim=2), torch.stack(surprises, dim=2)
    out = a_pow[:, None] * (qc @ mem0) + s_coef[:, None] * (qc @ surprise0)
    out = out - qk @ torch.stack(errs, dim=2)
    return out.reshape(b, h, nc * c, dv)[:, :, :n]


@register
class Titans(Mechanism):
    """Titans' long-term memory with a linear memory: delta rule with momentum and decay.

    Behrouz et al., "Titans: Learning to Memorize at Test Time"
    (arXiv:2501.00663), with the memory a single matrix M (its linear case).
    The memory learns at test time on the loss ℓ = ½‖k̂_t M − v_t‖²
    (unit-norm keys and queries, as in the paper); the surprise S carries
    momentum η and the memory forgets by weight decay α:

        S_t = η S_{t-1} − θ ∇ℓ(M_0; k_t, v_t),   M_t = (1 − α) M_{t-1} + S_t,
        o_t = scale · q̂_t M_t

    where M_0 is the memory at the start of the token's mini-batch of
    ``chunk`` tokens: the paper's parallel training takes every gradient of a
    mini-batch at that point (``chunk=1``: a gradient step per token, which is
    then the delta rule with momentum and decay). The paper makes α, η, θ
    functions of the token; the q, k, v contract carries no input to derive
    them from, so here they are constants of ``Config``. Forms: ``chunked``
    (the paper's tensorised mini-batch form, matrix products per mini-batch)
    and ``recurrent`` (token by token); both compute the same model.

    Stability: every gradient of a mini-batch is taken at the same M_0, so a
    mini-batch of c equal keys acts like one step of size about θ·Σ_d g_d
    (g_d of :func:`titans_chunked`); the defaults (θ = 0.01, c = 16, η = 0.9)
    keep the spectral radius of that worst case below 0.75, and with unit
    keys the memory stays bounded at any length. Larger θ needs a smaller c.
    """

    spec = Spec(
        name="titans",
        family="linear",
        title="Titans neural memory, linear case (delta rule + momentum + decay)",
        paper="arXiv:2501.00663",
        exact=False,
        causal=True,
        noncausal=False,
        cross=True,
        decode=True,
        backward=True,
        mask=False,
        complexity="O(N·C·(D+Dv) + N·D·Dv), state 3·D·Dv",
    )
    forms: ClassVar[tuple[str, ...]] = ("chunked", "recurrent")
    tiny_config: ClassVar[dict] = {"chunk": 5}

    @dataclass
    class Config:
        alpha: float = option(0.01, low=0, high=1, high_open=True)
        eta: float = option(0.9, low=0, high=1, high_open=True)
        theta: float = option(0.01, low=0, high=1, low_open=True)
        chunk: int = 16
        form: str = "chunked"

    def _rates(self):
        cfg = self.config
        return {"alpha": float(cfg.alpha), "eta": float(cfg.eta), "theta": float(cfg.theta)}

    def _prepare(self, q, k, v, scale):
        dt = acc_dtype(q.dtype)
        return l2_normalise(q.to(dt)) * scale, l2_normalise(k.to(dt)), v.to(dt)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        qn, kn, vv = self._prepare(q, k, v, scale)
        groups = q.shape[1] // k.shape[1]
        kn, vv = repeat_kv(kn, groups), repeat_kv(vv, groups)
        fn = titans_chunked if self.config.form == "chunked" else titans_recurrent
        rates = self._rates()

        def run(qf):
            return fn(qf, kn, vv, chunk=self.config.chunk, **rates)

        return align_causal(run, qn, kn.shape[2]).to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The update token by token, in the inputs' dtype (float64 in the tests)."""
        groups = q.shape[1] // k.shape[1]
        kn, vv = repeat_kv(l2_normalise(k), groups), repeat_kv(v, groups)

        def run(qf):
            return titans_recurrent(qf, kn, vv, chunk=self.config.chunk, **self._rates())

        return align_causal(run, l2_normalise(q) * scale, k.shape[2])

    def init_state(
        self, batch, q_heads, kv_heads, head_dim, value_dim, *, dtype=torch.float32, device=None
    ):
        """Memory M, surprise S and mini-batch anchor M_0 [B, Hkv, D, Dv], zero; position 0."""
        dt = acc_dtype(dtype)
        zero = torch.zeros(batch, kv_heads, head_dim, value_dim, dtype=dt, device=device)
        return {"M": zero, "S": zero.clone(), "M0": zero.clone(), "t": 0}

    def step(self, q, k, v, state, *, scale=None):
        """Take each new token's gradient step on the memory, then read it with q."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        qn, kn, vv = self._prepare(q, k, v, scale)
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        r = self._rates()
        mem, surprise, anchor, pos = state["M"], state["S"], state["M0"], state["t"]
        outs = []
        for i in range(t):
            if pos % self.config.chunk == 0:
                anchor = mem
            kt, vt = kn[:, :, i : i + 1], vv[:, :, i : i + 1]
            surprise = r["eta"] * surprise - r["theta"] * kt.transpose(-1, -2) @ (kt @ anchor - vt)
            mem = (1 - r["alpha"]) * mem + surprise
            pos += 1
            qg = qn[:, :, i].reshape(b, hkv, hq // hkv, d)
            outs.append((qg @ mem).reshape(b, hq, 1, -1))
        new = {"M": mem, "S": surprise, "M0": anchor, "t": pos}
        return torch.cat(outs, dim=2).to(q.dtype), new

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: memory, surprise and anchor, D x Dv each per kv head."""
        return 3 * kv_heads * head_dim * value_dim
