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


def seen(total: torch.Tensor) -> torch.Tensor:
    """Rows that attended something: a positive weight sum, or a NaN one (a NaN key or
    value the row may see). A NaN sum must not read as "no key" and turn into zeros."""
    return (total > 0) | torch.isnan(total)


def divide_or_zero(num: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """num / total for the rows that attended something (:func:`seen`), zeros for rows with
    nothing to attend (total <= 0). A NaN total stays NaN: it is never read as zero."""
    tiny = torch.finfo(total.dtype).tiny
    return torch.where(seen(total), num / total.clamp_min(tiny), 0.0)


def _non_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Bool [B, H, N]: the vectors of x [B, H, N, E] with a NaN or an infinity."""
    return ~torch.isfinite(x).all(dim=-1)


def rows_seeing(
    bad_keys: torch.Tensor, causal: bool, mask: torch.Tensor | None, nq: int
) -> torch.Tensor:
    """Bool [B, H, Nq]: the query rows that may attend at least one of ``bad_keys`` [B, H, Nk]
    under the bottom-right causal mask and the 4-d bool ``mask`` (None: no mask)."""
    b, h, nk = bad_keys.shape
    if mask is None and not causal:
        return bad_keys.any(dim=-1, keepdim=True).expand(b, h, nq)
    if mask is None:  # causal: rows at or after the first bad key
        cols = torch.arange(nk, device=bad_keys.device)
        first = torch.where(bad_keys, cols, nk).amin(dim=-1, keepdim=True)  # [B, H, 1]
        rows = torch.arange(nq, device=bad_keys.device) + (nk - nq)
        return rows >= first
    allowed = mask if not causal else mask & causal_mask(nq, nk, mask.device)
    return (allowed & bad_keys[:, :, None, :]).any(dim=-1)


def isolate_non_finite(
    rerun,
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Keep a NaN or infinity of the input in the rows that may see it (DESIGN.md, item 9).

    ``out`` is a mechanism's output with some non-finite entry. Products with a zero weight
    (a masked score times its value, a lower triangle of ones times the chunk states, a
    halo that lies in the previous batch row) turn one NaN or infinity into NaN in rows
    that never see it. Where q, k or v carry one, the call is run again (``rerun(q, k, v)``)
    with those query, key and value vectors set to zero, and each row keeps the first
    result only if it sees one of them: its own query, or a key or value it may attend
    under ``causal`` and ``mask``. Every other row, in every sample, gets the rerun's
    result, in which no non-finite input took part. A mechanism whose definition mixes
    every key (a non-causal feature sum) marks every row of that sample as seeing them.
    """
    groups = q.shape[1] // k.shape[1]
    bad_q, bad_k, bad_v = _non_finite_rows(q), _non_finite_rows(k), _non_finite_rows(v)
    bad_kv = bad_k | bad_v  # [B, Hkv, Nk]
    if not (bool(bad_q.any()) or bool(bad_kv.any())):
        return out  # the mechanism itself over- or underflowed: nothing to isolate
    q = q.masked_fill(bad_q[..., None], 0.0)
    k = k.masked_fill(bad_k[..., None], 0.0)
    v = v.masked_fill(bad_v[..., None], 0.0)
    clean = rerun(q, k, v)
    sees = bad_q | rows_seeing(repeat_kv_rows(bad_kv, groups), causal, mask, q.shape[2])
    return torch.where(sees[..., None], out, clean)


def repeat_kv_rows(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, N] -> [B, Hkv * groups, N], like :func:`repeat_kv` for one value per row."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * groups, N, D], each kv head serving ``groups`` query heads."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)
