"""Keeping a non-finite key or value away from the rows that do not attend it.

Softmax attention gives a hidden key the weight 0, and 0 x NaN is NaN: a NaN
or an infinity in a key or value that a row may not see (masked, causally
invisible, outside its window or its routed blocks) would reach that row
through the product of weights and values wherever an engine multiplies a
hidden entry by zero. :func:`attend_isolated` runs a mechanism on inputs
whose non-finite entries are cleared with ``torch.where``, then marks as NaN
exactly the rows that gave a poisoned key a nonzero weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def nonfinite_positions(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Bool [B, Hkv, Nk]: key positions whose key or value holds a NaN or an infinity
    (None when every entry is finite).

    A finite sum of all entries proves them all finite in one reduction; only
    otherwise (a non-finite entry, or a sum that overflowed) are the positions
    located."""
    if bool(torch.isfinite(k.sum() + v.sum())):
        return None
    bad = ~torch.isfinite(k).all(dim=-1) | ~torch.isfinite(v).all(dim=-1)
    return bad if bool(bad.any()) else None


def attend_isolated(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``attend(q, k, v)`` such that a non-finite key or value reaches only the rows
    that attend it.

    With finite inputs this is ``attend(q, k, v)`` itself. Otherwise the
    output is ``attend`` on k and v with their non-finite entries set to 0,
    and NaN in every row whose weights over the poisoned positions are not
    all zero: the weights come from a second call of ``attend`` on the same
    cleared keys (so the same routing) with a value that is 1 at the
    poisoned positions and 0 elsewhere. Rows of other batch samples, and
    rows that cannot see a poisoned position, keep their finite output.
    """
    bad = nonfinite_positions(k, v)
    if bad is None:
        return attend(q, k, v)
    k = torch.where(torch.isfinite(k), k, 0.0)
    v = torch.where(torch.isfinite(v), v, 0.0)
    out = attend(q, k, v)
    with torch.no_grad():
        weight = attend(q, k, bad[..., None].to(v.dtype))  # [B, Hq, Nq, 1]
    return torch.where(weight != 0, float("nan"), out)
