"""Mask helpers: bottom-right causal masks, tile slicing and padding hygiene."""

from __future__ import annotations

import torch


def causal_mask(nq: int, nk: int, device=None) -> torch.Tensor:
    """Bool [Nq, Nk] mask, aligned bottom-right: query i sees keys j <= i + (Nk - Nq)."""
    offset = nk - nq
    rows = torch.arange(nq, device=device).unsqueeze(1)
    cols = torch.arange(nk, device=device).unsqueeze(0)
    return cols <= rows + offset


def slice_mask(mask: torch.Tensor | None, qs: slice, ks: slice) -> torch.Tensor | None:
    """The tile ``[..., qs, ks]`` of a 4-d broadcastable mask (size-1 dims kept)."""
    if mask is None:
        return None
    rows = qs if mask.shape[-2] != 1 else slice(None)
    cols = ks if mask.shape[-1] != 1 else slice(None)
    return mask[..., rows, cols]


def dead_keys(mask: torch.Tensor) -> torch.Tensor:
    """Bool [B|1, 1, Nk, 1]: keys that no query of any head may attend (padding)."""
    alive = mask.any(dim=2).any(dim=1)  # [B|1, Nk]
    return (~alive)[:, None, :, None]


def zero_dead_keys(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero keys and values that the mask hides from every query.

    Padded positions may hold anything, NaN included; a zero weight times NaN is
    still NaN, so the values themselves are cleared before any mechanism runs.
    """
    if mask is None or mask.shape[-1] == 1:
        return k, v
    dead = dead_keys(mask)
    if not bool(dead.any()):
        return k, v
    return k.masked_fill(dead, 0.0), v.masked_fill(dead, 0.0)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * groups, N, D], each kv head serving ``groups`` query heads."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)
