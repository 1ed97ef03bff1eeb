"""The chunk size of the causal linear-attention scan: the table behind ``choose_chunk``.

:func:`run_chunks` measures the chunked kernel of :mod:`attnlab.core.scan` for several
chunk sizes and feature dims at one N.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from attnlab.core import native
from attnlab.core.scan import causal_scan

from .timing import Progress, median_ms

# which code ran a scan: csrc/scan.c, or the PyTorch scan
KERNELS = ("compiled", "torch")


def run_chunks(
    feature_dims: Iterable[int] = (16, 64, 153),
    chunks: Iterable[int] = (32, 64, 128, 256),
    *,
    n: int = 8192,
    heads: int = 8,
    value_dim: int = 64,
    repeats: int = 3,
    progress: Progress = None,
) -> list[dict]:
    """ms of the causal chunked scan for each (feature dim F, chunk C); the best C per F
    flagged, and which kernel ran ("compiled": csrc/scan.c, which takes F a multiple of 16,
    else "torch")."""
    rows = []
    for f in feature_dims:
        fq = torch.rand(1, heads, n, f)
        fk = torch.rand(1, heads, n, f)
        v = torch.randn(1, heads, n, value_dim)
        if progress:
            progress(f"chunks F={f}")
        calls = {
            c: (lambda c=c, fq=fq, fk=fk, v=v: causal_scan(fq, fk, v, chunk=c)) for c in chunks
        }
        got = median_ms(calls, repeats)
        best = min(got, key=got.get)
        rows.extend(
            {
                "feature_dim": f,
                "chunk": c,
                "ms": t,
                "best": c == best,
                "kernel": "compiled"
                if native.scan_applies((fq, fk, v), feature="identity", chunk=c)
                else "torch",
            }
            for c, t in got.items()
        )
    return rows
