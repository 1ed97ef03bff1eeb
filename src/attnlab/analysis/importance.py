"""Head importance: how much the loss changes when a head is removed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from attnlab.core.errors import AttnInputError
from attnlab.models import edited

from .base import register_analysis


class HeadGates:
    """An edit (:class:`attnlab.models.AttentionEdit`) that multiplies each head's attention
    output by a gate ``gates[layer, head]`` (float [layers, heads]; 1 keeps the head, 0
    removes it; gradients flow to ``gates`` when it requires them)."""

    needs_probs: ClassVar[bool] = False
    has_probs: ClassVar[bool] = False

    def __init__(self, gates: torch.Tensor) -> None:
        self.gates = gates

    def check(self, n_layers: int, n_heads: int) -> None:
        if tuple(self.gates.shape) != (n_layers, n_heads):
            raise AttnInputError(
                f"gates: expected one gate per head [{n_layers}, {n_heads}], "
                f"got {tuple(self.gates.shape)}"
            )

    def prepare(self, layer, q, k, *, causal, mask, scale) -> None:
        return None

    def probs(self, layer: int, p: torch.Tensor, row0: int) -> torch.Tensor:
        return p

    def output(self, layer, out, q, k, v):
        return out * self.gates[layer].to(out.dtype).view(1, -1, 1, 1)


def _loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _chunks(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.shape[0] > 1:
        return [ids[i : i + 1] for i in range(ids.shape[0])]
    n = ids.shape[1]
    return [ids[:, s : s + length] for s in range(0, n - 1, length) if s + 2 <= n]


@register_analysis
class HeadImportance:
    """Importance of each attention head to the language-modelling loss.

    After Michel et al. 2019, "Are Sixteen Heads Really Better than One?"
    (arXiv:1905.10650), with a gate ``xi_h`` on each head's output (1 = kept):

    - ``method="mask"``: ``I_h = L(xi_h = 0) - L``, the increase of the mean
      next-token cross-entropy when head ``h`` alone is masked (one forward pass
      per head and chunk).
    - ``method="gradient"``: the paper's proxy
      ``I_h = E_x |dL(x)/dxi_h|`` at ``xi = 1`` (one forward and backward pass
      per chunk), a first-order estimate of the same change.

    Not a streaming probe: :meth:`run` runs the model itself (``own_run``).
    """

    name: ClassVar[str] = "importance"
    default: ClassVar[bool] = False
    own_run: ClassVar[bool] = True

    def __init__(
        self,
        method: str = "mask",
        *,
        chunk: int = 256,
        heads: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if method not in ("mask", "gradient"):
            raise AttnInputError(f"method: expected 'mask' or 'gradient', got {method!r}")
        if not isinstance(chunk, int) or chunk < 2:
            raise AttnInputError(f"chunk: expected an int >= 2, got {chunk!r}")
        self.method, self.chunk = method, chunk
        self.heads = None if heads is None else [(int(la), int(h)) for la, h in heads]

    def run(self, model, input_ids: torch.Tensor, *, progress: bool = False) -> list[dict]:
        """Rows ``head_importance`` per (layer, head) of ``model`` on ``input_ids``, with
        ``method`` and ``base_loss``.

        ``input_ids`` [1, N] is cut into chunks of ``chunk`` tokens (or [B, N]: one
        chunk per row); ``heads`` limits the ``mask`` method to some heads.
        """
        config = model.config
        n_layers, n_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
        chunks = _chunks(input_ids, self.chunk)
        if not chunks:
            raise AttnInputError("input_ids: need at least 2 tokens to measure a loss")
        base = sum(_loss(model, c) for c in chunks) / len(chunks)
        if self.method == "mask":
            scores = self._masked(model, chunks, base, n_layers, n_heads, progress)
        else:
            grads = _gate_gradients(model, chunks, n_layers, n_heads)
            scores = {
                (layer, h): float(grads[layer, h])
                for layer in range(n_layers)
                for h in range(n_heads)
            }
        return [
            {
                "analysis": self.name,
                "layer": layer,
                "head": h,
                "metric": "head_importance",
                "value": value,
                "method": self.method,
                "base_loss": base,
            }
            for (layer, h), value in sorted(scores.items())
        ]

    def _masked(self, model, chunks, base, n_layers, n_heads, progress):
        todo = self.heads
        if todo is None:
            todo = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
        bad = [(la, h) for la, h in todo if not (0 <= la < n_layers and 0 <= h < n_heads)]
        if bad:
            raise AttnInputError(
                f"heads: the model has layers 0..{n_layers - 1} and heads 0..{n_heads - 1}, "
                f"got {bad}"
            )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="head importance (masking)", unit="head")
        scores = {}
        for layer, h in todo:
            gates = torch.ones(n_layers, n_heads)
            gates[layer, h] = 0.0
            with edited(model, HeadGates(gates)):
                scores[(layer, h)] = sum(_loss(model, c) for c in chunks) / len(chunks) - base
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return scores


def head_importance(
    model,
    input_ids: torch.Tensor,
    *,
    method: str = "mask",
    chunk: int = 256,
    heads: Sequence[tuple[int, int]] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Importance of each attention head to the loss on ``input_ids``: the rows of
    ``HeadImportance(method, chunk=chunk, heads=heads).run(model, input_ids)``
    (see :class:`HeadImportance`)."""
    return HeadImportance(method, chunk=chunk, heads=heads).run(model, input_ids, progress=progress)


def _gate_gradients(model, chunks, n_layers: int, n_heads: int) -> torch.Tensor:
    """``mean_x |dL(x)/dxi|`` [layers, heads] for head gates ``xi`` fixed at 1."""
    gates = torch.ones(n_layers, n_heads, requires_grad=True)
    total = torch.zeros(n_layers, n_heads)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with edited(model, HeadGates(gates)):
            for c in chunks:
                loss = model(input_ids=c, labels=c).loss
                (g,) = torch.autograd.grad(loss, gates)
                total += g.abs()
    finally:
        for p, s in zip(params, saved, strict=True):
            p.requires_grad_(s)
    return total / len(chunks)
