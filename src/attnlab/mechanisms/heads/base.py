"""`HeadsLayer`: the base of the layer-level mechanisms of the ``heads`` family.

A mechanism of this family changes how the heads of an attention layer are
made, shared or mixed, so it owns its projections: it is called on hidden
states ``x`` [B, N, dim] (and ``context`` [B, M, dim] for cross attention
where its Spec claims ``cross``) and returns [B, N, dim], where the
mechanisms of the other families take ``q, k, v`` already projected.

Decoding (``Spec.decode``): ``init_state(batch)`` gives an empty cache and
``step(x, state)`` runs causal self-attention of the new tokens x [B, t, dim]
over the cache plus themselves, returning ``(out, state)``; token by token it
equals the causal full pass. ``cache_floats_per_token()`` is the number of
floats the cache grows by per token and batch element, as the Spec's
``complexity`` states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnlab.core.checks import FLOAT_DTYPES, check_causal
from attnlab.core.errors import AttnInputError
from attnlab.core.mechanism import Mechanism
from attnlab.core.registry import get


class HeadsLayer(Mechanism):
    """A layer-level attention mechanism: ``layer(x, context=None, causal=False)``.

    Subclasses set ``spec`` (family ``"heads"``) and a ``Config`` with at least
    ``dim``, implement ``forward(x, context, causal)`` and, where the Spec
    claims ``decode``, ``init_state``, ``step`` and ``cache_floats_per_token``.
    """

    def __call__(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *tensors: Any,
        context: torch.Tensor | None = None,
        causal: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        if tensors or options:
            given = [f"{len(tensors) + 1} positional tensors"] if tensors else []
            given += [f"option {name}=" for name in options]
            raise AttnInputError(
                f"x: {self.spec.name!r} is a layer-level mechanism (family 'heads') called as "
                f"layer(x, context=None, causal=False) with hidden states x [B, N, dim], "
                f"not as f(q, k, v); got {', '.join(given)}"
            )
        causal = check_causal(causal)
        self.check_hidden("x", x)
        if context is not None:
            if not self.spec.cross:
                raise AttnInputError(
                    f"context: {self.spec.name!r} has no cross-attention form; pass context=None, "
                    f"got a tensor of shape {tuple(context.shape)}"
                )
            self.check_hidden("context", context)
            if context.shape[0] != x.shape[0] or context.dtype != x.dtype:
                raise AttnInputError(
                    f"context: expected batch {x.shape[0]} and dtype {x.dtype} as x, got batch "
                    f"{context.shape[0]} and dtype {context.dtype}"
                )
        if causal and not self.spec.causal:
            raise AttnInputError(
                f"causal: {self.spec.name!r} has no causal form; pass causal=False"
            )
        if not causal and not self.spec.noncausal:
            raise AttnInputError(f"causal: {self.spec.name!r} is causal only; pass causal=True")
        return nn.Module.__call__(self, x, context=context, causal=causal)

    def check_hidden(self, name: str, x: object) -> torch.Tensor:
        """Check that ``x`` is hidden states [B, N, dim] in a dtype the Spec allows."""
        dim = self.config.dim
        if not isinstance(x, torch.Tensor):
            raise AttnInputError(
                f"{name}: expected a torch.Tensor [B, N, {dim}], got {type(x).__name__}"
            )
        if x.dim() != 3 or x.shape[-1] != dim or 0 in x.shape:
            raise AttnInputError(
                f"{name}: expected hidden states [B, N, {dim}] (dim={dim}), "
                f"got shape {tuple(x.shape)}"
            )
        if FLOAT_DTYPES.get(x.dtype) not in self.spec.dtypes:
            raise AttnInputError(
                f"{name}: expected a dtype among {', '.join(self.spec.dtypes)}, got {x.dtype}"
            )
        return x

    def check_step(self, x: object, state: object) -> None:
        """Check a decode step's new tokens and cache."""
        if not self.spec.decode:
            raise AttnInputError(f"step: {self.spec.name!r} has no decode path (Spec.decode=False)")
        self.check_hidden("x", x)
        if not isinstance(state, dict):
            raise AttnInputError(
                f"state: expected the dict that init_state() returns, got {type(state).__name__}"
            )

    def cache_floats_per_token(self) -> int:
        """Floats the decode cache grows by per token and batch element."""
        raise NotImplementedError

    def state_size(self, n: int, **_: Any) -> int:
        """Floats held per batch element after ``n`` tokens of decoding."""
        return n * self.cache_floats_per_token()

    def unsupported(self, *args: Any, **kwargs: Any) -> list[str]:
        """Layer-level mechanisms check their input when called (``check_hidden``)."""
        return []


_SOFTMAX: list[Mechanism] = []


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention q [B, Hq, Nq, D] over k, v [B, Hkv, Nk, D/Dv] by attnlab's
    ``softmax`` (SDPA's convention: grouped heads, bottom-right causal alignment)."""
    if not _SOFTMAX:
        _SOFTMAX.append(get("softmax"))
    return _SOFTMAX[0](q, k, v, causal=causal, scale=scale)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads·d] -> [B, heads, N, d]."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H·d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def rotate(x: torch.Tensor, offset: int = 0, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoFormer, arXiv:2104.09864) of x [B, H, N, D], its first
    token at position ``offset``: feature i is paired with feature i + D/2 (the GPT-NeoX and
    Llama layout; the paper pairs neighbours, the same map up to a permutation of features)."""
    n, d = x.shape[2], x.shape[3]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    pos = torch.arange(offset, offset + n, dtype=torch.float64, device=x.device)
    angles = pos[:, None] * inv_freq[None]
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    first, second = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def check_count(name: str, value: object, *, divides: int | None = None, of: str = "") -> int:
    """A positive int option, optionally one that divides ``divides``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AttnInputError(f"{name}: expected a positive int, got {value!r}")
    if divides is not None and divides % value:
        raise AttnInputError(f"{name}: expected a divisor of {of}={divides}, got {value}")
    return value
