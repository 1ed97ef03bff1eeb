"""Neighborhood attention in 1, 2 and 3 dimensions (Faster and Generalized NA)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnlab.core import Spec, register
from attnlab.core.blocks import StaticBlockSparse, check_backend, ranges_to_candidates
from attnlab.core.checks import check_positive_int
from attnlab.core.errors import AttnInputError

from ._isolation import attend_isolated


def _per_axis(name: str, value, dims: int, kind=int) -> tuple:
    """An option given once for all axes or once per axis, as a tuple of length ``dims``."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    if len(values) != dims:
        raise AttnInputError(
            f"{name}: expected one value or {dims} (one per axis of shape), got {len(values)}"
        )
    for x in values:
        if kind is bool and not isinstance(x, bool):
            raise AttnInputError(f"{name}: expected True or False per axis, got {x!r}")
        if kind is int:
            check_positive_int(name, x)
    return values


def axis_window(x, length: int, kernel: int, dilation: int, stride: int, causal: bool):
    """The neighborhood of coordinate ``x`` on one axis: (group, start, end).

    Keys x' with ``x' % dilation == group`` and ``start <= x' // dilation < end``.
    Dilation splits the axis into ``dilation`` interleaved groups; inside its
    group (index t = x // dilation, group length Lg) a query sees ``kernel``
    consecutive group members (fewer only if Lg < kernel), centred on the
    stride group's leader and shifted inwards at the borders, so every query
    sees the same number of keys (NATTEN). With ``stride`` s, the s
    consecutive queries ``t // s`` share the window of their leader: the
    centre one, ``first + s // 2`` (for an even s the right-hand one of the
    two centres, as NATTEN's ``get_win_start`` defines it), or the last one
    on a causal axis. An even ``kernel`` reaches ``kernel // 2`` members to
    the left of the leader and one fewer to the right (NATTEN's
    window_left/window_right). A causal axis sees the ``kernel`` group
    members ending at the leader, and never beyond the query itself. Works
    on Python ints and on integer tensors alike.
    """
    group = x % dilation
    t = x // dilation
    glen = (length - group + dilation - 1) // dilation
    k = torch.clamp(glen, max=kernel) if isinstance(glen, torch.Tensor) else min(glen, kernel)
    first = (t // stride) * stride
    if causal:
        leader = _minimum(first + stride - 1, glen - 1)
        start = _maximum(leader - k + 1, 0)
        return group, start, t + 1
    leader = _minimum(first + stride // 2, glen - 1)
    start = _maximum(_minimum(leader - k // 2, glen - k), 0)
    return group, start, start + k


def _minimum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)


def _maximum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


@register
class Neighborhood(StaticBlockSparse):
    """Neighborhood attention: each token attends the ``kernel`` nearest tokens per axis.

    Tokens lie on a 1-, 2- or 3-D grid ``shape`` (row-major, N = prod(shape);
    one axis may be -1, inferred from N). Per axis: ``kernel`` size, ``dilation``
    (attend every d-th token), ``stride`` (groups of s queries share one
    window: 1 is sliding-window neighborhood attention, s = kernel is blocked
    attention) and ``axis_causal``; windows are shifted inwards at the borders
    so that every query sees the same number of keys. Definitions of
    "Faster Neighborhood Attention" (Hassani et al., arXiv:2403.04690) and
    "Generalized Neighborhood Attention" (stride, arXiv:2504.16922); see
    :func:`axis_window`. ``causal=True`` additionally hides flattened future
    tokens. Computed block-sparsely on the flattened sequence (core.blocks).
    A NaN or infinity in a key or value reaches only the rows whose
    neighborhood (and mask) holds it (:func:`._isolation.attend_isolated`).

    Compared with SHI-Labs/NATTEN (``get_win_start``/``get_win_end`` of its
    kernels, the reference and flex masks): the same windows, border shift,
    dilation groups, stride-group leaders and causal axes. NATTEN requires
    kernel x dilation <= the axis length; attnlab also takes shorter axes, a
    dilation group then seeing all its members.
    """

    spec = Spec(
        name="neighborhood",
        family="sparse",
        title="Neighborhood attention, 1/2/3-D with dilation, stride, per-axis causality",
        paper="arXiv:2504.16922",
        exact=False,
        cross=False,
        complexity="O(N·prod(kernel)·D)",
    )
    tiny_config: ClassVar[dict] = {
        "shape": (-1, 3),
        "kernel": (3, 2),
        "dilation": (2, 1),
        "block": 4,
    }

    @dataclass
    class Config:
        shape: tuple = (-1,)
        kernel: int | tuple = 7
        dilation: int | tuple = 1
        stride: int | tuple = 1
        axis_causal: bool | tuple = False
        block: int = 128
        backend: str = "auto"

        def __post_init__(self):
            shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else (self.shape,)
            if not 1 <= len(shape) <= 3:
                raise AttnInputError(f"shape: expected 1 to 3 axes, got {shape!r}")
            if sum(1 for s in shape if s == -1) > 1 or any(
                isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1) for s in shape
            ):
                raise AttnInputError(
                    f"shape: expected positive axis lengths with at most one -1, got {shape!r}"
                )
            self.shape = shape
            dims = len(shape)
            self.kernel = _per_axis("kernel", self.kernel, dims)
            self.dilation = _per_axis("dilation", self.dilation, dims)
            self.stride = _per_axis("stride", self.stride, dims)
            self.axis_causal = _per_axis("axis_causal", self.axis_causal, dims, kind=bool)
            for s, k in zip(self.stride, self.kernel, strict=True):
                if s > k:
                    raise AttnInputError(
                        f"stride: expected at most the kernel size per axis, got {s} > {k}"
                    )
            check_positive_int("block", self.block)
            check_backend(self.backend)

    def grid(self, n: int) -> tuple[int, ...] | None:
        """The spatial shape for N tokens (the -1 axis inferred), or None if N does not fit."""
        known = math.prod(s for s in self.config.shape if s != -1)
        if -1 in self.config.shape:
            if n % known:
                return None
            return tuple(n // known if s == -1 else s for s in self.config.shape)
        return self.config.shape if known == n else None

    def unsupported(self, q, k, v, *, causal=False, mask=None):
        reasons = super().unsupported(q, k, v, causal=causal, mask=mask)
        if self.grid(q.shape[2]) is None:
            reasons.append(
                f"q: expected N to fill the grid shape={self.config.shape} "
                f"(N = prod(shape)), got N={q.shape[2]}"
            )
        return reasons

    def _axes(self, n):
        shape = self.grid(n)
        strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
        cfg = self.config
        return list(
            zip(
                shape,
                strides,
                cfg.kernel,
                cfg.dilation,
                cfg.stride,
                cfg.axis_causal,
                strict=True,
            )
        )

    def rule(self, nq, nk, causal, heads, device=None):
        axes = self._axes(nq)

        def mask_mod(b, h, q_idx, kv_idx):
            ok = kv_idx <= q_idx if causal else None
            for length, step, kernel, dil, stride, ax_causal in axes:
                x, y = (q_idx // step) % length, (kv_idx // step) % length
                group, start, end = axis_window(x, length, kernel, dil, stride, ax_causal)
                t = y // dil
                here = (y % dil == group) & (t >= start) & (t < end)
                ok = here if ok is None else ok & here
            return ok

        return mask_mod

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        def attend(q, k, v):
            return super(Neighborhood, self).forward(q, k, v, causal=causal, mask=mask, scale=scale)

        return attend_isolated(attend, q, k, v)

    def candidates(self, nq, nk, causal, heads):
        """Key blocks between each query block's lowest and highest neighbor (flattened)."""
        pos = torch.arange(nq)
        low = torch.zeros(nq, dtype=torch.long)
        high = torch.zeros(nq, dtype=torch.long)
        for length, step, kernel, dil, stride, ax_causal in self._axes(nq):
            x = (pos // step) % length
            group, start, end = axis_window(x, length, kernel, dil, stride, ax_causal)
            low += (group + start * dil) * step
            high += (group + (end - 1) * dil) * step
        if causal:
            high = torch.minimum(high, pos)
        block = self.config.block
        nqb = -(-nq // block)
        pad = nqb * block - nq
        low = torch.nn.functional.pad(low, (0, pad), value=nk).view(nqb, block).amin(dim=1)
        high = torch.nn.functional.pad(high, (0, pad), value=-1).view(nqb, block).amax(dim=1)
        return ranges_to_candidates(low // block, high // block + 1)[None, None]

    def limit(self, n):
        dims = len(self.config.shape)
        return dataclasses.replace(
            self.config,
            kernel=(n,) * dims,
            dilation=(1,) * dims,
            stride=(1,) * dims,
            axis_causal=(False,) * dims,
        )
