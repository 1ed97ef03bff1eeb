"""Which block-sparse path runs a call: the backend ``"auto"`` picks."""

from __future__ import annotations

import torch

from ..errors import AttnInputError
from .flex import FLEX_DTYPES, flex_block_attention
from .layout import BlockLayout
from .trainable import torch_block_attention

# where the block-sparse engine can run (a mechanism's ``Config.backend``)
BACKENDS = ("auto", "torch", "flex")
# "auto" uses flex on these devices, from this many (query, key) pairs of full
# attention upwards; below it the compiled kernel's fixed costs exceed what it saves
FLEX_FAST_DEVICES = ("cuda",)
FLEX_MIN_PAIRS = 1024 * 1024


def check_backend(backend: object) -> str:
    """``backend`` must name a path of the block-sparse engine (one of :data:`BACKENDS`)."""
    if backend not in BACKENDS:
        raise AttnInputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def choose_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The path ``"auto"`` takes: flex only where its compiled kernel is the faster one.

    ``"torch"`` when gradients flow, when the dtype has no flex kernel, for
    small shapes, and on CPU, where the fused SDPA kernel over gathered blocks
    beats FlexAttention's CPU kernel (which reaches about half of SDPA's
    throughput even on dense causal attention).
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad or q.dtype not in FLEX_DTYPES:
        return "torch"
    return "flex" if prefers_flex(q.device.type, q.shape[2] * k.shape[2]) else "torch"


def prefers_flex(device_type: str, pairs: int) -> bool:
    """Whether compiled FlexAttention is the faster inference path on this device and size."""
    return device_type in FLEX_FAST_DEVICES and pairs >= FLEX_MIN_PAIRS


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """Softmax attention restricted to ``layout`` (and ``mask``), by the chosen path
    (one of :data:`BACKENDS`; ``"auto"``: :func:`choose_path`)."""
    if path == "auto":
        path = choose_path(q, k, v)
    fn = flex_block_attention if path == "flex" else torch_block_attention
    return fn(q, k, v, layout, scale=scale, mask=mask)
