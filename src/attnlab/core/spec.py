"""`Spec`: the single source of facts about a mechanism."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FAMILIES = ("exact", "linear", "sparse", "heads")

CAPABILITIES = ("exact", "causal", "noncausal", "cross", "decode", "backward")

# How far a causal form is causal (``Spec.causality``), in the words the README legend uses.
CAUSALITIES = {
    "token": "the output of query i never depends on a query, key or value after i",
    "block": (
        "routing by blocks of `block` positions: the output of query i never depends on a "
        "token after the end of its block, nor on a value after i"
    ),
    "values": (
        "routing reads every key: the output of query i never depends on a query or value "
        "after i, but later keys can change what is chosen"
    ),
}


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

    ``causality``: how far the causal form (``causal=True``) is causal, stated
    for self-attention (Nq = Nk, positions aligned):

    - ``"token"`` (default): the output of query i depends on no query, key or
      value at a position after i.
    - ``"block"``: the routing pools whole blocks of ``config.block``
      positions (SpargeAttn, PSA), so the output of query i may depend on the
      queries and keys after i inside its own block, through which blocks are
      chosen, but on no token after the end of that block
      (positions >= (i // block + 1) · block), and on no value after i.
    - ``"values"``: the routing ranks every key of the sequence (expert
      choice, MoSA), so later keys may change what query i attends to; the
      output of query i depends on no query or value after i.

    The contract tests check exactly the declared property.
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
    causality: str = "token"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"Spec.family: expected one of {FAMILIES}, got {self.family!r}")
        if not self.paper:
            raise ValueError(f"Spec.paper: every mechanism cites its paper; {self.name!r} has none")
        if self.causality not in CAUSALITIES:
            raise ValueError(
                f"Spec.causality: expected one of {tuple(CAUSALITIES)}, got {self.causality!r}"
            )
        if self.causality != "token" and not self.causal:
            raise ValueError(
                f"Spec.causality: {self.name!r} has no causal form (causal=False), so its "
                f"causality must be 'token' (the default), got {self.causality!r}"
            )

    def to_dict(self) -> dict:
        """The Spec as plain JSON-ready values."""
        data = asdict(self)
        data["dtypes"] = list(self.dtypes)
        return data
