"""Input checks shared by every mechanism: the tensor contract (SDPA's convention).

Every failure raises :class:`AttnInputError` naming the argument, what was
expected and what came. Nothing is broadcast or truncated silently.
"""

from __future__ import annotations

import math

import torch

from .errors import AttnInputError

FLOAT_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}

_NAMES = {"q": "[B, Hq, Nq, D]", "k": "[B, Hkv, Nk, D]", "v": "[B, Hkv, Nk, Dv]"}


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise AttnInputError(
            f"{name}: expected a torch.Tensor {_NAMES[name]}, got {type(x).__name__}"
        )
    if x.dim() != 4:
        raise AttnInputError(
            f"{name}: expected 4 dimensions {_NAMES[name]}, got shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise AttnInputError(
            f"{name}: expected a floating dtype ({', '.join(FLOAT_DTYPES.values())}), got {x.dtype}"
        )
    if 0 in x.shape:
        raise AttnInputError(f"{name}: expected no empty dimension, got shape {tuple(x.shape)}")
    return x


def check_qkv(q: object, k: object, v: object) -> tuple[int, int, int, int, int, int]:
    """Check q, k, v against the tensor contract; return (B, Hq, Hkv, Nq, Nk, D)."""
    q, k, v = _check_tensor("q", q), _check_tensor("k", k), _check_tensor("v", v)
    b, hq, nq, d = q.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise AttnInputError(
            f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype} and v {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise AttnInputError(
            f"k, v: expected the device of q ({q.device}), got k {k.device} and v {v.device}"
        )
    if k.shape[0] != b or v.shape[0] != b:
        raise AttnInputError(
            f"k, v: expected batch size B={b} of q, got k {k.shape[0]} and v {v.shape[0]}"
        )
    hkv = k.shape[1]
    if v.shape[1] != hkv:
        raise AttnInputError(f"v: expected Hkv={hkv} heads like k, got {v.shape[1]}")
    if hq % hkv != 0:
        raise AttnInputError(
            f"k: expected a number of heads Hkv that divides Hq={hq}, got Hkv={hkv}"
        )
    if k.shape[3] != d:
        raise AttnInputError(f"k: expected head dim D={d} of q, got {k.shape[3]}")
    nk = k.shape[2]
    if v.shape[2] != nk:
        raise AttnInputError(f"v: expected Nk={nk} positions like k, got {v.shape[2]}")
    return b, hq, hkv, nq, nk, d


def check_mask(mask: object, b: int, hq: int, nq: int, nk: int, device) -> torch.Tensor | None:
    """Check a boolean mask broadcastable to [B, Hq, Nq, Nk]; return it as a 4-d view."""
    if mask is None:
        return None
    target = (b, hq, nq, nk)
    if not isinstance(mask, torch.Tensor):
        raise AttnInputError(
            f"mask: expected a bool torch.Tensor or None, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise AttnInputError(
            f"mask: expected dtype torch.bool (True = may attend), got {mask.dtype}"
        )
    if mask.dim() > 4:
        raise AttnInputError(
            f"mask: expected at most 4 dimensions broadcastable to {list(target)}, "
            f"got shape {tuple(mask.shape)}"
        )
    mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for size, want in zip(mask4.shape, target, strict=True):
        if size not in (1, want):
            raise AttnInputError(
                f"mask: expected a shape broadcastable to [B, Hq, Nq, Nk] = {list(target)}, "
                f"got {tuple(mask.shape)}"
            )
    if mask4.device != device:
        raise AttnInputError(f"mask: expected device {device} like q, got {mask4.device}")
    return mask4


def check_scale(scale: object, d: int) -> float:
    """Return the softmax scale: ``D ** -0.5`` by default, else a finite number."""
    if scale is None:
        return d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AttnInputError(f"scale: expected a finite float or None, got {scale!r}")
    return float(scale)


def check_causal(causal: object) -> bool:
    """Accept only a real bool for ``causal``, so that a stray mask there is caught."""
    if not isinstance(causal, bool):
        raise AttnInputError(f"causal: expected True or False, got {type(causal).__name__}")
    return causal


def check_positive_int(name: str, value: object) -> int:
    """A Config option that must be a positive integer (a block size, a window, ...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttnInputError(f"{name}: expected a positive integer, got {value!r}")
    return value


def check_nonnegative(name: str, value: object) -> float:
    """A Config option that must be a finite number >= 0 (a standard deviation, a rate, ...)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise AttnInputError(f"{name}: expected a number >= 0, got {value!r}")
    return float(value)
