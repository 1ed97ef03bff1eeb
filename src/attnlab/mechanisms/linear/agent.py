"""Agent Attention (Han et al., arXiv:2312.08578): agent tokens pooled from the queries.

Compared with LeapLabTHU/Agent-Attention (AgentAttention in
agent_transformer/models/agent_deit.py): the same two scaled softmaxes, agents from
average-pooled queries (pooling each channel, so per head alike), agent values then
query broadcast; on purpose attnlab pools the 1-D sequence where the authors pool the
2-D token grid, and leaves out their learned position biases and the depth-wise
convolution on V, which are parameters of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.masks import repeat_kv
from attnlab.core.scan import acc_dtype


@register
class Agent(Mechanism):
    """Agent attention, after Han et al. (arXiv:2312.08578, eq. 3).

    n agent tokens A are pooled from the queries (average pooling over the
    sequence; the paper pools the 2-D feature map), then softmax is applied
    twice: agent aggregation V_A = softmax(A Kᵀ·scale) V and agent broadcast
    O = softmax(Q Aᵀ·scale) V_A, O(N·n·D) in all. The paper's agent bias and
    depth-wise convolution belong to the layer around the operator and are not
    part of it. Non-causal only, as in the paper: the agents summarise all
    queries, so every output depends on every position.
    """

    spec = Spec(
        name="agent",
        family="linear",
        title="Agent attention: softmax through n pooled agent tokens",
        paper="arXiv:2312.08578",
        exact=False,
        causal=False,
        mask=False,
        complexity="O(N·n·D)",
    )
    tiny_config: ClassVar[dict] = {"agents": 5}

    @dataclass
    class Config:
        agents: int = 49

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if causal:
            reasons[0] = (
                "causal: agent tokens are pooled from all queries, so agent attention has no "
                "causal form (the paper defines none); pass causal=False"
            )
        return reasons

    def agent_tokens(self, q: torch.Tensor) -> torch.Tensor:
        """A [B, H, n, D]: the queries average-pooled over the sequence into n agents."""
        b, h, n, d = q.shape
        pooled = F.adaptive_avg_pool1d(q.reshape(b * h, n, d).transpose(1, 2), self.config.agents)
        return pooled.transpose(1, 2).reshape(b, h, self.config.agents, d)

    def _weights(self, q, k, scale):
        """(softmax(Q Aᵀ), softmax(A Kᵀ)) in the accumulation dtype, kv heads repeated."""
        acc = acc_dtype(q)
        q = q.to(acc)
        k = repeat_kv(k, q.shape[1] // k.shape[1]).to(acc)
        a = self.agent_tokens(q)
        broadcast = torch.softmax(q @ a.transpose(-1, -2) * scale, dim=-1)
        aggregate = torch.softmax(a @ k.transpose(-1, -2) * scale, dim=-1)
        return broadcast, aggregate

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        broadcast, aggregate = self._weights(q, k, scale)
        v = repeat_kv(v, q.shape[1] // v.shape[1]).to(broadcast.dtype)
        return (broadcast @ (aggregate @ v)).to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The N x N attention matrix softmax(Q Aᵀ) softmax(A Kᵀ), times V."""
        broadcast, aggregate = self._weights(q, k, scale)
        v = repeat_kv(v, q.shape[1] // v.shape[1]).to(broadcast.dtype)
        return (broadcast @ aggregate) @ v
