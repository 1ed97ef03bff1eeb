"""Pieces shared by the recurrent-memory mechanisms (latte, gsa, delta, titans, flare).

- :func:`acc_dtype`: half-precision inputs accumulate in float32.
- :func:`align_causal`: bottom-right causal alignment of Nq queries to Nk keys for
  mechanisms whose output at key position j is a read-out of a state built from
  keys 0..j.
- :func:`seeded_normal`: fixed Gaussian parameters drawn from a seed, for the
  small projections a mechanism needs within the q, k, v contract.
- :func:`l2_normalise`: unit-norm rows that keep zero rows (padding) at zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate in: float32 for half precision, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def align_causal(
    run: Callable[[torch.Tensor], torch.Tensor], q: torch.Tensor, nk: int
) -> torch.Tensor:
    """Causal output of a per-key-position computation, aligned bottom-right.

    ``run(q_full)`` takes queries laid out on the Nk key positions
    ([B, H, Nk, D]) and returns outputs [B, H, Nk, Dv] where position j reads the
    state built from keys 0..j. Query i of q sits on key position i + Nk - Nq;
    queries with no key in their past (Nq > Nk) get zeros.
    """
    b, h, nq, d = q.shape
    if nq == nk:
        return run(q)
    seen = min(nq, nk)
    q_full = q.new_zeros(b, h, nk, d)
    q_full[:, :, nk - seen :] = q[:, :, nq - seen :]
    out_full = run(q_full)
    out = out_full.new_zeros(b, h, nq, out_full.shape[-1])
    out[:, :, nq - seen :] = out_full[:, :, nk - seen :]
    return out


_SEEDED: dict[tuple, torch.Tensor] = {}


def seeded_normal(
    seed: int, shape: tuple[int, ...], *, std: float, device, dtype: torch.dtype
) -> torch.Tensor:
    """A fixed N(0, std²) tensor drawn on the CPU from ``seed`` (same on every device)."""
    key = (seed, shape, std)
    if key not in _SEEDED:
        gen = torch.Generator().manual_seed(seed)
        _SEEDED[key] = torch.randn(shape, generator=gen, dtype=torch.float64) * std
    return _SEEDED[key].to(device=device, dtype=dtype)


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(|x|, eps) along the last axis; zero rows stay zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def chunk_size(chunk: int | None, n: int, default: int = 64) -> int:
    """The chunk length to use: the Config's, or ``default``, never beyond ``n``."""
    return max(1, min(chunk or default, n))
