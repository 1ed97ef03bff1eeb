"""``attnlab bench quality``: how far each approximate mechanism is from exact softmax.

For every mechanism whose Spec says ``exact=False`` (any family), the output on
the same q, k, v is compared with exact softmax attention (float64 reference):
relative error ||out - ref||_F / ||ref||_F, and the cosine of the two. Inputs
are random by default, or queries, keys and values captured from a real model:
a safetensors file holding ``<prefix>.q``, ``<prefix>.k``, ``<prefix>.v``
triplets shaped [B, H, N, D] (``layer{L}.q`` ... as the capture command writes).
Mechanisms that decode also report their recurrent state in floats next to the
KV cache softmax would keep, so quality can be read against state size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

import attnlab
from attnlab.core.reference import reference_attention


@dataclass
class QualityRecord:
    """One (mechanism, input, mode) comparison with exact softmax."""

    mechanism: str
    family: str
    source: str
    causal: bool
    n: int
    rel_error: float | None
    cosine: float | None
    state_floats: int | None
    kv_cache_floats: int
    skipped: str | None = None


def load_qkv(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``{prefix: (q, k, v)}`` from a safetensors file of ``<prefix>.q/.k/.v`` tensors."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    triplets = {}
    for name in sorted(tensors):
        if not name.endswith(".q"):
            continue
        prefix = name[: -len(".q")]
        if f"{prefix}.k" in tensors and f"{prefix}.v" in tensors:
            triplets[prefix] = tuple(
                tensors[f"{prefix}.{part}"].float() for part in ("q", "k", "v")
            )
    if not triplets:
        raise attnlab.AttnInputError(
            f"qk: expected tensors named <prefix>.q, <prefix>.k, <prefix>.v in {path}, "
            f"got {', '.join(sorted(tensors)[:6]) or 'none'}"
        )
    return triplets


def random_qkv(
    n: int = 1024, *, batch: int = 1, heads: int = 8, kv_heads: int = 8, head_dim: int = 64
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Seeded Gaussian q, k, v: the default input."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, n, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
    return {"random": (q, k, v)}


def run_quality(
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    mechanisms: Iterable[str] | None = None,
    *,
    causal_modes: Iterable[bool] = (True, False),
    configs: dict[str, dict] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[QualityRecord]:
    """Relative error of each approximate mechanism against exact softmax on each input."""
    configs = configs or {}
    names = list(mechanisms) if mechanisms is not None else attnlab.mechanisms(exact=False)
    records = []
    for source, (q, k, v) in inputs.items():
        hq, n, d = q.shape[1:]
        hkv, dv = k.shape[1], v.shape[-1]
        cache = n * hkv * (d + dv)
        for causal in causal_modes:
            ref = reference_attention(q, k, v, causal=causal)
            for name in names:
                if progress:
                    progress(f"{name} on {source} ({'causal' if causal else 'full'})")
                spec = attnlab.spec(name)
                record = QualityRecord(
                    name, spec.family, source, causal, n, None, None, None, cache
                )
                try:
                    mech = attnlab.get(name, **configs.get(name, {})).eval()
                    with torch.inference_mode():
                        out = mech(q, k, v, causal=causal).double()
                except attnlab.AttnInputError as exc:
                    record.skipped = str(exc)
                    records.append(record)
                    continue
                diff = (out - ref).flatten()
                record.rel_error = (diff.norm() / ref.flatten().norm()).item()
                record.cosine = torch.nn.functional.cosine_similarity(
                    out.flatten(), ref.flatten(), dim=0
                ).item()
                if spec.decode:
                    record.state_floats = int(
                        mech.state_size(n, q_heads=hq, kv_heads=hkv, head_dim=d, value_dim=dv)
                    )
                records.append(record)
    return records
