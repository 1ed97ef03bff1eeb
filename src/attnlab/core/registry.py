"""The registry: every mechanism by name, and the functional face ``attention``."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch

from .errors import AttnInputError
from .mechanism import Mechanism
from .spec import CAPABILITIES, FAMILIES, Spec

_REGISTRY: dict[str, type[Mechanism]] = {}
_LOADED = False


def register(cls: type[Mechanism]) -> type[Mechanism]:
    """Class decorator: add a mechanism to the registry under ``cls.spec.name``."""
    spec = getattr(cls, "spec", None)
    if not isinstance(spec, Spec):
        raise TypeError(f"{cls.__name__}: a registered mechanism needs a `spec = Spec(...)`")
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not cls:
        raise ValueError(f"mechanism name {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = cls
    return cls


def _load_all() -> None:
    """Import every module under ``attnlab.mechanisms`` so that they register."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module("attnlab.mechanisms")
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
    _LOADED = True


def names(family: str | None = None, **capabilities: bool) -> list[str]:
    """Registered mechanism names, optionally filtered by family and Spec capabilities.

    ``names(family="linear", decode=True)`` lists linear mechanisms that decode.
    """
    _load_all()
    if family is not None and family not in FAMILIES:
        raise AttnInputError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    for cap in capabilities:
        if cap not in CAPABILITIES:
            raise AttnInputError(
                f"{cap}: not a capability; expected one of {', '.join(CAPABILITIES)}"
            )
    out = []
    for name, cls in _REGISTRY.items():
        spec = cls.spec
        if family is not None and spec.family != family:
            continue
        if any(getattr(spec, cap) != want for cap, want in capabilities.items()):
            continue
        out.append(name)
    return sorted(out, key=lambda n: (FAMILIES.index(_REGISTRY[n].spec.family), n))


def mechanism_class(name: str) -> type[Mechanism]:
    """The class registered under ``name``."""
    _load_all()
    if name not in _REGISTRY:
        raise AttnInputError(f"mechanism: unknown name {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]


def spec(name: str) -> Spec:
    """The Spec of the mechanism registered under ``name``."""
    return mechanism_class(name).spec


def get(name: str, **config: Any) -> Mechanism:
    """Build the mechanism ``name`` with its Config options, e.g. ``get("window", window=128)``.

    Every option is checked against the Config's annotations and bounds (text such as
    ``"false"`` or ``"128"`` from a command line is parsed strictly). The module comes in
    eval mode, deterministic from call to call; ``.train()`` lets its running statistics
    move (see :class:`Mechanism`).
    """
    return mechanism_class(name)(**config)


# torch SDPA's keywords, and what attnlab calls them.
_SDPA_KEYWORDS = {
    "is_causal": "causal=True|False",
    "attn_mask": "mask= (a bool tensor, True = may attend)",
    "dropout_p": "no dropout (attnlab computes attention only; apply dropout outside)",
    "enable_gqa": "nothing: grouped-query heads (Hkv dividing Hq) are always accepted",
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mechanism: str = "softmax",
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    **config: Any,
) -> torch.Tensor:
    """Attention of q over (k, v) by the named mechanism: the functional face of attnlab.

    Shapes follow ``torch.nn.functional.scaled_dot_product_attention``:
    q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> [B, Hq, Nq, Dv]. SDPA's own
    keywords (``is_causal``, ``attn_mask``) are refused with attnlab's names. The module is
    built for this call and run in eval mode: no running statistic moves.
    """
    for keyword, ours in _SDPA_KEYWORDS.items():
        if keyword in config:
            raise AttnInputError(
                f"{keyword}: torch SDPA's keyword is not an attnlab option; attnlab takes {ours}"
            )
    mech = get(mechanism, **config).eval()
    return mech(q, k, v, causal=causal, mask=mask, scale=scale)
