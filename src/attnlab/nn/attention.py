"""`Attention`: a trainable attention layer around any registered mechanism, or a mix of them.

The layer owns the projections (queries, keys, values, output), an optional
rotary embedding (RoFormer, arXiv:2104.09864), grouped- and multi-query key
heads (Ainslie et al., arXiv:2305.13245; Shazeer, arXiv:1911.02150) and a
decode cache. The mechanism inside is anything in the registry; a per-head mix
such as ``[("softmax", 2), ("linear", 6)]`` runs different mechanisms on
different heads of one layer, as Hymba's hybrid heads (arXiv:2411.13676) and
RecurFormer do, by splitting the heads into groups, running each group's
mechanism and concatenating the groups before the output projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnlab.core.errors import AttnInputError
from attnlab.core.mechanism import Mechanism
from attnlab.core.registry import get, mechanism_class

from .rotary import Rotary


@dataclass(frozen=True)
class HeadGroup:
    """A run of consecutive heads computed by one mechanism.

    ``heads`` query heads and ``kv_heads`` key/value heads, starting at query
    head ``q_start`` and key head ``kv_start``; ``config`` holds the
    mechanism's options.
    """

    name: str
    heads: int
    kv_heads: int
    q_start: int
    kv_start: int
    config: dict[str, Any] = field(default_factory=dict)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttnInputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def head_groups(
    mechanism: str | Sequence[Sequence[Any]],
    heads: int,
    kv_heads: int,
    config: dict[str, Any],
) -> list[HeadGroup]:
    """Split ``heads`` query heads and ``kv_heads`` key heads among the mechanisms of a mix.

    ``mechanism`` is a name (every head) or a sequence of ``(name, heads)`` or
    ``(name, heads, {options})`` entries whose head counts sum to ``heads``.
    Each group keeps the layer's ratio of query to key heads, so its key heads
    are ``heads_g · kv_heads / heads``, which must be a whole number.
    """
    if isinstance(mechanism, str):
        entries: list[tuple[str, int, dict[str, Any]]] = [(mechanism, heads, dict(config))]
    else:
        if config:
            raise AttnInputError(
                f"config: a per-head mix takes each mechanism's options in its entry "
                f"(name, heads, {{options}}), got layer-wide options {sorted(config)}"
            )
        if not isinstance(mechanism, Sequence) or len(mechanism) == 0:
            raise AttnInputError(
                f"mechanism: expected a name or a list of (name, heads) entries, got {mechanism!r}"
            )
        entries = []
        for entry in mechanism:
            if (
                not isinstance(entry, Sequence)
                or isinstance(entry, str)
                or len(entry) not in (2, 3)
                or not isinstance(entry[0], str)
            ):
                raise AttnInputError(
                    f"mechanism: expected entries (name, heads) or (name, heads, {{options}}), "
                    f"got {entry!r}"
                )
            options = dict(entry[2]) if len(entry) == 3 else {}
            entries.append((entry[0], _check_count("mechanism heads", entry[1]), options))
        total = sum(n for _, n, _ in entries)
        if total != heads:
            raise AttnInputError(
                f"mechanism: the heads of the mix must sum to heads={heads}, got {total} "
                f"({', '.join(f'{name}: {n}' for name, n, _ in entries)})"
            )
    groups, q_start, kv_start = [], 0, 0
    for name, n, options in entries:
        if (n * kv_heads) % heads:
            raise AttnInputError(
                f"mechanism: {name!r} gets {n} of {heads} query heads, which must hold a whole "
                f"number of the {kv_heads} key heads ({heads // kv_heads} query heads each)"
            )
        n_kv = n * kv_heads // heads
        groups.append(HeadGroup(name, n, n_kv, q_start, kv_start, options))
        q_start, kv_start = q_start + n, kv_start + n_kv
    return groups


def build_mechanism(group: HeadGroup, causal: bool) -> Mechanism:
    """The group's mechanism, refused before any computation when its Spec cannot serve.

    A mechanism of the ``heads`` family owns its projections and is a layer of
    its own; it does not go inside :class:`Attention`.
    """
    spec = mechanism_class(group.name).spec
    if spec.family == "heads":
        raise AttnInputError(
            f"mechanism: {group.name!r} is a layer-level mechanism (family 'heads') with its "
            f"own projections; use it as a layer, not inside attnlab.nn.Attention"
        )
    if causal and not spec.causal:
        raise AttnInputError(
            f"causal: mechanism {group.name!r} has no causal form; build the layer with "
            f"causal=False or choose a mechanism whose Spec has causal=True"
        )
    if not causal and not spec.noncausal:
        raise AttnInputError(
            f"causal: mechanism {group.name!r} is causal only; build the layer with causal=True"
        )
    return get(group.name, **group.config)


class Attention(nn.Module):
    """Multi-head attention with projections, rotary positions and any attnlab mechanism.

    ``x`` [B, N, dim] is projected to ``heads`` query heads and ``kv_heads``
    key/value heads of width ``head_dim`` (default ``dim // heads``); keys and
    values come from ``context`` [B, M, context_dim] in cross-attention. Rotary
    embedding (arXiv:2104.09864) rotates queries and keys of self-attention by
    their positions; cross-attention has no shared positions and is not
    rotated. The heads are split among the mechanisms (:func:`head_groups`),
    each group runs its mechanism on its slice of the heads under the tensor
    contract, and the concatenated heads go through the output projection.

    ``causal`` is the mode passed to every mechanism; a mechanism whose Spec
    lacks that mode is refused at construction. ``**config`` are the options of
    a single mechanism (``Attention(64, 4, mechanism="window", window=16)``).

    Decoding: :meth:`init_cache` and :meth:`step` run the causal layer a few
    tokens at a time. A mechanism whose Spec has ``decode`` keeps its own state
    (``init_state``/``step``: a recurrent state for linear attention, a KV
    cache for softmax, a rolling cache for a window); one without keeps every
    projected query, key and value and recomputes the causal pass over them,
    returning the rows of the new tokens. Decoding then equals the full pass
    for every mechanism whose pattern over a prefix does not depend on the
    tokens or the length after it (token causality, no length-dependent random
    blocks); block- or value-causal routing (SpargeAttn, PSA, MoSA) and
    BigBird's random blocks choose differently on a prefix, so their decoded
    rows differ from a full pass, as they would in any decoder.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        mechanism: str | Sequence[Sequence[Any]] = "softmax",
        rotary: bool = True,
        causal: bool = True,
        *,
        head_dim: int | None = None,
        context_dim: int | None = None,
        bias: bool = False,
        rotary_base: float = 10000.0,
        **config: Any,
    ) -> None:
        super().__init__()
        self.dim = _check_count("dim", dim)
        self.heads = _check_count("heads", heads)
        self.kv_heads = heads if kv_heads is None else _check_count("kv_heads", kv_heads)
        if self.heads % self.kv_heads:
            raise AttnInputError(
                f"kv_heads: expected a divisor of heads={heads}, got {self.kv_heads}"
            )
        if head_dim is None:
            if dim % heads:
                raise AttnInputError(
                    f"heads: expected a divisor of dim={dim} (or pass head_dim), got {heads}"
                )
            head_dim = dim // heads
        self.head_dim = _check_count("head_dim", head_dim)
        if not isinstance(causal, bool):
            raise AttnInputError(f"causal: expected True or False, got {causal!r}")
        self.causal = causal
        self.context_dim = dim if context_dim is None else _check_count("context_dim", context_dim)
        self.groups = head_groups(mechanism, self.heads, self.kv_heads, config)
        self.mechanisms = nn.ModuleList(build_mechanism(g, causal) for g in self.groups)
        self.q_proj = nn.Linear(dim, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.context_dim, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.context_dim, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, dim, bias=bias)
        self.rotary = Rotary(self.head_dim, rotary_base) if rotary else None

    # --- shapes ----------------------------------------------------------------------------

    def _check_input(self, name: str, x: object, width: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != width:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise AttnInputError(f"{name}: expected a tensor [B, N, {width}], got {got}")
        return x

    def _heads(self, x: torch.Tensor, proj: nn.Linear, n_heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, n_heads, self.head_dim).transpose(1, 2)

    def _project(self, x, context, offset):
        q = self._heads(x, self.q_proj, self.heads)
        source = x if context is None else context
        k = self._heads(source, self.k_proj, self.kv_heads)
        v = self._heads(source, self.v_proj, self.kv_heads)
        if self.rotary is not None and context is None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        return q, k, v

    def _merge(self, outs: list[torch.Tensor]) -> torch.Tensor:
        out = torch.cat(outs, dim=1)  # [B, H, N, head_dim]
        b, h, n, d = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, h * d))

    @staticmethod
    def _slice(g: HeadGroup, q, k, v):
        return (
            q[:, g.q_start : g.q_start + g.heads],
            k[:, g.kv_start : g.kv_start + g.kv_heads],
            v[:, g.kv_start : g.kv_start + g.kv_heads],
        )

    # --- the full pass ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``x`` [B, N, dim] over itself, or over ``context`` [B, M, context_dim].

        Returns [B, N, dim].
        """
        x = self._check_input("x", x, self.dim)
        if context is not None:
            context = self._check_input("context", context, self.context_dim)
            if context.shape[0] != x.shape[0]:
                raise AttnInputError(
                    f"context: expected batch size {x.shape[0]} of x, got {context.shape[0]}"
                )
            no_cross = [m.spec.name for m in self.mechanisms if not m.spec.cross]
            if no_cross and context.shape[1] != x.shape[1]:
                raise AttnInputError(
                    f"context: mechanism {', '.join(no_cross)} has no cross-attention form, so "
                    f"the context must have the length of x ({x.shape[1]}), got {context.shape[1]}"
                )
        elif self.context_dim != self.dim:
            raise AttnInputError(
                f"context: this layer has context_dim={self.context_dim} != dim={self.dim}, "
                f"so it is cross-attention only; pass context [B, M, {self.context_dim}]"
            )
        q, k, v = self._project(x, context, 0)
        outs = [
            mech(*self._slice(g, q, k, v), causal=self.causal)
            for g, mech in zip(self.groups, self.mechanisms, strict=True)
        ]
        return self._merge(outs)

    # --- decoding --------------------------------------------------------------------------

    def init_cache(
        self,
        batch: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, Any]:
        """An empty decode cache for ``batch`` sequences: position 0 and one state per group."""
        if not self.causal:
            raise AttnInputError("causal: decoding needs a causal layer, this one has causal=False")
        _check_count("batch", batch)
        dtype = self.q_proj.weight.dtype if dtype is None else dtype
        device = self.q_proj.weight.device if device is None else device
        states = []
        for g, mech in zip(self.groups, self.mechanisms, strict=True):
            if mech.spec.decode:
                state = mech.init_state(
                    batch,
                    g.heads,
                    g.kv_heads,
                    self.head_dim,
                    self.head_dim,
                    dtype=dtype,
                    device=device,
                )
            else:
                empty = torch.zeros(batch, 0, self.head_dim, dtype=dtype, device=device)
                state = {
                    "q": empty[:, None].expand(batch, g.heads, 0, self.head_dim),
                    "k": empty[:, None].expand(batch, g.kv_heads, 0, self.head_dim),
                    "v": empty[:, None].expand(batch, g.kv_heads, 0, self.head_dim),
                }
            states.append(state)
        return {"position": 0, "states": states}

    def step(self, x: torch.Tensor, cache: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The outputs [B, t, dim] of ``t`` new tokens ``x`` [B, t, dim], and the updated cache.

        Running a sequence through ``step`` in pieces gives the rows of the
        causal full pass (:meth:`forward`).
        """
        x = self._check_input("x", x, self.dim)
        if not isinstance(cache, dict) or "states" not in cache:
            raise AttnInputError("cache: expected the dict made by init_cache()")
        if self.context_dim != self.dim:
            raise AttnInputError("step: decoding is for self-attention; this layer is cross-only")
        position = cache["position"]
        q, k, v = self._project(x, None, position)
        outs, states = [], []
        for g, mech, state in zip(self.groups, self.mechanisms, cache["states"], strict=True):
            qs, ks, vs = self._slice(g, q, k, v)
            if mech.spec.decode:
                out, state = mech.step(qs, ks, vs, state)
            else:
                state = {
                    "q": torch.cat([state["q"], qs], dim=2),
                    "k": torch.cat([state["k"], ks], dim=2),
                    "v": torch.cat([state["v"], vs], dim=2),
                }
                out = mech(state["q"], state["k"], state["v"], causal=True)[:, :, -x.shape[1] :]
            outs.append(out)
            states.append(state)
        return self._merge(outs), {"position": position + x.shape[1], "states": states}

    def state_size(self, n: int) -> int:
        """Floats per sequence that decoding holds after ``n`` tokens (all groups).

        The mechanism's own ``state_size`` where its Spec has ``decode``
        (a KV cache grows with n, a recurrent state does not); otherwise the
        kept queries, keys and values.
        """
        total = 0
        for g, mech in zip(self.groups, self.mechanisms, strict=True):
            if mech.spec.decode:
                total += mech.state_size(
                    n,
                    q_heads=g.heads,
                    kv_heads=g.kv_heads,
                    head_dim=self.head_dim,
                    value_dim=self.head_dim,
                )
            else:
                total += n * (g.heads + 2 * g.kv_heads) * self.head_dim
        return int(total)

    def extra_repr(self) -> str:
        mix = ", ".join(f"{g.name}×{g.heads}" for g in self.groups)
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}, "
            f"rotary={self.rotary is not None}, mechanisms=[{mix}]"
        )
