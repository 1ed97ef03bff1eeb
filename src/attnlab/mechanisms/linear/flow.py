"""Flow-Attention of Flowformer (Wu et al., arXiv:2202.06258): conservation of flows.

Compared with thuml/Flowformer (Flow_Attention and Flow_Attention_Causal in
Flow_Attention.py): attnlab agrees term by term, sigmoid features, the eps placements,
the clipped conserved source, softmax competition times N and sigmoid allocation, and in
the causal form the division of flows by the number of tokens seen; the authors' non-
causal allocation scales the sink by L/S, which is 1 in self-attention, the only form
attnlab offers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Mechanism, Spec, register
from attnlab.core.masks import repeat_kv
from attnlab.core.scan import acc_dtype, causal_scan, linear_attention

_STATS = ("sum_k", "sum_q", "sum_kso", "sum_qsi")


def _dot(a, b):
    return (a * b).sum(-1)


@register
class Flow(Mechanism):
    """Flow-Attention of Flowformer, after Wu et al. (arXiv:2202.06258, eq. 4-9).

    Attention as a flow network with phi = sigmoid on queries (sinks) and keys
    (sources). The incoming flow of sink i is I_i = phi(q_i)·sum_j phi(k_j), the
    outgoing flow of source j is O_j = phi(k_j)·sum_i phi(q_i). Conservation
    refines them (Î_i = phi(q_i)·sum_j phi(k_j)/O_j, Ô_j = phi(k_j)·sum_i phi(q_i)/I_i);
    sources compete, V̂ = softmax(Ô)·N ⊙ V, and sinks are allocated,
    out = sigmoid(Î) ⊙ (phi(Q)/I) (phi(K)ᵀ V̂). The causal form (sec. 3.3)
    replaces every sum by a prefix sum, the softmax by a prefix-normalised
    exp, and divides the flows by the number of tokens seen; all of it is a
    running state, so it decodes. eps as in the authors' code (1e-6);
    Ô is clipped to [-1, 1] for stability as there. ``scale`` does not enter.
    No cross form in causal mode (the paper's prefixes run over one sequence),
    so cross-attention is off; no mask.
    """

    spec = Spec(
        name="flow",
        family="linear",
        title="Flowformer flow attention: competition and allocation",
        paper="arXiv:2202.06258",
        exact=False,
        cross=False,
        mask=False,
        decode=True,
        complexity="O(N·D²)",
    )
    forms: ClassVar[tuple[str, ...]] = ("chunked", "parallel", "recurrent")
    tiny_config: ClassVar[dict] = {"chunk": 5}

    @dataclass
    class Config:
        form: str = "chunked"
        chunk: int | None = None
        eps: float = 1e-6  # at least 1e-30 (core.config.NAMED_BOUNDS)

    def _phi(self, q, k, v):
        acc = acc_dtype(q)
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return torch.sigmoid(q.to(acc)), torch.sigmoid(k.to(acc)), v.to(acc)

    def _noncausal(self, fq, fk, v, form):
        eps = self.config.eps
        nq, nk = fq.shape[-2], fk.shape[-2]
        incoming = 1.0 / _dot(fq + eps, fk.sum(-2, keepdim=True) + eps)
        outgoing = 1.0 / _dot(fk + eps, fq.sum(-2, keepdim=True) + eps)
        sink = _dot(fq + eps, (fk * outgoing[..., None]).sum(-2, keepdim=True) + eps)
        source = _dot(fk + eps, (fq * incoming[..., None]).sum(-2, keepdim=True) + eps)
        allocation = torch.sigmoid(sink * (nq / nk))
        competition = torch.softmax(source.clamp(-1.0, 1.0), dim=-1) * nk
        out = linear_attention(
            fq * incoming[..., None],
            fk,
            v * competition[..., None],
            causal=False,
            form=form,
            normalize=False,
        )
        return out * allocation[..., None]

    def _causal(self, fq, fk, v, state, form):
        """Causal flow of t tokens after ``state``; returns (out, new state)."""
        eps = self.config.eps
        t = fq.shape[-2]
        if form == "parallel":
            tril = torch.ones(t, t, dtype=fq.dtype, device=fq.device).tril()

            def prefix(x):
                return tril @ x

        else:

            def prefix(x):
                return x.cumsum(-2)

        seen = state["n"][..., None] + torch.arange(1, t + 1, dtype=fq.dtype, device=fq.device)
        cum_k = state["sum_k"][..., None, :] + prefix(fk)
        cum_q = state["sum_q"][..., None, :] + prefix(fq)
        incoming = seen / _dot(fq + eps, cum_k + eps)
        outgoing = seen / _dot(fk + eps, cum_q + eps)
        cum_kso = state["sum_kso"][..., None, :] + prefix(fk * outgoing[..., None])
        cum_qsi = state["sum_qsi"][..., None, :] + prefix(fq * incoming[..., None])
        sink = _dot(fq + eps, cum_kso + eps) / seen
        source = (_dot(fk + eps, cum_qsi + eps) / seen).clamp(-1.0, 1.0)
        allocation = torch.sigmoid(sink)
        e = torch.exp(source)
        cum_e = state["sum_exp"][..., None] + prefix(e[..., None])[..., 0]
        competition = e / cum_e * seen
        fq_in = fq * (incoming / seen)[..., None]
        v_in = v * competition[..., None]
        if form == "parallel":
            out = linear_attention(fq_in, fk, v_in, causal=True, form=form, normalize=False)
            inner = {"S": state["S"] + fk.transpose(-1, -2) @ v_in}
        else:
            out, inner = causal_scan(
                fq_in,
                fk,
                v_in,
                form=form,
                state={"S": state["S"]},
                chunk=self.config.chunk,
                normalize=False,
            )
        new = {
            "S": inner["S"],
            "sum_k": cum_k[..., -1, :],
            "sum_q": cum_q[..., -1, :],
            "sum_kso": cum_kso[..., -1, :],
            "sum_qsi": cum_qsi[..., -1, :],
            "sum_exp": cum_e[..., -1],
            "n": state["n"] + t,
        }
        return out * allocation[..., None], new

    def _attend(self, q, k, v, causal, form):
        fq, fk, v = self._phi(q, k, v)
        if not causal:
            return self._noncausal(fq, fk, v, form)
        b, h, _, d = fq.shape
        state = self._empty(b, h, d, v.shape[-1], fq.dtype, fq.device)
        return self._causal(fq, fk, v, state, form)[0]

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        return self._attend(q, k, v, causal, self.config.form).to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """Every sum and prefix sum written as a dense (triangular) matrix product."""
        return self._attend(q, k, v, causal, "parallel")

    @staticmethod
    def _empty(b, h, d, dv, dtype, device):
        state = {s: torch.zeros(b, h, d, dtype=dtype, device=device) for s in _STATS}
        state["S"] = torch.zeros(b, h, d, dv, dtype=dtype, device=device)
        state["sum_exp"] = torch.zeros(b, h, dtype=dtype, device=device)
        state["n"] = torch.zeros(b, h, dtype=dtype, device=device)
        return state

    def init_state(
        self, batch, q_heads, kv_heads, head_dim, value_dim, *, dtype=torch.float32, device=None
    ):
        """Per query head: S [D, Dv], four flow sums [D], the exp sum and the token count."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return self._empty(batch, q_heads, head_dim, value_dim, acc, device)

    def step(self, q, k, v, state, *, scale=None):
        fq, fk, v = self._phi(q, k, v)
        out, state = self._causal(fq, fk, v, state, "recurrent")
        return out.to(q.dtype), state

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: Hq·(D·Dv + 4·D + 2), whatever n."""
        return q_heads * (head_dim * value_dim + 4 * head_dim + 2)
