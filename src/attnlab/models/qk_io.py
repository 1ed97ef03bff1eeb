"""Captured post-rotary queries, keys and values as safetensors files, for benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from attnlab.core.errors import AttnInputError


def save_qk(tensors: dict[str, torch.Tensor], path: str | Path, **metadata: str) -> Path:
    """Write ``{"layer{L}.q|k|v": [B, H, N, D]}`` to a safetensors file."""
    from safetensors.torch import save_file

    if not tensors:
        raise AttnInputError("keep_qk: no layers were kept; pass keep_qk=[...] to capture()")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(path), metadata={k: str(v) for k, v in metadata.items()})
    return path


def load_qk(path: str | Path) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Read a file written by :func:`save_qk`: ``{layer: (q, k, v)}``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    layers = sorted({int(n.split(".")[0][len("layer") :]) for n in tensors})
    return {
        layer: (tensors[f"layer{layer}.q"], tensors[f"layer{layer}.k"], tensors[f"layer{layer}.v"])
        for layer in layers
    }
