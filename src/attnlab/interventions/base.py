"""The common part of interventions: head selection and the context manager that applies an edit.

An intervention is an :class:`Edit` (an :class:`attnlab.models.AttentionEdit`)
placed on the model's attnlab attention hook (:func:`attnlab.models.edited`) for
the duration of a ``with`` block; its layer and head indices are checked against
the model first. Edits
compose with each other, with :func:`attnlab.models.use` and with
:func:`attnlab.models.capture`; on exit the model is exactly as before.

- an edit with only an ``output`` form (head scaling) works with any mechanism;
- an edit with a ``probs`` form acts on exact softmax probabilities block by
  block (analyses then see the edited attention);
- ``needs_probs`` edits have no other form, so they make the hook compute
  exact softmax attention explicitly (slower than fused SDPA, same memory bound).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch

from attnlab.core.errors import AttnInputError
from attnlab.models import edited

HeadSpec = None | str | Mapping[int, Iterable[int] | None] | Iterable[tuple[int, int]]


class Heads:
    """A set of (layer, head) pairs.

    Built from ``None`` or ``"all"`` (every head), ``{layer: [heads] | None}``
    (``None``: the whole layer) or an iterable of ``(layer, head)`` pairs.
    """

    def __init__(self, spec: HeadSpec = None) -> None:
        self.all = spec is None or spec == "all"
        self.by_layer: dict[int, set[int] | None] = {}
        if self.all:
            return
        if isinstance(spec, str):
            raise AttnInputError(
                f"heads: expected 'all', a dict or (layer, head) pairs, got {spec!r}"
            )
        if isinstance(spec, Mapping):
            for layer, heads in spec.items():
                self.by_layer[int(layer)] = None if heads is None else {int(h) for h in heads}
        else:
            for pair in spec:
                try:
                    layer, head = (int(x) for x in pair)
                except (TypeError, ValueError) as exc:
                    raise AttnInputError(
                        f"heads: expected (layer, head) pairs, got {pair!r}"
                    ) from exc
                self.by_layer.setdefault(layer, set())
                chosen = self.by_layer[layer]
                if chosen is not None:
                    chosen.add(head)

    def check(self, n_layers: int, n_heads: int) -> None:
        """Raise AttnInputError naming every layer or head index the model does not have."""
        if self.all:
            return
        bad_layers = sorted(la for la in self.by_layer if not 0 <= la < n_layers)
        if bad_layers:
            raise AttnInputError(
                f"heads: the model has layers 0..{n_layers - 1}, got layer {bad_layers}"
            )
        for layer, chosen in self.by_layer.items():
            bad = sorted(h for h in chosen or () if not 0 <= h < n_heads)
            if bad:
                raise AttnInputError(f"heads: layer {layer} has heads 0..{n_heads - 1}, got {bad}")

    def selector(self, layer: int, n_heads: int) -> torch.Tensor | None:
        """Bool [n_heads] of the chosen heads of ``layer``; None when none is chosen."""
        if self.all:
            return torch.ones(n_heads, dtype=torch.bool)
        if layer not in self.by_layer:
            return None
        chosen = self.by_layer[layer]
        sel = torch.zeros(n_heads, dtype=torch.bool)
        if chosen is None:
            sel[:] = True
            return sel
        bad = [h for h in chosen if not 0 <= h < n_heads]
        if bad:
            raise AttnInputError(f"heads: layer {layer} has heads 0..{n_heads - 1}, got {bad}")
        sel[sorted(chosen)] = True
        return sel

    def __repr__(self) -> str:
        if self.all:
            return "Heads(all)"
        return f"Heads({ {k: sorted(v) if v else v for k, v in self.by_layer.items()} })"


class Edit:
    """One change to attention, applied inside attnlab's attention hook.

    ``output`` edits the attention output [B, Hq, Nq, Dv] (before the output
    projection); ``probs`` edits a block of exact softmax probabilities
    [B, Hq, rows, kend] whose first row is at absolute position ``row0``;
    ``prepare`` sees the layer's q, k once before its blocks.
    """

    needs_probs: ClassVar[bool] = False  # only a `probs` form: forces exact explicit attention
    has_probs: ClassVar[bool] = False  # a `probs` form, used whenever probabilities are computed
    heads: Heads = Heads("all")  # the (layer, head) pairs the edit changes

    def check(self, n_layers: int, n_heads: int) -> None:
        """Reject layer or head indices the model does not have (AttnInputError)."""
        self.heads.check(n_layers, n_heads)

    def prepare(self, layer, q, k, *, causal, mask, scale) -> None:
        """Per-layer set-up before the blocks (default: nothing to prepare)."""
        return None

    def probs(self, layer: int, p: torch.Tensor, row0: int) -> torch.Tensor:
        """The edited probabilities of one block (default: unchanged)."""
        return p

    def output(self, layer: int, out: torch.Tensor, q, k, v) -> torch.Tensor:
        """The edited attention output (default: unchanged)."""
        return out


def first_keys(mask: torch.Tensor | None, batch: int, device=None) -> torch.Tensor:
    """Index [B] of each sequence's first key that is not padding (0 without a mask)."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    last_row = mask[:, 0, -1, :]  # the last query sees every real key
    return last_row.int().argmax(dim=-1).expand(batch)


def finite_number(name: str, value: Any, *, low: float | None = None) -> float:
    """``value`` as a float, or AttnInputError naming ``name`` if it is not a finite number
    (bools, NaN, infinities and strings are refused) or is below ``low``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (low is not None and value < low):
        bound = "" if low is None else f" >= {low:g}"
        raise AttnInputError(f"{name}: expected a finite number{bound}, got {value!r}")
    return float(value)


@contextlib.contextmanager
def applied(model: torch.nn.Module, edit: Edit) -> Iterator[Any]:
    """Put ``edit`` on ``model``'s attention hook inside the block; remove it on exit.

    The edit's head indices are checked against the model first (AttnInputError).
    """
    with edited(model, edit) as placed:
        yield placed
