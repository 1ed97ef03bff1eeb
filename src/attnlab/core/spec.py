"""`Spec`: the single source of facts about a mechanism."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FAMILIES = ("exact", "linear", "sparse", "heads")

CAPABILITIES = ("exact", "causal", "noncausal", "cross", "decode", "backward")


@dataclass(frozen=True)
class Spec:
    """What a mechanism is, what it supports and what it costs.

    ``causal``/``noncausal``: the modes it computes; ``cross``: whether queries
    and keys may come from sequences of different lengths (Nq != Nk);
    ``decode``: it has ``init_state``/``step``; ``backward``: gradients flow
    through it; ``exact``: it equals softmax attention for every input (up to
    floating point), otherwise ``limit(n)`` gives the setting where it does;
    ``mask``: it accepts an arbitrary boolean mask; ``dtypes``: the floating
    dtypes it computes in.
    """

    name: str
    family: str
    title: str
    paper: str
    exact: bool
    causal: bool = True
    noncausal: bool = True
    cross: bool = True
    decode: bool = False
    backward: bool = True
    mask: bool = True
    complexity: str = "O(N²·D)"
    dtypes: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Spec.family: expected one of {FAMILIES}, got {self.family!r}")
        if not self.paper:
            raise ValueError(f"Spec.paper: every mechanism cites its paper; {self.name!r} has none")

    def to_dict(self) -> dict:
        """The Spec as plain JSON-ready values."""
        data = asdict(self)
        data["dtypes"] = list(self.dtypes)
        return data
