"""Head importance: how much the loss changes when a head is removed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _chunks(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.shape[0] > 1:
        return [ids[i : i + 1] for i in range(ids.shape[0])]
    n = ids.shape[1]
    return [ids[:, s : s + length] for s in range(0, n - 1, length) if s + 2 <= n]


def head_importance(
    model,
    input_ids: torch.Tensor,
    *,
    method: str = "mask",
    chunk: int = 256,
    heads: Sequence[tuple[int, int]] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Importance of each attention head to the language-modelling loss on ``input_ids``.

    After Michel et al. 2019, "Are Sixteen Heads Really Better than One?"
    (arXiv:1905.10650), with a gate ``xi_h`` on each head's output (1 = kept):

    - ``method="mask"``: ``I_h = L(xi_h = 0) - L``, the increase of the mean
      next-token cross-entropy when head ``h`` alone is masked (one forward pass
      per head and chunk, through :func:`attnlab.interventions.mask_heads`).
    - ``method="gradient"``: the paper's proxy
      ``I_h = E_x |dL(x)/dxi_h|`` at ``xi = 1`` (one forward and backward pass
      per chunk), a first-order estimate of the same change.

    ``input_ids`` [1, N] is cut into chunks of ``chunk`` tokens (or [B, N]: one
    chunk per row); ``heads`` limits the ``mask`` method to some heads. Rows:
    ``head_importance`` per (layer, head), with ``method`` and ``base_loss``.
    """
    from attnlab.interventions import mask_heads

    config = model.config
    n_layers, n_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    chunks = _chunks(input_ids, chunk)
    if not chunks:
        raise ValueError("input_ids: need at least 2 tokens to measure a loss")
    base = sum(_loss(model, c) for c in chunks) / len(chunks)
    if method == "mask":
        todo = (
            list(heads)
            if heads is not None
            else [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
        )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="head importance (masking)", unit="head")
        scores = {}
        for layer, h in todo:
            with mask_heads(model, {layer: [h]}):
                scores[(layer, h)] = sum(_loss(model, c) for c in chunks) / len(chunks) - base
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    elif method == "gradient":
        grads = _gate_gradients(model, chunks, n_layers, n_heads)
        scores = {
            (layer, h): float(grads[layer, h]) for layer in range(n_layers) for h in range(n_heads)
        }
    else:
        raise ValueError(f"method: expected 'mask' or 'gradient', got {method!r}")
    return [
        {
            "analysis": "importance",
            "layer": layer,
            "head": h,
            "metric": "head_importance",
            "value": value,
            "method": method,
            "base_loss": base,
        }
        for (layer, h), value in sorted(scores.items())
    ]


def _gate_gradients(model, chunks, n_layers: int, n_heads: int) -> torch.Tensor:
    """``mean_x |dL(x)/dxi|`` [layers, heads] for head gates ``xi`` fixed at 1."""
    from attnlab.interventions import Edit, applied

    gates = torch.ones(n_layers, n_heads, requires_grad=True)

    class Gate(Edit):
        def output(self, layer, out, q, k, v):
            return out * gates[layer].to(out.dtype).view(1, -1, 1, 1)

    total = torch.zeros(n_layers, n_heads)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with applied(model, Gate()):
            for c in chunks:
                loss = model(input_ids=c, labels=c).loss
                (g,) = torch.autograd.grad(loss, gates)
                total += g.abs()
    finally:
        for p, s in zip(params, saved, strict=True):
            p.requires_grad_(s)
    return total / len(chunks)
