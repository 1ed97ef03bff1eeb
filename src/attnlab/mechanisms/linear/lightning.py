"""Lightning Attention-2 (Qin et al., arXiv:2401.04658): blocked causal linear attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnlab.core import Mechanism, Spec, register
from attnlab.core.checks import check_positive_int
from attnlab.core.errors import AttnInputError
from attnlab.core.scan import acc_dtype, causal_scan, init_state, linear_attention, state_floats
from attnlab.mechanisms.exact.alibi import alibi_slopes

FEATURES = {"silu": F.silu, "identity": lambda x: x}


def decay_slopes(heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Per-head decay rates s_h, lambda_h = exp(-s_h): TransNormerLLM's ALiBi slopes.

    For H a power of two s_h = 2^(-8(h+1)/H); otherwise the slopes of the
    largest power of two P < H followed by every other slope of the list for
    2P, as ALiBi's :func:`~attnlab.mechanisms.exact.alibi.alibi_slopes` (the
    authors' ``_build_slope_tensor``). TransNormerLLM's per-layer factor is
    left out: an attention operator does not know its layer."""
    return torch.tensor(alibi_slopes(heads), device=device, dtype=dtype)


def poisoned_rows(k: torch.Tensor, v: torch.Tensor, q_heads: int) -> torch.Tensor | None:
    """Bool [B, Hq, N, 1]: the rows whose past holds a non-finite key or value, or None.

    In [(Q Kᵀ) ⊙ M] V row i reads every key and value j <= i (the decay
    lambda^(i-j) never reaches zero exactly), so a NaN or an infinity at j
    reaches exactly the rows i >= j of the heads that share its key/value head.
    """
    if bool(torch.isfinite(k.sum() + v.sum())):  # one reduction: the common, all-finite case
        return None
    bad = ~torch.isfinite(k).all(dim=-1) | ~torch.isfinite(v).all(dim=-1)  # [B, Hkv, N]
    if not bool(bad.any()):
        return None
    seen = bad.cummax(dim=-1).values
    return seen.repeat_interleave(q_heads // k.shape[1], dim=1)[..., None]


@register
class Lightning(Mechanism):
    """Lightning Attention-2 (arXiv:2401.04658, Algorithm 1), after Lightning Attention
    ("Various Lengths, Constant Speed", arXiv:2405.17381) and TransNormerLLM.

    O = [(Q Kᵀ) ⊙ M] V with M_ij = lambda^(i-j) for j <= i (0 otherwise), lambda
    a per-head decay (``decay=False``: lambda = 1, plain causal linear
    attention). Computed block by block: inside a block the masked matrix
    (intra), across blocks a running KV state decayed by lambda^B (inter).
    Q and K go through TransNormerLLM's feature map (``feature``: silu, or
    identity) and, with ``norm=True``, the output through its NormAttention
    (a parameter-free RMS norm over the head dim) in place of a softmax
    denominator. Causal only, as in the paper (a language-model kernel);
    ``scale`` does not enter. With a decay each query head keeps its own state.

    A NaN or infinity in key/value j reaches only the rows i >= j of its
    heads (the rows whose sum holds it): the blocked computation runs on
    inputs cleared with ``torch.where`` and those rows are set to NaN, so a
    future key never reaches an earlier row through the intra-block product.

    Compared with OpenNLPLab/lightning-attention (``lightning_attn_func``,
    ``_build_slope_tensor``) and TransNormerLLM: the same decayed masked
    product and the same ALiBi-style slopes for any head count; the per-layer
    slope factor, the output gate and the learned norm weight belong to the
    layer and are left out.
    """

    spec = Spec(
        name="lightning",
        family="linear",
        title="Lightning Attention-2: intra-block matrix, inter-block decayed KV state",
        paper="arXiv:2401.04658",
        exact=False,
        noncausal=False,
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
        decay: bool = True
        feature: str = "silu"
        norm: bool = True
        eps: float = 1e-6

        def __post_init__(self):
            if self.chunk is not None:
                check_positive_int("chunk", self.chunk)
            if self.feature not in FEATURES:
                raise AttnInputError(
                    f"feature: expected one of {', '.join(FEATURES)}, got {self.feature!r}"
                )

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if not causal:
            reasons[0] = (
                "causal: Lightning Attention-2 is a causal language-model kernel (the paper "
                "defines no bidirectional form); pass causal=True"
            )
        return reasons

    def _log_decay(self, q):
        """log lambda_h per query head, [1, Hq, 1] (the same decay at every step), or None."""
        if not self.config.decay:
            return None
        return (-decay_slopes(q.shape[1], q.device, acc_dtype(q)))[None, :, None]

    def _feature(self, x, *, query):
        return FEATURES[self.config.feature](x)

    def _inputs(self, q, k):
        acc = acc_dtype(q)
        return self._feature(q.to(acc), query=True), self._feature(k.to(acc), query=False)

    def _norm(self, out):
        """NormAttention's RMS norm over the head dim, in place (out is the scan's own
        float32 result): x / sqrt(mean(x²) + eps)."""
        if not self.config.norm:
            return out
        if out.requires_grad:
            return F.rms_norm(out, (out.shape[-1],), eps=self.config.eps)
        ms = torch.linalg.vector_norm(out, dim=-1, keepdim=True).square_().div_(out.shape[-1])
        return out.mul_(ms.add_(self.config.eps).rsqrt_())

    def _attend(self, q, k, v, form):
        poisoned = poisoned_rows(k, v, q.shape[1])
        if poisoned is not None:
            k = torch.where(torch.isfinite(k), k, 0.0)
            v = torch.where(torch.isfinite(v), v, 0.0)
        out = linear_attention(
            q,
            k,
            v,
            causal=True,
            form=form,
            chunk=self.config.chunk,
            log_decay=self._log_decay(q),
            normalize=False,
            feature_map=self._feature,
            native_feature=self.config.feature,
        )
        out = self._norm(out)
        if poisoned is not None:
            out = torch.where(poisoned, float("nan"), out)
        return out

    def forward(self, q, k, v, *, causal=True, mask=None, scale=None):
        return self._attend(q, k, v, self.config.form).to(q.dtype)

    def reference(self, q, k, v, *, causal, mask, scale):
        """The masked decay matrix [(Q Kᵀ) ⊙ M] V, densely."""
        return self._attend(q, k, v, "parallel")

    def init_state(
        self, batch, q_heads, kv_heads, head_dim, value_dim, *, dtype=torch.float32, device=None
    ):
        """KV state [B, H, D, Dv], H = Hq with a decay (per-head rates), else Hkv."""
        heads = q_heads if self.config.decay else kv_heads
        return init_state(
            batch, heads, head_dim, value_dim, normalize=False, dtype=dtype, device=device
        )

    def step(self, q, k, v, state, *, scale=None):
        fq, fk = self._inputs(q, k)
        out, state = causal_scan(
            fq, fk, v, form="recurrent", state=state, log_decay=self._log_decay(q), normalize=False
        )
        return self._norm(out).to(q.dtype), state

    def state_size(self, n, *, q_heads, kv_heads, head_dim, value_dim):
        """Floats per batch element: H·D·Dv, whatever n."""
        heads = q_heads if self.config.decay else kv_heads
        return state_floats(heads, head_dim, value_dim, normalize=False)
